"""A worker's rules, with no I/O, no threads and no clock.

Everything that affects a worker's state lives in this file.  The shell
(cw.worker.session) owns the connection, the threads, the signals and the
running of payloads; it turns what happens into calls of ``WorkerCore``
methods (events) and does what they return (actions), sending the frames
the core leaves in ``outbox`` in the order they are there.  The tests drive
the core with plain calls, and a simulator can wire it to the dispatcher
and client cores under a clock of its own.

Runners.  The shell's threads are runners, named by the ints the core gives
them.  At any moment a runner is the reader (it takes frames off the
connection), runs a job (or waits inside one), or is free (it waits to be
told what to do).  Every task a runner gets comes in an action naming it.

Rules kept here:
- One job runs at a time: the one holding the token.  A job the master
  sends waits in a FIFO queue while another holds it; when the token frees
  (a job ended or lent it), the next job to hold it is a job waiting to go
  on (READY, first ready first), else the queue's head.  A job counts as
  started from the moment it leaves the queue: there is no moment between
  the two in which an ABORT or REVOKE could be lost.
- Reading is a role: a job that arrives while no job holds the token runs
  on the reader's own thread, which hands the reading to a free runner
  (Read); so the job starts without waiting for a thread to wake.  When no
  runner is free one is spawned to read.
- JOB_ENV is kept until its JOB comes.  CONTEXT (a client's working
  directory and sys.path) is kept by client; a job carries the context its
  client had when the job arrived, and an empty CONTEXT forgets the client.
- A job may name its function by digest (FUNC frames, kept in a bounded
  LRU across connections).  A job naming one this worker lacks (its LRU
  dropped it, or the worker is new to a master that thought otherwise)
  waits, and so does every job that comes after it (the master expects
  jobs to start in the order it sent them), while NEED asks the master for
  it; its FUNC lets them go on, in order.  Waiting that way they count as
  queued: REVOKE, ABORT, drain and a lost connection treat them so.
- REVOKE takes back a job still queued: REVOKED(gid, True); a job that has
  started or is unknown answers REVOKED(gid, False).
- ABORT of a queued job gives it back (REVOKED(gid, True)); of a started job
  (running, waiting on its children or ready to go on), it ends the process
  (Exit REPLACE: a thread cannot be stopped); of a job that finished, or that
  this worker never had, nothing.
- A job that waits on jobs it submitted lends the worker: LEND, and the
  token goes on as when a job ends (to a job whose wait is over, else the
  queue's head on a free runner; when it stays free, a runner is kept free
  for the next job, spawned if none is).  When its wait is over it takes
  the token back at once if free, else as soon as the job holding it ends
  or lends; either way RECLAIM is sent when it does,
  so the master sees the outcome of the job that ran meanwhile before the
  RECLAIM, and the LEND before the outcome of any job run under the loan.
  No lending while draining or after the connection is lost (the job then
  simply waits, holding the token).
- A job's end puts its OUTPUT (if it printed) and OUTCOME in the outbox;
  the job keeps the token until the shell has handed them to the
  connection (Flush, then ``sent``).  So an outcome that views memory the
  next job may change is on its way before that job starts (the shell
  waits until it is sent).  (For any other outcome the shell may call
  ``sent`` at once: the outbox keeps the frames in order.)
- A job running past its timeout (the shell tells ``deadline``) gets a
  JobTimeout OUTCOME, and the process exits (Exit REPLACE) after sending it.
- Drain (first SIGTERM, or the supervisor's SIGUSR1; idempotent): every
  queued job goes back (REVOKED(gid, True), oldest first), then DRAIN
  naming the jobs started and not finished (in the order they started); a
  JOB arriving later (sent before the master saw DRAIN) goes back too.  The
  jobs started finish; free runners stop; when none is left the session
  ends (End, drained).  A second SIGTERM while draining exits now (Exit
  STOPPED); the master re-runs the jobs this worker had.
- Frames keep their order: everything goes through ``outbox`` in the order
  the events happened, so an outcome is seen before a DRAIN or REVOKED
  emitted after it.  PONG alone is not ordered (an action, see ping).
- The connection lost (EOF, ERROR, a protocol error or silence): queued jobs
  are dropped (the master re-runs them), nothing more is sent, free runners
  stop, jobs started run to their end, and the session ends when none is
  left (End, not drained).  But a job that waits on jobs it submitted (now,
  or later: ``lend``) ends the process (Exit REPLACE): its children are
  resubmitted to whichever master comes back and need a worker, while its
  own outcome can no longer reach anyone; if every worker sat on such a
  parent, nothing would run the children.
- After Exit or End the core does nothing: every event returns [] (but
  ``closed`` still stops the reader).

API.  Events from the master, which the reader calls: ``receive(ftype,
body)`` decodes a frame (``decode``) and calls one of ``job``, ``job_env``,
``context``, ``ping``, ``revoke``, ``abort``, or ``closed`` (for ERROR);
``closed(why)`` when the connection ends.  Local events: ``start()`` (the
session begins), ``finished(runner, gid, status, data, printed)``,
``sent(runner, gid)`` (or both at once: ``done``), ``lend(runner, gid)``, ``wait_over(runner, gid)``,
``drain()``, ``sigterm()``, ``deadline(gid)``.  Each returns a list of
actions (cw.worker.actions); the caller's own next task, if any, is among
them.  Frames to send accumulate in ``outbox``, a deque the shell may pop
from while events append; ``jobs`` maps the gids of started jobs to their
``Job``.
"""
from __future__ import annotations

