"""A worker process: one connection to the master at a time, jobs run one at
a time in the client's working directory and with the client's ``sys.path``
in front of its own.  A worker that loses its master reconnects; one that
cannot reach a master for ``--connect-timeout`` seconds exits (and says so on
its exit channel, see cw.worker.channel).
"""
from __future__ import annotations

import collections
import concurrent.futures
import logging
import os
import signal
import sys
import threading
import time

from cw import settings
from cw.client.executor import JobHooks
from cw.errors import AuthenticationError, BrokenCluster, CwError, ProtocolError
from cw.wire import buffers, frames, protocol
from cw.wire.auth import load_secret
from cw.wire.link import HandshakeFailed, master_timeout, open_link, parse_address, peer_info
from cw.wire.payload import error_outcome, run_payload, views_writable_memory  # (an import per job costs ~4 us)
from cw.worker import channel, output
from cw.worker.channel import EXIT_CONFIG, EXIT_NO_MASTER, EXIT_NOW, EXIT_REPLACE, ExitChannel

log = logging.getLogger("cw.worker")

_READ = object()   # what a runner is to do next: take the reader's role

DEFAULT_CONNECT_TIMEOUT = settings.WORKER_CONNECT_TIMEOUT


class JobRunner:
    """Runs the jobs of one connection, each in its client's context."""

    def __init__(self):
        self.base_path = list(sys.path)
        self.contexts: dict[int, dict] = {}
        self.current = None

    def set_context(self, ctx: int, context: dict) -> None:
        if context:
            self.contexts[ctx] = context
        else:
            self.contexts.pop(ctx, None)       # the client left
            if self.current == ctx:
                self.current = None

    def enter(self, ctx: int) -> None:
        if ctx == self.current:
            return
        context = self.contexts.get(ctx, {})
        cwd = context.get("cwd")
        if isinstance(cwd, str) and os.path.isdir(cwd):
            os.chdir(cwd)
        client_path = [p for p in context.get("path", ()) if isinstance(p, str) and p and os.path.exists(p)]
        seen = set()
        sys.path[:] = [p for p in client_path + self.base_path if not (p in seen or seen.add(p))]
        self.current = ctx


def _set_environ(env: dict) -> None:
    """Sets (or, for None values, removes) environment variables."""
    for name, value in env.items():
        if not isinstance(name, str):
            continue
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = str(value)


#: Depth in its tree of the job running now (0: submitted by a client, not a job).
_depth = 0


def _nested_call(depth: int, fn, args, kwargs):
    """Runs a job submitted by a job, knowing how deep it is in its tree."""
    global _depth
    outer, _depth = _depth, depth
    try:
        return fn(*args, **kwargs)
    finally:
        _depth = outer


class NestedJobHooks(JobHooks):
    """Ties the jobs a running job submits (``cw.get_executor()`` inside a
    job) to it: they are its children.  A child gets priority one above its
    parent's depth unless given one, so the deepest jobs go first: the tree
    is explored depth first, as work-stealing schedulers do, and the jobs
    waiting at once stay about as many as the tree is deep.  The running
    job's context (cwd, sys.path) is sent along when it changed, and waiting
    on a child lends this worker (Session.help_while)."""

    def __init__(self, session: Session):
        self.session = session
        self.sent_context = (os.getcwd(), tuple(sys.path))

    def prepare(self, fn, args, kwargs, priority):
        depth = _depth + 1
        return _nested_call, (depth, fn, args, kwargs), {}, priority or depth

    def context_change(self):
        context = (os.getcwd(), tuple(sys.path))
        if context == self.sent_context:
            return None
        self.sent_context = context
        return {"cwd": context[0], "path": context[1]}

    def adopt(self, future) -> None:
        self.session.track_child(future)

    def wait(self, future, timeout) -> None:
        self.session.help_while(future, timeout)


