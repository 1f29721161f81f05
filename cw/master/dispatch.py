"""The master's scheduling state, with no I/O.

Every routing decision lives here, with the books it consults in
cw.master.placement (machines, limits, reservations), the records in
cw.master.records and the status report in cw.master.report.  The master's
asyncio shell turns what peers send into calls of ``Dispatcher`` methods
(events) and writes what the dispatcher leaves in ``outbox``: pairs of
``(peer id, frame)`` where a frame is ``bytes`` or a ``(head, payload)``
tuple.  Tests drive it with plain calls and read the outbox, no sockets.
Its only clock is the one it is given.

Rules kept here:
- Fair share: idle workers take jobs from the clients in turn, by weight
  (cw.master.fairshare), so one client's 100,000 queued jobs do not starve
  another's ten.
- Within a client, higher priority first, FIFO among equal priorities.
- A job may ask for resources, carry a tag whose running jobs are limited
  cluster-wide, or name the workers it may run on: it goes first-fit to an
  idle worker whose machine has room, never beyond what a machine offers,
  and one that cannot fit now keeps a machine for itself until it fits
  (cw.master.placement).  One that no connected machine could ever run
  fails after ``unplaceable_timeout`` (cw.master.unplaceable).
- A worker is sent up to ``slots`` jobs (default 2): the one it runs and
  the next, sent ahead (only jobs that ask for nothing more); twice as many
  while its jobs are quick (cw.master.slots).  A job sent
  ahead is asked back (REVOKE) for a worker that falls idle, or for a more
  urgent job of its client, which takes its place without using a turn
  (cw.master.outrank): no job waits behind a long one while a worker is
  free, and jobs start in priority order.  A REVOKE unanswered for
  ``revoke_timeout`` costs the worker the job (cw.master.slots).
- A job that waits for jobs it submitted lends its worker (LEND): the
  worker counts as free and runs other jobs meanwhile, until it says
  RECLAIM.  So trees of jobs far deeper than the cluster is wide complete.
- A client that is behind on reading its results is paused: its jobs wait
  until it catches up, so its results cannot pile up in the master.
- A result goes only to the client that submitted the job, exactly once.
  A worker may only report a job it runs; anything else is a protocol
  error that costs the worker its connection.
- A worker that leaves gives its jobs back to the head of their clients'
  queues; the ones it was running count as an attempt, and after
  ``max_attempts`` workers died running it, a job fails with LOST.  A
  draining worker finishes its job and gets no other.
- Cancelling a queued job removes it; cancelling a running job aborts it on
  its worker (the worker process is replaced) and drops its result.
- A client that leaves has its queued jobs dropped and its running jobs
  aborted.
- Before a worker's first job of some client it gets that client's CONTEXT
  (working directory and sys.path); when the client leaves it is told to
  forget it (an empty context).
- A job may name its function by digest (cw.master.functions): its client
  must have sent that function (FUNC) first.  Before a worker's first job
  naming a function, the worker gets its FUNC; a worker that asks for one
  it lacks (NEED) gets it again, if some client still holds it (else the
  job that needs it is being aborted).
"""
from __future__ import annotations

import itertools
import json
import time

from cw import settings
from cw.errors import ProtocolError
from cw.master import report
from cw.master.fairshare import FairShare
from cw.master.functions import FunctionStore
from cw.master.kept import KeptValues
from cw.master.outrank import Outrank
from cw.master.placement import Placement
from cw.master.records import DONE, QUEUED, RUNNING, ClientRecord, Job, JobQueue, WorkerRecord
from cw.master.slots import Slots
from cw.master.unplaceable import Unplaceable
from cw.wire import frames
from cw.wire import kept as kept_wire
from cw.wire.frames import Status
from cw.wire.options import DEFAULT_RETRIES

__all__ = ["DEFAULT_MAX_ATTEMPTS", "DEFAULT_RETRIES", "Dispatcher"]

DEFAULT_MAX_ATTEMPTS = settings.MAX_ATTEMPTS
_QUICK_JOB = settings.QUICK_JOB
_NAMED = bytes([frames.FUNCTION_MARK])   # the first byte of a payload that names its function by digest
_OK = int(Status.OK)     # (a Status member costs a class attribute lookup: once per job is enough to matter)