from collections import deque

from cw.errors import JobTimeout, ProtocolError
from cw.wire import frames
from cw.wire.frames import Frame
from cw.wire.payload import error_outcome
from cw.worker import refs
from cw.worker.actions import End, Exit, Flush, Idle, Pong, Read, Resume, Run, Spawn, Stop
from cw.worker.channel import ExitChannel
from cw.worker.functions import FunctionLRU

__all__ = ["End", "Exit", "Flush", "Idle", "Job", "Pong", "Read", "Resume", "Run", "Spawn", "Stop", "WorkerCore",
           "decode"]

RUNNING = "running"    # holds the token
WAITING = "waiting"    # lent the worker; waits on jobs it submitted
READY = "ready"        # its wait is over; waits for the token

_PARENT_ORPHANED = ("the master was lost while a job waited on jobs it submitted: this process makes way for "
                    "a fresh one (the job runs again once a master is back; its children need a worker)")
SENDING = "sending"    # finished; holds the token until its outcome is sent
#: Builds an action from a tuple of its fields: half the cost of calling its
#: NamedTuple class, for the actions every job makes (Run, Read, Idle).
_new = tuple.__new__


class Job:
    """A job the master sent.  ``context`` is its client's context when it
    arrived (or None), ``env`` the variables its JOB_ENV set (or None),
    ``function`` the FunctionEntry its payload names (or None; its digest
    while that has not come)."""

    __slots__ = ("context", "ctx", "env", "function", "gid", "payload", "runner", "state", "timeout")

    def __init__(self, gid: int, ctx: int, timeout: float, payload, env: dict | None, context: dict | None):
        self.gid = gid
        self.ctx = ctx
        self.timeout = timeout
        self.payload = payload
        self.env = env
        self.context = context
        self.function = None
        self.runner: int | None = None
        self.state: str | None = None

    def __repr__(self) -> str:
        return f"Job({self.gid}, {self.state or 'queued'})"


#: The kinds as plain ints: looking up an IntEnum member costs more than comparing it.
_JOB, _JOB_ENV, _CONTEXT, _FUNC, _PING, _REVOKE, _ABORT, _ERROR = map(int, (
    Frame.JOB, Frame.JOB_ENV, Frame.CONTEXT, Frame.FUNC, Frame.PING, Frame.REVOKE, Frame.ABORT, Frame.ERROR))