class Session:
    """One connection to the master.  One thread at a time is the reader: it
    takes frames off the socket; jobs (and the contexts they need) go to a
    local queue; PINGs, REVOKEs and ABORTs are answered at once, even while a
    job runs.  Runner threads run the queued jobs, one at a time, in order
    (see run).

    Reading is a role, not a thread: a job that comes while nothing runs or
    waits is run by the reader itself, which first hands its role to an idle
    runner.  The job then starts without a thread wake-up on its way (the
    new reader wakes while it runs): about 30-50 us less per round trip on
    a small VM, where a wake-up is most of a no-op job's time here."""

    def __init__(self, link, runner: JobRunner, state: WorkerState):
        self.link = link
        self.runner = runner
        self.state = state
        self.queue: collections.deque = collections.deque()   # ("job", gid, ...) / ("ctx", ctx, context)
        self.cond = threading.Condition()
        self.lost = False
        self.envs: dict[int, dict] = {}    # gid -> environment from its JOB_ENV, until its JOB comes
        self.local = threading.local()     # the job a runner thread runs: ctx, env, children (futures)
        self.base_env = {name: os.environ.get(name) for name in self.MANAGED_ENV}
        self.applied_env = self.base_env   # what the managed variables are set to now
        self.token_free = True             # no thread runs a job now (see run)
        self.resumers: collections.deque = collections.deque()   # Events of waiting jobs ready to go on
        self.retire = 0                    # runners that should park (their jobs came back)
        self.parked: list = []             # Events of parked runner threads
        self.active = 0                    # jobs started and not finished (running or waiting)
        self.ended = threading.Event()     # set once lost or draining with no job left
        self.idle = 0                      # runners waiting on self.cond for something to do
        self.reader_wanted = False         # the reader left its role to run a job: an idle runner takes it
        self.reader = threading.Thread(target=self._first_reader, name="cw-worker", daemon=True)

    def _first_reader(self) -> None:
        self._runner(self._read())

    def _read(self):
        """The reader's role: returns a job that this thread is to run now,
        having handed the role on, or None once the connection is over."""
        link = self.link
        try:
            while True:
                item = link.recv(master_timeout(link))
                if item is None:
                    log.warning("the master at %s closed the connection", link.address)
                    break
                ftype, body = item
                if ftype == protocol.JOB:
                    gid, ctx, timeout, payload = protocol.decode_job(body)
                    job = ("job", gid, ctx, timeout, payload, self.envs.pop(gid, None))
                    if self.state.draining:      # sent before the master saw our DRAIN
                        link.post(protocol.encode_revoked(job[1], True), direct=False)
                    elif self._run_here(job):
                        return job
                    else:
                        self._put(job)
                elif ftype == protocol.CONTEXT:
                    self._put(("ctx", *protocol.decode_context_for_worker(body)))
                elif ftype == protocol.JOB_ENV:
                    gid, env = protocol.decode_job_env(body)
                    self.envs[gid] = env
                elif ftype == protocol.PING:
                    link.post_nowait(protocol.PONG_FRAME)
                    buffers.POOL.release_idle()     # pings come every few seconds
                elif ftype == protocol.REVOKE:
                    gid = protocol.decode_revoke(body)
                    link.post(protocol.encode_revoked(gid, self._take_back(gid)), direct=False)
                elif ftype == protocol.ABORT:
                    gid = protocol.decode_abort(body)
                    if self._take_back(gid):      # not started: hand it back, nothing to stop
                        link.post(protocol.encode_revoked(gid, True), direct=False)
                    else:
                        self.state.abort(gid)
                elif ftype == protocol.ERROR:
                    log.warning("the master closed our connection: %s", bytes(body).decode("utf-8", "replace"))
                    break
                else:
                    log.warning("the master sent an unexpected %s frame", protocol.FRAME_NAMES.get(ftype, ftype))
                    break
        except (OSError, ProtocolError) as exc:   # TimeoutError included: the master stopped answering
            log.warning("lost the master at %s: %s", link.address, exc)
        with self.cond:
            self.lost = True
            self.cond.notify_all()
            self._check_end()
        return None

    def _run_here(self, job) -> bool:
        """Whether the reader runs ``job`` itself: only when no job runs or
        waits here and a runner is idle to take over the reading (so pings and
        aborts are still answered while the job runs).  Takes the token then."""
        with self.cond:
            if not (self.token_free and not self.queue and self.idle):
                return False
            self.token_free = False
            self.active += 1
            self.reader_wanted = True
            self.cond.notify()        # one idle runner wakes and becomes the reader
            return True

    def _put(self, item) -> None:
        with self.cond:
            self.queue.append(item)
            self.cond.notify_all()

    def _take_back(self, gid: int) -> bool:
        """Removes a job that has not started from the local queue."""
        with self.cond:
            for item in self.queue:
                if item[0] == "job" and item[1] == gid:
                    self.queue.remove(item)
                    return True
        return False

    def drain(self) -> None:
        """Gives back every job not started, says DRAIN, wakes the main thread.
        Every frame a worker sends goes through its one writer, in order: the
        master sees an outcome before a later DRAIN or REVOKED."""
        with self.cond:
            unstarted = [item[1] for item in self.queue if item[0] == "job"]
            self.queue = collections.deque(item for item in self.queue if item[0] != "job")
            self.cond.notify_all()
            self._check_end()
        try:
            for gid in unstarted:
                self.link.post(protocol.encode_revoked(gid, True))
            self.link.post(frames.encode_drain(list(self.state.running)))
        except OSError:
            pass  # the master is gone already: there is nobody left to tell

    def run(self) -> bool:
        """Runs jobs until the master is lost (returns False: reconnect) or this
        worker drains (returns True: exit).

        Jobs run in runner threads, one job at a time: a thread runs a job
        only while it holds the token.  A job that waits on jobs it submitted
        (help_while) gives the token up, lends this worker to the master and
        wakes another runner; when its children are done it takes the token
        back as soon as the job running meanwhile ends, and one runner
        retires (parks, to be woken for the next loan).  So threads are one
        more than the most jobs that waited on children at once.  The main
        thread only waits here, free for signals."""
        self.state.session = self
        self.link.start_writer()    # outcomes of quick jobs share sends (see link._Writer)
        self.reader.start()
        with self.cond:
            self._add_runner()
        # An Event of its own: waiting on self.cond, this thread would be woken
        # (for nothing) by every job's notifications.
        self.ended.wait()
        with self.cond:
            for wake in self.parked:
                wake.set()          # they see the session is over and end
            return not self.lost

    def _check_end(self) -> None:
        """With self.cond held: the session is over once lost or draining and no job is left."""
        if (self.lost or self.state.draining) and self.active == 0:
            self.ended.set()

    def _add_runner(self) -> None:
        """With self.cond held: one more runner, a parked one if there is one."""
        if self.parked:
            self.parked.pop().set()
        else:
            threading.Thread(target=self._runner, name="cw-worker", daemon=True).start()

    def _runner(self, item=None) -> None:
        """A runner thread's life: runs ``item`` (a job the reader took for
        itself) if given, then queued jobs, and the reader's role when handed it."""
        cond = self.cond
        wake = threading.Event()
        finished = False               # it just ran a job: give the token back first
        if item is not None:
            try:
                self._run_item(item)
            finally:
                finished = True
        while True:
            with cond:                 # one lock round per job: finish the last, take the next
                if finished:
                    finished = False
                    self.active -= 1
                    self._pass_token()
                    self._check_end()
                self.idle += 1
                while not (self.reader_wanted or self.retire or self.lost or self.state.draining
                           or (self.queue and self.token_free)):
                    cond.wait()
                self.idle -= 1
                if self.reader_wanted and not self.lost:
                    self.reader_wanted = False
                    item = _READ
                elif self.retire or self.lost or self.state.draining:
                    if self.retire:
                        self.retire -= 1
                    if self.lost or self.state.draining:
                        self._check_end()
                        return
                    self.parked.append(wake)
                    item = None
                else:
                    item = self.queue.popleft()
                    self.token_free = False
                    self.active += 1
            if item is _READ:
                item = self._read()
                if item is None:
                    continue           # lost: the loop above ends this thread
            elif item is None:
                wake.wait()            # until a job lends this worker again
                wake.clear()
                continue
            try:
                self._run_item(item)
            finally:
                finished = True

    def _pass_token(self) -> None:
        """With self.cond held: the token goes to a job that waited for it, or is free."""
        if self.resumers:
            self.resumers.popleft().set()
        else:
            self.token_free = True
            self.cond.notify_all()

    def _run_item(self, item) -> None:
        if item[0] == "ctx":
            self.runner.set_context(item[1], item[2])
            return
        _, gid, ctx, timeout, payload, env = item
        if not self.state.start(gid, timeout):
            # Its ABORT came while it was being taken off the queue: it never runs.
            self.link.post(protocol.encode_revoked(gid, True))
            return
        job = self.local
        job.ctx, job.children = ctx, []
        job.env = self._job_environ(env)
        self.runner.enter(ctx)
        self._apply_environ(job.env)
        output.begin()
        call = []
        try:
            status, data = run_payload(payload, call)
        finally:
            printed = output.end()
            # A job's unfinished children die with it: nobody will wait for them.
            for future in job.children:
                future.cancel()
            job.children = None
        if self.state.finish(gid):
            try:
                if printed:
                    self.link.post(protocol.encode_output(gid, printed))
                if views_writable_memory(data):   # the next job may change what this one returned
                    self.link.post_and_wait(protocol.encode_outcome(gid, status, data), timeout=None)
                else:
                    self.link.post(protocol.encode_outcome(gid, status, data))
            except OSError as exc:
                log.warning("could not send job %d's outcome (%s); the master re-runs it", gid, exc)

    #: Variables the master sets per job (JOB_ENV); a job without them gets the worker's own.
    MANAGED_ENV = ("CUDA_VISIBLE_DEVICES", "CW_JOB_CPUS", "CW_JOB_MEM")

    def _job_environ(self, env: dict | None) -> dict:
        """The managed variables as this job must see them: other jobs of this
        process (waiting on their children) may have set them for themselves."""
        if not env:
            return self.base_env
        target = dict(self.base_env)
        target.update(env)
        return target

    def _apply_environ(self, target: dict) -> None:
        if target is not self.applied_env:     # most jobs: the same as the last one's
            _set_environ(target)
            self.applied_env = target

    def help_while(self, future, timeout: float | None) -> None:
        """Called when a running job waits on ``future`` (a job it submitted):
        lends this worker to the master, so that other jobs (its children,
        most likely) run here meanwhile, and takes it back once the future is
        done.  Returns after ``timeout`` seconds at most."""
        job = self.local
        if getattr(job, "children", None) is None or self.state.draining or self.lost:
            return                     # not a job's thread, or no new jobs may start here
        cond = self.cond
        with cond:
            if future.done():
                return
            self._pass_token()
            self._add_runner()
        try:
            self.link.post(protocol.LEND_FRAME)
        except OSError:
            pass
        concurrent.futures.wait([future], timeout)
        with cond:
            self.retire += 1           # one runner fewer: this job runs again
            cond.notify_all()
            if self.token_free:
                self.token_free = False
                mine = None
            else:
                mine = threading.Event()
                self.resumers.append(mine)
        if mine is not None:
            mine.wait()
        try:
            self.link.post(protocol.RECLAIM_FRAME, direct=False)
        except OSError:
            pass
        self.runner.enter(job.ctx)
        self._apply_environ(job.env)

    def track_child(self, future) -> None:
        """A future the running job submitted (see NestedJobHooks)."""
        children = getattr(self.local, "children", None)
        if children is not None:
            children.append(future)


