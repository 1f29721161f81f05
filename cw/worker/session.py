"""A worker process: one connection to the master at a time, jobs run one at
a time in the client's working directory and with the client's ``sys.path``
in front of its own.  A worker that loses its master reconnects; one that
cannot reach a master for ``--connect-timeout`` seconds exits (and says so on
its exit channel, see cw.worker.channel).

``Session`` is the shell around the worker's rules (cw.worker.core): it
reads frames, runs payloads in its threads, captures their output, sends
what the core puts in its outbox and does what the core says::

    reader (one runner at a time) --frames-------->  +------------+
    runners: finished, lend, wait_over ----------->  | WorkerCore | --outbox--> link --> master
    signals, timers: drain, sigterm, deadline ---->  +------------+
                                                           |
        actions, to the runners named: Read, Run, Resume, Idle, Stop;
        to the shell: Spawn (a thread), Pong, Exit (the process), End (the session)
"""
from __future__ import annotations

import concurrent.futures
import logging
import os
import signal
import threading
import time
from collections import deque

from cw import settings
from cw.errors import AuthenticationError, BrokenCluster, CwError, ProtocolError
from cw.wire import buffers, frames, tls
from cw.wire.auth import load_secret
from cw.wire.link import HandshakeFailed, master_timeout, open_link, parse_address, peer_info
from cw.wire.payload import run_payload, views_writable_memory  # (an import per job costs ~4 us)
from cw.worker import channel, output, refs
from cw.worker.channel import EXIT_CONFIG, EXIT_NO_MASTER, EXIT_NOW, EXIT_REPLACE, ExitChannel
from cw.worker.context import ContextSwitcher
from cw.worker.core import End, Exit, Idle, Pong, Read, Resume, Run, Spawn, Stop, WorkerCore, decode
from cw.worker.deadlines import Deadlines
from cw.worker.functions import FunctionLRU
from cw.worker.nested import NestedJobHooks, enable_nested_jobs
from cw.worker.runners import DeferredReading, Runner

__all__ = ["NestedJobHooks", "Session", "SignalRelay", "master_resolver", "run_worker"]

log = logging.getLogger("cw.worker")

DEFAULT_CONNECT_TIMEOUT = settings.WORKER_CONNECT_TIMEOUT
#: Seconds an exiting worker waits for what it sends (finished jobs' outcomes) to go out.
EXIT_FLUSH_TIMEOUT = 10.0
_EXIT_STATUS = {ExitChannel.REPLACE: EXIT_REPLACE, ExitChannel.STOPPED: EXIT_NOW}