def decode(ftype: int, body) -> tuple:
    """A frame from the master as ``(event, args)``: ``event(core, *args)``
    feeds it to a core.  (Pure, so a shell can decode before it takes the
    lock it holds around its core.)  Raises ProtocolError for a frame a
    worker cannot get or cannot decode (the shell then calls ``closed``)."""
    if ftype == _JOB:
        return WorkerCore.job, frames.decode_job(body)
    if ftype == _JOB_ENV:
        return WorkerCore.job_env, frames.decode_job_env(body)
    if ftype == _CONTEXT:
        return WorkerCore.context, frames.decode_context_for_worker(body)
    if ftype == _FUNC:
        return WorkerCore.function, frames.decode_function(body)
    if ftype == _PING:
        return WorkerCore.ping, ()
    if ftype == _REVOKE:
        return WorkerCore.revoke, (frames.decode_revoke(body),)
    if ftype == _ABORT:
        return WorkerCore.abort, (frames.decode_abort(body),)
    if ftype == _ERROR:
        return WorkerCore.closed, ("the master closed our connection: " + frames.decode_error(body),)
    if ftype in refs.FRAMES:              # kept values: no business of the core (cw.worker.refs)
        return refs.on_frame, (ftype, body)
    raise ProtocolError(f"the master sent an unexpected {frames.kind_name(ftype)} frame")