class WorkerState:
    """What the signal handlers, the reader thread and the watchdog share."""

    def __init__(self):
        self.lock = threading.Lock()
        self.running: dict[int, threading.Timer | None] = {}   # gid -> its timeout's timer
        self.aborted: dict[int, None] = {}   # ABORTs for jobs between the queue and running (oldest first)
        self.draining = False
        self.session: Session | None = None

    def start(self, gid: int, timeout: float) -> bool:
        """Registers a job as running; False if it was aborted already."""
        with self.lock:
            if self.aborted.pop(gid, 0) is None:
                return False
            timer = None
            if timeout > 0:
                timer = threading.Timer(timeout, self._timed_out, (gid, timeout))
                timer.daemon = True
                timer.start()
            self.running[gid] = timer
            return True

    def finish(self, gid: int) -> bool:
        """True if the job's outcome is still ours to send (no timeout took it)."""
        with self.lock:
            if gid not in self.running:
                return False
            timer = self.running.pop(gid)
            if timer is not None:
                timer.cancel()
            return True

    def _timed_out(self, gid: int, timeout: float) -> None:
        from cw.errors import JobTimeout
        with self.lock:
            if gid not in self.running:
                return
            del self.running[gid]
        status, data = error_outcome(JobTimeout(
            f"job stopped after its timeout of {timeout:g} s on worker pid {os.getpid()}; the worker "
            "process was replaced. Raise the timeout if the job needs longer"))
        try:
            # After the outcomes posted before it, or the master would see them out of order.
            self.session.link.post_and_wait(protocol.encode_outcome(gid, status, data))
        finally:
            channel.exit_now(ExitChannel.REPLACE, EXIT_REPLACE)   # the job's thread cannot be stopped; the process can

    def abort(self, gid: int) -> None:
        with self.lock:
            if gid not in self.running:
                # Taken off the queue but not started yet (or finished: then the
                # entry is never used, and the oldest ones are forgotten).
                self.aborted[gid] = None
                if len(self.aborted) > 1000:
                    del self.aborted[next(iter(self.aborted))]
                return
            if gid in self.running:
                log.info("job %d was cancelled by its client; this worker process is replaced", gid)
                self._exit(ExitChannel.REPLACE, EXIT_REPLACE)

    def _exit(self, reason: str, status: int) -> None:
        """Exits at once, but not before the outcomes of finished jobs are out:
        lost, they would make the master run those jobs again."""
        if self.session is not None:
            self.session.link.flush(timeout=5.0)
        channel.exit_now(reason, status)

    def on_sigterm(self, signum, frame) -> None:
        """First SIGTERM: drain.  Second: exit now; the master re-runs the job."""
        if self.draining:
            self._exit(ExitChannel.STOPPED, EXIT_NOW)
        self.on_drain(signum, frame)

    def on_drain(self, signum, frame) -> None:
        """Finish the current job, take no other, exit (SIGUSR1 from the
        supervisor; idempotent, because SLURM may also have sent SIGTERM)."""
        if self.draining:
            return
        self.draining = True
        session = self.session
        if session is None:
            channel.exit_channel.say(ExitChannel.DRAINED)
            raise SystemExit(0)      # not connected: nothing to finish
        # From a thread: this handler may have interrupted code holding the locks it needs.
        threading.Thread(target=session.drain, daemon=True).start()