class Session:
    """One connection to the master.  Every call into the core is made
    holding ``lock``; the frames it leaves in its outbox are sent after the
    lock is let go, by whichever thread gets ``send_lock`` (see _send), so
    they leave in the core's order and no thread blocks on the socket while
    holding the core.

    Reading is a role, not a thread: a job that comes while no job runs is
    run by the reader itself, which first hands its role to a free runner
    (the core decides, see WorkerCore.job), lazily (see cw.worker.runners):
    neither the job nor the new reader waits for a thread to wake.  A job
    that waits on its children (help_while) has the standby read at once:
    their JOBs must be read."""

    def __init__(self, link, contexts: ContextSwitcher, functions: FunctionLRU | None = None):
        self.link = link
        self.contexts = contexts
        self.core = WorkerCore(os.getpid(), functions)
        self.lock = threading.Lock()
        self.send_lock = threading.Lock()
        self.runners: dict[int, Runner] = {}
        self.reading = DeferredReading(self.lock, self.runners)
        self.local = threading.local()     # on a runner's thread: .runner, its Runner
        self.ended = threading.Event()
        self.drained = False
        self.exit: Exit | None = None
        self.timeout = 0.0                 # seconds of silence after which the master counts as lost (run)
        self.deadlines = Deadlines(lambda gid: self._call(self.core.deadline, gid))

    def run(self) -> bool:
        """Runs jobs until the master is lost (returns False: reconnect) or this
        worker drained (returns True: exit).  The main thread only waits
        here, free for signals."""
        # A job's thread sends its outcome itself whenever the writer thread is
        # idle, even right after the last one: on a worker, jobs come one at a
        # time, and a wake-up of the writer costs more than the send it saves.
        self.link.start_writer(burst_gap=0.0)
        self.timeout = master_timeout(self.link)
        with self.lock:
            self._act(self.core.start(), None)
        # An Event of its own: the threads' work never wakes this one.
        self.ended.wait()
        self.deadlines.stop()
        return self.drained

    # --- doing what the core says ------------------------------------------------

    def _act(self, actions: list, me: int | None):
        """With self.lock held: carries out ``actions``; returns the task among
        them for runner ``me`` (the caller), if any."""
        mine = None
        for action in actions:
            kind = type(action)
            if kind is Spawn:
                runner = self.runners[action.runner] = Runner(action.runner)
                threading.Thread(target=self._runner, args=(runner,), name="cw-worker", daemon=True).start()
            elif kind is Pong:
                self.link.post_nowait(frames.PONG_FRAME)
                buffers.POOL.release_idle()     # pings come every few seconds
            elif kind is Exit:
                self.exit = action
            elif kind is End:
                self.drained = action.drained
            elif action.runner == me:
                mine = action
            elif kind is Read and me is not None:   # the caller runs a job it read: put the reading off
                self.reading.defer(self.runners[action.runner])
            else:
                runner = self.runners[action.runner]
                runner.task = action
                runner.nudge()
        return mine

    def _call(self, event, *args, me: int | None = None):
        """Calls a core event, does what it returns, sends what it queued;
        returns the caller's task."""
        with self.lock:
            mine = self._act(event(*args), me)
        self._after()
        return mine

    def _after(self, direct: bool = True) -> None:
        """Once the lock is let go: the core's frames go out; then the process
        exits, or the session ends, if the core said so."""
        if self.exit is not None:
            self._exit()
        if self.core.over:
            self._send_all()         # before run() returns and the link closes
            self.ended.set()
        elif self.core.outbox:
            self._send(direct)

    def _send(self, direct: bool = True) -> None:
        """Sends the core's outbox, unless another thread is sending: that one
        looks again after its send and takes these frames too.  A reader
        passes ``direct=False``: it must never block on the socket."""
        outbox = self.core.outbox
        while outbox:
            if not self.send_lock.acquire(blocking=False):
                return
            try:
                self._post(outbox, direct)
            finally:
                self.send_lock.release()

    def _send_all(self) -> None:
        """Sends the outbox, waiting for a thread sending now to finish first:
        afterwards, every frame the core made so far is with the link."""
        with self.send_lock:
            self._post(self.core.outbox, True)

    def _post(self, outbox: deque, direct: bool) -> None:
        frames = []
        while outbox:
            frames.append(outbox.popleft())   # (events append meanwhile: a deque's ends are thread-safe)
        if frames:
            try:
                self.link.post(*frames, direct=direct)
            except OSError as exc:
                log.warning("could not send to the master (%s); it re-runs the jobs whose outcomes are lost", exc)

    def _exit(self) -> None:
        """Exits at once, but not before the outcomes of finished jobs are out:
        lost, they would make the master run those jobs again."""
        action = self.exit
        log.info("%s", action.why)
        self._send_all()
        self.link.flush(timeout=EXIT_FLUSH_TIMEOUT)
        channel.exit_now(action.reason, _EXIT_STATUS[action.reason])

    # --- runner threads ----------------------------------------------------------

    def _runner(self, me: Runner) -> None:
        """A runner thread's life: it does the tasks the core gives it."""
        self.local.runner = me
        task = None
        while True:
            if task is None:
                task = me.wait(self.reading)
            kind = type(task)
            if kind is Read:
                task = self._read(me)
            elif kind is Run:
                task = self._run(me, task.job)
            elif kind is Stop:
                return
            else:                      # Idle: a reading put off may be ours to take
                with self.lock:
                    task = self.reading.take(me)

    def _read(self, me: Runner):
        """The reader's role: returns this thread's next task (Stop, or what
        follows a job that left the reading elsewhere).  A job the core
        starts on this thread runs here at once, and when the reading comes
        back with its end (see _run), this thread reads on: a stream of
        short jobs stays in this loop."""
        link, core, lock, timeout = self.link, self.core, self.lock, self.timeout
        while True:
            mine = None
            try:
                while mine is None:
                    item = link.recv(timeout)
                    if item is None:
                        why = f"the master at {link.address} closed the connection"
                        break
                    event, args = decode(*item)
                    with lock:
                        actions = event(core, *args)
                        mine = self._act(actions, me.id) if actions else None
                    if self.exit is not None or core.over or core.outbox:
                        self._after(direct=False)
            except (OSError, ProtocolError) as exc:   # TimeoutError included: the master stopped answering
                why = f"lost the master at {link.address}: {exc}"
            if mine is None:
                if not core.over:  # (over: the session ended, drained, and this process closed the link itself)
                    log.warning("%s", why)
                return self._call(core.closed, why, me=me.id)
            if type(mine) is not Run:
                if type(mine) is Stop:       # ERROR: the master closed our connection
                    log.warning("%s", core.why_lost)
                return mine
            task = self._run(me, mine.job)   # (outside the try: nothing a job does is a lost master)
            if type(task) is not Read:
                return task

    def _run(self, me: Runner, job):
        """Runs a job on this thread; returns this thread's next task."""
        gid = job.gid
        watched = self.deadlines.watch(gid, job.timeout) if job.timeout > 0 else None
        me.job, me.children = job, None    # (a list once the job submits a job, see track_child)
        contexts = self.contexts
        me.env = env = contexts.job_environ(job.env) if job.env else contexts.base_env
        contexts.enter(job.context, env)
        output.begin()
        call = []          # the job's arguments, let go of once its outcome is sent
        try:
            status, data = run_payload(job.payload, call, job.function)
        finally:
            printed = output.end()
            if watched is not None:
                self.deadlines.cancel(watched)
            # A job's unfinished children die with it: nobody will wait for them.
            if me.children:
                for future in me.children:
                    future.cancel()
            me.job = me.children = None
        core = self.core
        if type(data) is tuple and views_writable_memory(data):   # the next job may change what it returned
            # Its outcome goes out before the next job starts.
            with self.lock:
                core.finished(me.id, gid, status, data, printed)   # (the task it gives is Flush)
            self._send_all()
            self.link.flush(timeout=None)
            with self.lock:
                task = self._act(core.sent(me.id, gid), me.id)
        else:
            # The outcome is in the outbox, ahead of whatever the next job
            # sends: it counts as sent at once, and the token goes on (one event).
            with self.lock:
                actions = core.done(me.id, gid, status, data, printed)
                # Mostly a lone Idle for this runner: its task, with no call of _act.
                task = actions[0] if len(actions) == 1 and type(actions[0]) is Idle else self._act(actions, me.id)
        # Sent before this thread takes the reading (a reader never blocks on the socket).
        if self.exit is not None or core.over:
            self._after()
        elif core.outbox:
            self._send()
        if type(task) is Idle:         # the reading put off is ours to take, mostly (no trip through _runner)
            with self.lock:
                task = self.reading.take(me)
        return task

    # --- nested jobs (see NestedJobHooks) ----------------------------------------------

    def help_while(self, future, timeout: float | None) -> None:
        """Called when a running job waits on ``future`` (a job it submitted):
        lends this worker to the master, so that other jobs (its children,
        most likely) run here meanwhile, and takes it back once the future is
        done.  Returns after ``timeout`` seconds at most."""
        me = getattr(self.local, "runner", None)
        job = me.job if me is not None else None
        if job is None:
            return                     # not a job's thread
        with self.lock:
            if future.done():
                return
            self.reading.wake()        # the children's JOBs must be read while this job waits
            actions = self.core.lend(me.id, job.gid)
            if actions is None:
                return                 # draining or lost: no new jobs may start here
            self._act(actions, me.id)
        self._after()
        concurrent.futures.wait([future], timeout)
        task = self._call(self.core.wait_over, me.id, job.gid, me=me.id)
        while type(task) is not Resume:
            task = me.wait(self.reading)   # until the job holding the token ends or lends (and sends RECLAIM)
        self.contexts.enter(job.context, me.env)

    def signal(self, event: str) -> None:
        """A signal's event ("sigterm" or "drain") for the core, from a thread
        of its own: the handler may have interrupted code holding our locks."""
        threading.Thread(target=self._call, args=(getattr(self.core, event),), daemon=True).start()

    def track_child(self, future) -> None:
        """A future the running job submitted (see NestedJobHooks)."""
        me = getattr(self.local, "runner", None)
        if me is None or me.job is None:
            return                     # not a job's thread
        if me.children is None:
            me.children = []
        me.children.append(future)