class WorkerCore:
    """The state of one worker's session with one master (see the module's docstring)."""

    def __init__(self, pid: int = 0, functions: FunctionLRU | None = None):
        self.pid = pid                      # named in the messages of timed-out jobs
        self.outbox: deque = deque()
        self.queue: deque[Job] = deque()    # jobs not started, in the order they came
        self.functions = functions if functions is not None else FunctionLRU()
        self.stalled: deque[Job] = deque()  # jobs behind one whose function has not come
        self.asked: set[bytes] = set()      # digests asked for (NEED) and not come yet
        self.jobs: dict[int, Job] = {}      # started jobs not yet done with, by gid
        self.holder: int | None = None      # gid of the job holding the token
        self.ready: deque[int] = deque()    # gids of jobs whose wait is over, waiting for the token
        self.envs: dict[int, dict] = {}     # gid -> env from its JOB_ENV, until its JOB comes
        self.contexts: dict[int, dict] = {}  # client id -> its context
        self.reader: int | None = None
        self.free: list[int] = []           # runners waiting for a task (the last freed goes first)
        self.runners = 0                    # runners spawned so far (their ids are 0 ..)
        self.draining = False
        self.lost = False
        self.over = False                   # after End or Exit: nothing more happens
        self.why_lost = ""

    # --- the session ---------------------------------------------------------

    def start(self) -> list:
        """The session begins: a reader, and a free runner for the reader to
        hand its role to when a job comes."""
        reader, spare = self._spawn(), self._spawn()
        self.reader = reader
        self.free.append(spare)
        return [Spawn(reader), Read(reader), Spawn(spare)]

    def _spawn(self) -> int:
        runner = self.runners
        self.runners += 1
        return runner

    # --- frames from the master ------------------------------------------------

    def receive(self, ftype: int, body) -> list:
        """One frame from the master (see ``decode``)."""
        event, args = decode(ftype, body)
        return event(self, *args)

    def job(self, gid: int, ctx: int, timeout: float, payload) -> list:
        if self.over or self.lost:
            return []
        env = self.envs.pop(gid, None)
        if self.draining:                  # sent before the master saw our DRAIN
            self.outbox.append(frames.encode_revoked(gid, True))
            return []
        job = Job(gid, ctx, timeout, payload, env, self.contexts.get(ctx))
        digest = frames.function_digest(payload)
        if digest is not None:
            job.function = self.functions.get(digest)
            if job.function is None:
                job.function = digest
                self._ask(digest)
                self.stalled.append(job)
                return []
        if self.stalled:
            self.stalled.append(job)
            return []
        return self._admit(job)

    def _ask(self, digest: bytes) -> None:
        if digest not in self.asked:
            self.asked.add(digest)
            self.outbox.append(frames.encode_need(digest))

    def function(self, digest: bytes, data: bytes) -> list:
        """A function jobs name by ``digest`` (FUNC): the jobs that waited for it go on."""
        self.functions.put(digest, data)
        self.asked.discard(digest)
        if self.over or self.lost:
            return []
        return self._unstall()

    def _unstall(self) -> list:
        """Admits waiting jobs, in order, up to the first whose function has not come."""
        actions: list = []
        stalled = self.stalled
        while stalled:
            job = stalled[0]
            if type(job.function) is bytes:
                entry = self.functions.get(job.function)
                if entry is None:
                    self._ask(job.function)    # (asked already, unless the LRU let it go meanwhile)
                    break
                job.function = entry
            stalled.popleft()
            actions += self._admit(job)
        return actions

    def _admit(self, job: Job) -> list:
        """A job that may start: now if the token is free, else after those queued."""
        if self.holder is not None:        # (while the token is free, nothing is queued)
            self.queue.append(job)
            return []
        # Nothing holds the token: the reader runs the job itself, and a free
        # runner (or a new one) takes the reading over.
        reader = self.reader
        actions: list = [self._start(job, reader)]
        if self.free:
            self.reader = self.free.pop()
        else:
            self.reader = self._spawn()
            actions.append(Spawn(self.reader))
        actions.append(_new(Read, (self.reader,)))
        return actions

    def job_env(self, gid: int, env: dict) -> list:
        if not (self.over or self.lost):
            self.envs[gid] = env
        return []

    def context(self, ctx: int, context: dict) -> list:
        if context:
            self.contexts[ctx] = context
        else:
            self.contexts.pop(ctx, None)        # the client left
        return []

    def ping(self) -> list:
        return [] if self.over or self.lost else [Pong()]

    def revoke(self, gid: int) -> list:
        if self.over or self.lost:
            return []
        given_back = self._take_back(gid)
        self.outbox.append(frames.encode_revoked(gid, given_back))
        return self._unstall() if given_back and self.stalled else []

    def abort(self, gid: int) -> list:
        if self.over or self.lost:
            return []
        if self._take_back(gid):               # not started: hand it back, nothing to stop
            self.outbox.append(frames.encode_revoked(gid, True))
            return self._unstall() if self.stalled else []
        job = self.jobs.get(gid)
        if job is None or job.state == SENDING:
            return []                           # finished already
        return self._exit(ExitChannel.REPLACE,
                          f"job {gid} was cancelled by its client; this worker process is replaced")

    def closed(self, why: str = "") -> list:
        """The connection is over (or the reader gave up on it)."""
        reader = self.reader
        if self.over:
            return [Stop(reader)] if reader is not None else []
        self.lost = True
        self.why_lost = why
        self.queue.clear()
        self.stalled.clear()
        self.asked.clear()
        self.envs.clear()
        self.reader = None
        actions: list = [Stop(reader)] if reader is not None else []
        if any(job.state in (WAITING, READY) for job in self.jobs.values()):
            return actions + self._exit(ExitChannel.REPLACE, _PARENT_ORPHANED)
        return actions + self._check_end()

    def _take_back(self, gid: int) -> bool:
        for waiting in (self.queue, self.stalled):
            for job in waiting:
                if job.gid == gid:
                    waiting.remove(job)
                    return True
        return False

    # --- local events ------------------------------------------------------------

    def finished(self, runner: int, gid: int, status: int, data, printed: str = "") -> list:
        """The job ``gid`` that ``runner`` ran ended: ``status`` and ``data`` are its
        outcome, ``printed`` its output.  The runner is to send them (Flush)."""
        if self.over:
            return []
        self._queue_outcome(gid, status, data, printed)
        self.jobs[gid].state = SENDING
        return [Flush(runner, gid)]

    def sent(self, runner: int, gid: int) -> list:
        """The outcome of ``gid`` (see ``finished``) went to the connection."""
        if self.over:
            return []
        return self._release(runner, gid)

    def done(self, runner: int, gid: int, status: int, data, printed: str = "") -> list:
        """``finished`` and ``sent`` at once, for an outcome that views no
        memory the next job could change: in the outbox, ahead of whatever
        the next job sends, it counts as sent (the common case, one event per job)."""
        if self.over:
            return []
        self._queue_outcome(gid, status, data, printed)
        return self._release(runner, gid)

    def _queue_outcome(self, gid: int, status: int, data, printed: str) -> None:
        if not self.lost:           # (a lost connection's outcomes have nowhere to go)
            if printed:
                self.outbox.append(frames.encode_output(gid, printed))
            self.outbox.append(frames.encode_outcome(gid, status, data))

    def lend(self, runner: int, gid: int) -> list | None:
        """The running job ``gid`` waits on a job it submitted.  Returns None
        when it may not lend the worker (it then waits holding the token),
        else the actions; the caller goes on to wait (no task for it).  Once
        the connection is lost, the process ends instead (see the rules)."""
        if not self.over and self.lost and self.holder == gid:
            return self._exit(ExitChannel.REPLACE, _PARENT_ORPHANED)
        if self.over or self.lost or self.draining or self.holder != gid:
            return None
        self.jobs[gid].state = WAITING
        self.holder = None
        self.outbox.append(frames.LEND_FRAME)
        actions = self._pass_token()
        if self.holder is None and not self.free:   # a runner for the next job, the lender's being taken
            spare = self._spawn()
            self.free.append(spare)
            actions.append(Spawn(spare))
        return actions

    def wait_over(self, runner: int, gid: int) -> list:
        """The job ``gid`` (waiting after ``lend``) is done waiting: it goes on
        at once (Resume) if the token is free, else later (Idle meanwhile)."""
        if self.over:
            return []
        job = self.jobs[gid]
        if self.holder is None:
            return [self._resume(job)]
        job.state = READY
        self.ready.append(gid)
        return [Idle(runner)]

    def drain(self) -> list:
        """Finish the jobs started, start no other, then end (idempotent)."""
        if self.over or self.draining:
            return []
        self.draining = True
        if self.lost:
            return self._check_end()
        for job in (*self.queue, *self.stalled):
            self.outbox.append(frames.encode_revoked(job.gid, True))
        self.queue.clear()
        self.stalled.clear()
        self.outbox.append(frames.encode_drain([gid for gid, job in self.jobs.items() if job.state != SENDING]))
        return self._check_end()

    def sigterm(self) -> list:
        """First SIGTERM: drain.  Second (or after SIGUSR1): exit now."""
        if self.over:
            return []
        if self.draining:
            return self._exit(ExitChannel.STOPPED, "a second SIGTERM: stopping now")
        return self.drain()

    def deadline(self, gid: int) -> list:
        """The timeout of job ``gid`` has passed since it started."""
        job = self.jobs.get(gid)
        if self.over or job is None or job.state == SENDING:
            return []                           # it finished in time
        if not self.lost:
            status, data = error_outcome(JobTimeout(
                f"job stopped after its timeout of {job.timeout:g} s on worker pid {self.pid}; the worker "
                "process was replaced. Raise the timeout if the job needs longer"))
            self.outbox.append(frames.encode_outcome(gid, status, data))
        return self._exit(ExitChannel.REPLACE, f"job {gid} ran past its timeout of {job.timeout:g} s")

    # --- the token -----------------------------------------------------------------

    def _start(self, job: Job, runner: int) -> Run:
        job.state = RUNNING
        job.runner = runner
        self.holder = job.gid
        self.jobs[job.gid] = job
        return _new(Run, (runner, job))

    def _resume(self, job: Job) -> Resume:
        job.state = RUNNING
        self.holder = job.gid
        if not self.lost:
            self.outbox.append(frames.RECLAIM_FRAME)
        return Resume(job.runner, job.gid)

    def _pass_token(self) -> list:
        """The token is free: to a job whose wait is over, else to the queue's
        head on a free runner (a new one if none is)."""
        if self.ready:
            return [self._resume(self.jobs[self.ready.popleft()])]
        if self.queue:
            if self.free:
                return [self._start(self.queue.popleft(), self.free.pop())]
            runner = self._spawn()
            return [Spawn(runner), self._start(self.queue.popleft(), runner)]
        return []

    def _release(self, runner: int, gid: int) -> list:
        """``runner``'s job ``gid`` is done with: the token goes on; the runner
        runs the next queued job itself, or is free (or stops, the session ending)."""
        del self.jobs[gid]
        self.holder = None
        if self.ready:
            actions = [self._resume(self.jobs[self.ready.popleft()])]
        elif self.queue:
            return [self._start(self.queue.popleft(), runner)]
        else:
            actions = []
        if self.lost or self.draining:
            actions.append(Stop(runner))
            return actions + self._check_end()
        self.free.append(runner)
        actions.append(_new(Idle, (runner,)))
        return actions

    def _check_end(self) -> list:
        """Once lost or draining: free runners stop, and with no job left the session ends."""
        actions = [Stop(runner) for runner in self.free]
        self.free.clear()
        if not self.jobs:
            self.over = True
            actions.append(End(drained=not self.lost))
        return actions

    def _exit(self, reason: str, why: str) -> list:
        self.over = True
        return [Exit(reason, why)]