class Dispatcher:
    MAX_SETUPS = 64
    events = None    # a cw.master.events.EventFeed while some client watches jobs start and end

    def __init__(self, max_attempts: int = DEFAULT_MAX_ATTEMPTS, clock=time.monotonic,
                 slots: int = settings.WORKER_SLOTS, unplaceable_timeout: float = settings.UNPLACEABLE_TIMEOUT,
                 revoke_timeout: float = settings.REVOKE_TIMEOUT, kept_bytes: int = settings.KEPT_BYTES):
        self.max_attempts = max_attempts
        self.clock = clock
        self.started = clock()
        self.outbox: list = []
        self.clients: dict[int, ClientRecord] = {}
        self.workers: dict[int, WorkerRecord] = {}
        self.placement = Placement(self.workers)
        self.slots = Slots(self.workers, slots, self.placement, revoke_timeout)
        self.outrank = Outrank(self.workers, self.slots)
        self.turns = FairShare(self.clients)
        self.unplaceable = Unplaceable(self.placement, clock, unplaceable_timeout)
        self.queued = 0
        self._setup_queue = JobQueue(None)  # what setup jobs count as: plain
        self.throughput = report.Throughput()
        self.setups: list = []              # payloads every worker that connects runs first
        self.functions = FunctionStore()
        self.kept = KeptValues(self, kept_bytes)     # puts, and outcomes jobs take as arguments
        # Ids of jobs sent to workers: a job sent again gets a new one, so a
        # late word about an earlier sending can never match it.
        self._gids = itertools.count(1)

    # --- peers come and go ------------------------------------------------

    def add_client(self, cid: int, info: dict) -> None:
        client = self.clients[cid] = ClientRecord(cid, info)
        client.functions = self.functions.held_by(cid)

    def set_context(self, cid: int, context_json: bytes) -> None:
        frames.decode_json(context_json, "CONTEXT")  # refuse garbage before workers see it
        self.clients[cid].context = bytes(context_json)
        for worker in self.workers.values():
            worker.contexts.discard(cid)   # a changed context goes out again

    def remove_client(self, cid: int) -> None:
        client = self.clients.pop(cid, None)
        if client is None:
            return                         # its turn, if any, is skipped
        for job in client.jobs.values():
            if job.state == QUEUED:
                self._drop_queued(job)
            else:
                self._abort(job)
        client.jobs.clear()
        client.queues.clear()
        self.functions.drop_client(cid)
        self.kept.drop_client(cid)
        forget = frames.encode_context_for_worker(cid, b"{}")
        for worker in self.workers.values():
            if cid in worker.contexts:
                worker.contexts.discard(cid)
                self.outbox.append((worker.wid, forget))

    def pause_client(self, cid: int) -> None:
        """The client is not reading its results fast enough: its jobs wait."""
        client = self.clients.get(cid)
        if client is not None:
            client.paused = True          # its turn, if any, is skipped

    def resume_client(self, cid: int) -> None:
        client = self.clients.get(cid)
        if client is not None and client.paused:
            client.paused = False
            self.turns.add(client)
            self._pump()

    def add_function(self, cid: int, digest: bytes, data: bytes) -> None:
        """A function the client's jobs will name by ``digest`` (FUNC)."""
        self.functions.add(cid, digest, data)

    def forget_function(self, cid: int, digest: bytes) -> None:
        """The client's jobs will not name ``digest`` again (FORGET)."""
        self.functions.forget(cid, digest)

    def put(self, cid: int, put) -> None:
        """A value the client keeps here (PUT, see cw.master.kept)."""
        self.kept.put(cid, put)

    def need(self, wid: int, digest: bytes) -> None:
        """The worker lacks a function a job it was sent names (NEED)."""
        frame = self.functions.needed_by(self.workers[wid].functions, digest)
        if frame is not None:     # else no client holds it: the job naming it is being aborted
            self.outbox.append((wid, frame))

    def add_worker(self, wid: int, info: dict) -> None:
        node = self.placement.join(wid, info)
        worker = self.workers[wid] = WorkerRecord(wid, info, self.clock(), node)
        self.unplaceable.epoch += 1
        for payload in self.setups:
            self._send_setup(worker, payload)
        self.kept.worker_joined(worker)
        self.slots.file(worker)
        self.turns.add_all()
        self._pump()

    def add_setup(self, payload) -> None:
        """A job for every worker that connects from now on, before any other
        (a sticky ``install``).  Workers connected now got it from the client."""
        if len(self.setups) >= self.MAX_SETUPS:
            raise ProtocolError(f"more than {self.MAX_SETUPS} setup jobs; restart the master to clear them")
        self.setups.append(bytes(payload))

    def drain_worker(self, wid: int, started=()) -> None:
        """The worker finishes the jobs it has started (``started``: their
        gids) and takes no other (it is stopping).  It gives back (REVOKED)
        every job sent ahead; a JOB that crossed its DRAIN comes back too,
        or, if the worker is gone first, goes back to its queue with no
        attempt counted: the worker said it never started it."""
        worker = self.workers.get(wid)
        if worker is not None:
            worker.draining = True
            worker.drain_started = frozenset(started)
            self.unplaceable.epoch += 1
            self.slots.file(worker)
            self._recheck()

    def remove_worker(self, wid: int) -> None:
        worker = self.workers.pop(wid, None)
        if worker is None:
            return
        self.unplaceable.epoch += 1
        self.kept.worker_left(wid)
        self.slots.left(worker)
        # Back to the heads of their queues in the order they were sent; only
        # those it had started count as an attempt.
        jobs, started = list(worker.jobs), worker.started()
        for job in jobs:
            self._leave(worker, job)
        self.placement.leave(worker)
        for job in reversed(jobs[len(started):]):
            job.attempts -= 1
            self._requeue(job)
        for job in reversed(started):   # each goes to the front: the first sent ends up first
            self._job_lost(job, worker)
        self._recheck()
        self._pump()

    # --- jobs ---------------------------------------------------------------

    def submit(self, cid: int, jobid: int, retries: int, timeout: float, payload, priority: int = 0,
               options: dict | None = None) -> None:
        """A job; ``options`` as cw.wire.options normalises them (None or {} for none)."""
        client = self.clients[cid]
        if jobid in client.jobs:
            raise ProtocolError(f"the client submitted job id {jobid} twice")
        if payload[:1] == _NAMED and frames.function_digest(payload) not in client.functions:
            raise ProtocolError(f"the client's job {jobid} names a function it did not send (FUNC) or forgot "
                                "(FORGET); the client's cw differs from the master's: install the same version")
        max_attempts = self.max_attempts if retries == DEFAULT_RETRIES else retries + 1
        queue = client.queue_for(options) if options else client.plain
        job = Job(client, jobid, payload, max_attempts, timeout, priority, queue)
        client.add(job)
        self.queued += 1
        if queue.key is not None:
            self._tell(client.cid, self.unplaceable.check(client, queue, job))   # even while all are busy
        if not client.in_ready:
            self.turns.add(client)
        if self.slots.idle or self.slots.spare:
            self._pump()
        if priority != client.floor:       # rare: most clients submit at one priority
            self.outbox += self.outrank.submitted(client, job, self.clock())

    def set_limit(self, tag: str, limit: int | None) -> None:
        """At most ``limit`` jobs tagged ``tag`` run at once (None: no limit)."""
        self.placement.tags.set(tag, limit)
        self.turns.add_all()
        self._pump()

    def cancel(self, cid: int, jobid: int) -> None:
        kept = self.kept
        if kept.held and kept.cancel(cid, jobid):
            return                         # it waited for kept values (cw.master.kept)
        client = self.clients[cid]
        job = client.jobs.pop(jobid, None)
        if job is None:
            # Finished already: its result is on the way, and the client drops it.
            self.outbox.append((cid, frames.encode_cancelled(jobid, False)))
            return
        if job.state == QUEUED:
            self._drop_queued(job)
        else:
            self._abort(job)
        self.outbox.append((cid, frames.encode_cancelled(jobid, True)))
        if kept.uses or kept.wanted:
            kept.finished(cid, jobid, Status.DEPENDENCY_CANCELLED, kept_wire.cancelled_payload(jobid))

    def outcome(self, wid: int, gid: int, status: int, payload) -> None:
        worker = self.workers[wid]
        job = worker.running_job(gid)
        if job is None:
            raise ProtocolError(f"the worker sent an outcome for job {gid}, which it was not running")
        if self.events is not None:
            self.events.ended(job, worker, status, payload)
        self._leave(worker, job)
        worker.done += 1
        if status != _OK:
            worker.failures += 1
        now = self.clock()
        self.throughput.count(now)
        worker.quick = worker.quick + 1 if now - worker.last_end < _QUICK_JOB else 0
        worker.last_end = now
        self.slots.file(worker)
        if job.client is None:
            job.state = DONE
        else:
            self._finish(job, status, worker.label, payload)
        self._pump()

    def output(self, wid: int, gid: int, text: bytes) -> None:
        """What a job printed (it comes just before its outcome): on to its client."""
        worker = self.workers[wid]
        job = worker.running_job(gid)
        if job is None:
            raise ProtocolError(f"the worker sent output of job {gid}, which it was not running")
        if self.events is not None:
            self.events.output(job, worker, text)
        if job.client is not None:
            text = text[:4 * settings.MAX_JOB_OUTPUT + 256]   # the worker bounds it; a bad one cannot make us keep more
            self.outbox.append((job.client.cid, frames.encode_output_for_client(job.jobid, worker.label, text)))

    def revoked(self, wid: int, gid: int, given_back: bool) -> None:
        """The worker answers a REVOKE, or gives back a job sent ahead that it was told to ABORT."""
        worker = self.workers[wid]
        swap = self.slots.answered(worker, gid)
        job = next((j for j in worker.jobs if j.gid == gid), None)
        if given_back:
            # The worker knows best: even the job we took for its running one
            # (its outcome for the one before came first) may not have started.
            if job is None:
                raise ProtocolError(f"the worker gave back job {gid}, which it did not have")
            self._leave(worker, job)
            job.attempts -= 1
            self._requeue(job)
        elif job is not None:
            job.pinned = True             # it started: asking again cannot get it back
        self.slots.file(worker)
        if swap and given_back and job.client is not None and not job.client.paused:
            picked = self._pick(job.client)   # its place: the client's most urgent job, on the turn it gave back
            if picked is not None:
                self._assign(*picked)
        self._pump()

    def lend(self, wid: int) -> None:
        """The worker's running job waits for jobs it submitted: run others meanwhile."""
        worker = self.workers[wid]
        if worker.lent >= len(worker.jobs):
            raise ProtocolError("the worker lent a slot without a running job to lend it")
        worker.lent += 1
        if len(worker.jobs) > worker.lent:
            worker.jobs[worker.lent].state = RUNNING     # the worker starts the job sent ahead
            if self.events is not None:
                self.events.started(worker.jobs[worker.lent], worker)
        self.slots.file(worker)
        self._pump()

    def reclaim(self, wid: int) -> None:
        """A job that waited on its children runs again."""
        worker = self.workers[wid]
        if worker.lent == 0:
            raise ProtocolError("the worker reclaimed a slot it had not lent")
        worker.lent -= 1
        self.slots.file(worker)

    def expire(self) -> None:
        """Fails jobs no connected worker could run for ``unplaceable_timeout``;
        takes held jobs whose REVOKE is overdue (the master calls this often)."""
        self.unplaceable.expire(self.clients.values(), self._fail_unplaceable)
        for job in self.slots.forsake_overdue(self.clock()):
            job.attempts -= 1         # it may never have started there
            self._requeue(job)
        self._pump()

    def status(self) -> dict:
        return report.status(self)

    # --- a job's way to a worker and back -----------------------------------

    def _send_setup(self, worker: WorkerRecord, payload: bytes) -> None:
        job = Job(None, 0, payload, 1, 0.0, 0, self._setup_queue)
        job.pinned = True                # never handed to another worker
        job.attempts = 1
        worker.take(job, next(self._gids))
        self.outbox.append((worker.wid, frames.encode_job(job.gid, 0, 0.0, payload)))

    def _assign(self, job: Job, worker: WorkerRecord, growth: dict) -> None:
        client = job.client
        queue = job.queue
        queue.pop_head()
        if queue.key is not None:          # (plain jobs are never found unplaceable)
            self.unplaceable.placed(client, queue)
        self.queued -= 1
        client.queued -= 1
        env = self.placement.book(worker, job, growth)
        outbox = self.outbox
        cid = client.cid
        if cid not in worker.contexts:
            worker.contexts.add(cid)
            outbox.append((worker.wid, frames.encode_context_for_worker(cid, client.context)))
        job.attempts += 1
        worker.take(job, next(self._gids))   # not before: queued jobs carry no id of their own (B5 counts bytes)
        if self.events is not None and job.state == RUNNING:
            self.events.started(job, worker)
        self.slots.file(worker)
        if client.held is not None:
            self.outrank.sent_ahead(job)
        if env is not None:
            outbox.append((worker.wid, frames.encode_job_env(job.gid, env)))
        if self.kept.uses:
            self.kept.before_job(worker, cid, job.jobid)
        payload = job.payload
        if payload[:1] == _NAMED and (digest := frames.function_digest(payload)) not in worker.functions:
            outbox.append((worker.wid, self.functions.for_worker(worker.functions, digest)))   # its first such job
        outbox.append((worker.wid, frames.encode_job(job.gid, cid, job.timeout, payload)))

    def _leave(self, worker: WorkerRecord, job: Job) -> None:
        """``job`` is no longer at ``worker``, which starts the next one, if any."""
        worker.give_up(job)
        self.placement.release(worker, job)
        if worker.jobs:
            worker.jobs[0].state = RUNNING
            if self.events is not None:
                self.events.started(worker.jobs[0], worker)

    def _job_lost(self, job: Job, worker: WorkerRecord) -> None:
        job.lost_on = (job.lost_on or ()) + (worker.label.decode("utf-8", "replace"),)
        worker.failures += 1
        if self.events is not None:
            self.events.ended(job, worker, Status.LOST)
        if job.client is not None and job.attempts >= job.max_attempts:
            body = json.dumps({"attempts": job.attempts, "workers": list(job.lost_on)}).encode()
            self._finish(job, Status.LOST, worker.label, body)
        else:
            self._requeue(job)

    def _requeue(self, job: Job) -> None:
        """A job that had gone to a worker waits again (unless nobody wants it)."""
        client = job.client
        if client is None:
            job.state = DONE
            job.worker = None
            return
        client.requeue(job)
        self.queued += 1
        self.turns.add(client)

    def _drop_queued(self, job: Job) -> None:
        job.client.drop(job)
        self.queued -= 1

    def _abort(self, job: Job) -> None:
        """Nobody wants this job's result: its worker stops it if it runs, or
        gives it back (REVOKED) if it has not started it."""
        job.client = None
        self.outbox.append((job.worker.wid, frames.encode_abort(job.gid)))

    def _finish(self, job: Job, status: int, label: bytes, payload) -> None:
        client = job.client
        client.finish(job, status == _OK)
        self.outbox.append((client.cid, frames.encode_result(job.jobid, status, label, payload)))
        kept = self.kept
        if kept.uses or kept.wanted:
            kept.finished(client.cid, job.jobid, status, payload)

    # --- which job goes where -------------------------------------------------

    def _pump(self) -> None:
        """Hands queued jobs to workers, idle ones first, the clients taking
        turns; then lets idle workers take over jobs sent ahead to busy ones."""
        slots, turns = self.slots, self.turns
        idle, spare, ready = slots.idle, slots.spare, turns.ready
        blocked = []
        while ready and (idle or spare):
            client = turns.pop()
            if client is None:
                continue                   # it left, or is paused
            picked = self._pick(client)
            if picked is None:
                if client.queued:
                    blocked.append(client)  # nothing of it fits now; its turn comes back below
                continue
            self._assign(*picked)
            turns.served(client)
        if not ready and slots.donors:
            for donor in slots.steal(self.clock):
                self.outbox.append((donor.wid, frames.encode_revoke(donor.revoking)))
        for client in blocked:
            turns.add(client)

    def _pick(self, client: ClientRecord):
        """(job, worker, growth): the client's best job that can go now."""
        queues = client.queues
        find = self.placement.find
        idle, spare = self.slots.idle, self.slots.spare
        if len(queues) == 1:
            queue = client.plain
            job = queue.head()
            if job is None:
                return None
            found = find(queue, job, idle, spare)
            return None if found is None else (job, *found)
        heads = []
        for key, queue in list(queues.items()):
            job = queue.head()
            if job is None:
                if key is not None:
                    del queues[key]
                continue
            heads.append((-job.priority, job.jobid, queue, job))   # the client's ids grow: FIFO
        heads.sort(key=lambda h: h[:2])
        first = True
        for _, _, queue, job in heads:
            found = find(queue, job, idle, spare)
            if found is not None:
                return (job, *found)
            if queue.key is not None:
                # If no connected worker could ever run it, say so; else keep
                # a machine free for the client's most urgent job.
                self._tell(client.cid, self.unplaceable.check(client, queue, job))
                if queue.reason is None and first:
                    self.placement.reserve(queue, job)
            first = False
        return None

    # --- jobs no connected worker could run ------------------------------------

    def _tell(self, cid: int, notice: bytes | None) -> None:
        if notice is not None:
            self.outbox.append((cid, notice))

    def _recheck(self) -> None:
        """Workers left or drain: jobs only they could run are told so now."""
        self.outbox += self.unplaceable.recheck(self.clients.values())

    def _fail_unplaceable(self, client: ClientRecord, job: Job, reason: bytes) -> None:
        self.queued -= 1
        client.queued -= 1
        self._finish(job, Status.UNPLACEABLE, b"master:0", reason)