class SignalRelay:
    """What SIGTERM and SIGUSR1 do.  They reach the current session's core
    from a thread of their own (a handler may have interrupted code holding
    the locks the core's shell needs); with no session, they end the process."""

    def __init__(self):
        self.draining = False
        self.session: Session | None = None

    def on_sigterm(self, signum, frame) -> None:
        """First SIGTERM: drain.  Second: exit now; the master re-runs the job."""
        if self.session is None and self.draining:   # a second one before the process ended
            channel.exit_now(ExitChannel.STOPPED, EXIT_NOW)
        self._forward("sigterm")

    def on_drain(self, signum, frame) -> None:
        """Finish the current job, take no other, exit (SIGUSR1 from the
        supervisor; idempotent, because SLURM may also have sent SIGTERM)."""
        self._forward("drain")

    def _forward(self, event: str) -> None:
        session = self.session
        if session is None:
            if self.draining:
                return                 # the process is on its way out
            self.draining = True
            channel.exit_channel.say(ExitChannel.DRAINED)
            raise SystemExit(0)        # not connected: nothing to finish
        self.draining = True
        session.signal(event)


def master_resolver(spec: str, port: int, connect_timeout: float):
    """A function giving the master's (host, port), asked again at every
    (re)connection: ``HOST[:PORT]``, ``slurm:NAME`` for the master of the
    SLURM cluster NAME, or ``file:PATH`` for the master that publishes its
    address there; those two may have moved since the last connection."""
    from cw.client.discovery import FILE_PREFIX, SLURM_PREFIX, resolve_master
    if spec.startswith((SLURM_PREFIX, FILE_PREFIX)):
        return lambda: resolve_master(spec, port, timeout=connect_timeout)
    address = parse_address(spec, port)
    return lambda: address