def master_resolver(spec: str, port: int, connect_timeout: float):
    """A function giving the master's (host, port), asked again at every
    (re)connection: ``HOST[:PORT]``, or ``slurm:NAME`` for the master of the
    SLURM cluster NAME, which may have moved since the last connection."""
    if spec.startswith("slurm:"):
        name = spec[len("slurm:"):]

        def resolve():
            from cw.launch.slurm import master_address
            return master_address(name, port, timeout=connect_timeout)
        return resolve
    address = parse_address(spec, port)
    return lambda: address


def _enable_nested_jobs(host: str, port: int, session: Session) -> None:
    """Lets jobs of this process submit jobs (``cw.get_executor()``) and lend
    this worker while they wait for them."""
    from cw.client.executor import ClusterExecutor, set_executor_factory
    set_executor_factory(lambda: ClusterExecutor(host, port, job_hooks=NestedJobHooks(session)))


def run_worker(resolve, connect_timeout: float = DEFAULT_CONNECT_TIMEOUT, offer: dict | None = None) -> int:
    """One worker process: connect, run jobs, reconnect; returns an exit status.
    ``offer``: this worker's machine ({"node", "resources", "gpu_ids"})."""
    try:
        secret = load_secret()
    except CwError as exc:
        log.error("%s", exc)
        return EXIT_CONFIG
    runner = JobRunner()
    state = WorkerState()
    output.install()
    signal.signal(signal.SIGTERM, state.on_sigterm)
    signal.signal(signal.SIGUSR1, state.on_drain)   # the supervisor's "drain"
    deadline = time.monotonic() + connect_timeout
    while not state.draining:
        host, port = "?", "?"
        try:
            host, port = resolve()
            # At most 5 s an attempt, then the address is asked again: one that
            # names a host gone dark (a SLURM node that failed) hangs a connect
            # rather than refusing it, while a new master is published elsewhere.
            link = open_link(host, port, secret, {**peer_info("worker"), **(offer or {})},
                             max(1.0, min(5.0, deadline - time.monotonic())))
        except HandshakeFailed as exc:
            if time.monotonic() > deadline:
                log.error("giving up: %s", exc)
                return EXIT_NO_MASTER
            log.warning("%s; retrying", exc)
            time.sleep(0.5)
            continue
        except (BrokenCluster, LookupError) as exc:
            log.error("giving up: %s", exc)
            return EXIT_NO_MASTER
        except AuthenticationError as exc:
            log.error("%s", exc)
            return EXIT_CONFIG
        except CwError as exc:       # SLURM discovery failed
            log.error("giving up: %s", exc)
            return EXIT_NO_MASTER
        log.info("worker %d connected to %s:%s", os.getpid(), host, port)
        channel.exit_channel.say_ready()
        session = Session(link, runner, state)
        _enable_nested_jobs(host, port, session)
        try:
            if session.run():
                break
        finally:
            state.session = None
            link.close()
        deadline = time.monotonic() + connect_timeout   # lost it: the same time again to find it
    log.info("worker %d drained and stops", os.getpid())
    return 0