#: Seconds between two log lines of a worker still looking for its master.
WAIT_LOG_EVERY = 30.0


def run_worker(resolve, connect_timeout: float = DEFAULT_CONNECT_TIMEOUT, offer: dict | None = None,
               job_threads="cpus") -> int:
    """One worker process: connect, run jobs, reconnect; returns an exit status.
    ``offer``: this worker's machine ({"node", "resources", "gpu_ids"});
    ``job_threads``: its jobs' thread pools (cw.worker.threads.parse_policy)."""
    try:
        secret = load_secret()
    except CwError as exc:
        log.error("%s", exc)
        return EXIT_CONFIG
    contexts = ContextSwitcher(job_threads)
    functions = FunctionLRU()       # kept across connections: a new master's FUNCs are then no news
    relay = SignalRelay()
    output.install()
    signal.signal(signal.SIGTERM, relay.on_sigterm)
    signal.signal(signal.SIGUSR1, relay.on_drain)   # the supervisor's "drain"
    deadline = time.monotonic() + connect_timeout
    said_at = None               # when a failed search for the master was last logged (then every WAIT_LOG_EVERY)
    announced = False            # the search's first line said
    while not relay.draining:
        host, port = "?", "?"
        try:
            address = resolve()
            host, port = address
            if not announced:
                log.info("worker %d looking for the master at %s:%s (for up to %.0f s)", os.getpid(), host, port,
                         max(0.0, deadline - time.monotonic()))
                announced = True
            # At most 5 s an attempt, then the address is asked again: one that
            # names a host gone dark (a SLURM node that failed) hangs a connect
            # rather than refusing it, while a new master is published elsewhere.
            link = open_link(host, port, secret, {**peer_info("worker"), **(offer or {})},
                             max(1.0, min(5.0, deadline - time.monotonic())), tls.context_for(address))
        except HandshakeFailed as exc:
            if time.monotonic() > deadline:
                log.error("giving up: %s", exc)
                return EXIT_NO_MASTER
            log.warning("%s; retrying", exc)
            time.sleep(0.5)
            continue
        except BrokenCluster as exc:
            # One attempt's 5 s ran out (a host gone dark, a master not yet
            # listening): ask for the address again until the deadline.
            if time.monotonic() > deadline:
                log.error("giving up after %.0f s (--connect-timeout): %s", connect_timeout, exc)
                return EXIT_NO_MASTER
            now = time.monotonic()
            if said_at is None or now - said_at >= WAIT_LOG_EVERY:
                log.warning("%s; trying again for up to %.0f s more", exc, deadline - now)
                said_at = now
            continue
        except LookupError as exc:
            log.error("giving up: %s", exc)
            return EXIT_NO_MASTER
        except AuthenticationError as exc:
            log.error("%s", exc)
            return EXIT_CONFIG
        except CwError as exc:       # SLURM discovery failed
            log.error("giving up: %s", exc)
            return EXIT_NO_MASTER
        said_at, announced = None, False
        log.info("worker %d connected to %s:%s", os.getpid(), host, port)
        channel.exit_channel.say_ready()
        session = Session(link, contexts, functions)
        refs.REFS.attach(link, session.core)    # jobs fetch kept values through it (cw.worker.refs)
        enable_nested_jobs(str(address), port, session)
        relay.session = session
        try:
            if session.run():
                break
        finally:
            relay.session = None
            link.close()
        deadline = time.monotonic() + connect_timeout   # lost it: the same time again to find it
    log.info("worker %d drained and stops", os.getpid())
    return 0
