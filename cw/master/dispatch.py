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
- Fair share: idle workers take jobs from the clients in turn.  Each client
  has a virtual clock that advances by 1/weight per job it is given; the
  client with the earliest clock goes next, so one client's 100,000 queued
  jobs do not starve another's ten, and a client of weight 2 gets twice the
  share of one of weight 1.  A client that comes back after a pause starts
  at the current clock, not with credit for the time it was away.
- Within a client, higher priority first, FIFO among equal priorities.
- A job may ask for resources (CPUs, memory, GPUs, any named amount), carry
  a tag whose running jobs are limited cluster-wide, or name the workers it
  may run on.  Such a job goes first-fit to an idle worker whose machine has
  the resources free, and never more than a machine offers.  Jobs that ask
  nothing need one CPU: the worker process they run in.  A job that cannot
  fit now keeps one machine for itself (nothing new starts there) until it
  fits, so small jobs cannot starve it; other jobs of its client that do
  fit go meanwhile.  A job that no connected machine could ever run waits,
  with a notice to its client, and fails after ``unplaceable_timeout``.
- A worker is sent up to ``slots`` jobs (default 2): the one it runs and the
  next, sent ahead, so it never waits a round trip between jobs.  Only jobs
  that ask for nothing more are sent ahead like that.  A worker that falls
  idle while another has a job sent ahead takes that job over (REVOKE, then
  REVOKED gives it back), so a job never waits behind a long one while a
  worker is free.
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
"""
from __future__ import annotations

import heapq
import json
import time

from cw import settings
from cw.errors import ProtocolError
from cw.master import report
from cw.master.placement import Placement
from cw.master.records import AHEAD, DONE, QUEUED, RUNNING, ClientRecord, Job, JobQueue, WorkerRecord
from cw.wire import protocol
from cw.wire.options import DEFAULT_RETRIES

__all__ = ["DEFAULT_MAX_ATTEMPTS", "DEFAULT_RETRIES", "Dispatcher"]

DEFAULT_MAX_ATTEMPTS = settings.MAX_ATTEMPTS


class Dispatcher:
    MAX_SETUPS = 64

    def __init__(self, max_attempts: int = DEFAULT_MAX_ATTEMPTS, clock=time.monotonic,
                 slots: int = settings.WORKER_SLOTS, unplaceable_timeout: float = settings.UNPLACEABLE_TIMEOUT):
        self.max_attempts = max_attempts
        self.slots = max(1, slots)
        self.clock = clock
        self.unplaceable_timeout = unplaceable_timeout
        self.started = clock()
        self.outbox: list = []
        self.clients: dict[int, ClientRecord] = {}
        self.workers: dict[int, WorkerRecord] = {}
        self.placement = Placement(self.workers)
        self.ready: list = []               # heap of (vtime, seq, cid): clients that may have jobs to run
        self.idle: dict[int, None] = {}     # wids with nothing to run, in the order they freed up
        self.spare: dict[int, None] = {}    # wids running a job with a slot free for the next
        self.donors: dict[int, None] = {}   # wids with a job sent ahead (and no REVOKE out)
        self.revokes = 0                    # REVOKEs awaiting an answer
        self.queued = 0
        self.epoch = 0                      # bumped when workers come or go
        self._setup_queue = JobQueue(None)  # what setup jobs count as: plain
        self.throughput = report.Throughput()
        self.setups: list = []              # payloads every worker that connects runs first
        self._vclock = 0.0
        self._seq = 0
        self._next_gid = 1

    # --- peers come and go ------------------------------------------------

    def add_client(self, cid: int, info: dict) -> None:
        self.clients[cid] = ClientRecord(cid, info)

    def set_context(self, cid: int, context_json: bytes) -> None:
        protocol.decode_json(context_json, "CONTEXT")  # refuse garbage before workers see it
        self.clients[cid].context = bytes(context_json)
        for worker in self.workers.values():
            worker.contexts.discard(cid)   # a changed context goes out again

    def remove_client(self, cid: int) -> None:
        client = self.clients.pop(cid, None)
        if client is None:
            return                         # its entry in self.ready is skipped when popped
        for job in client.jobs.values():
            if job.state == QUEUED:
                self._drop_queued(job)
            else:
                self._abort(job)
        client.jobs.clear()
        client.queues.clear()
        forget = protocol.encode_context_for_worker(cid, b"{}")
        for worker in self.workers.values():
            if cid in worker.contexts:
                worker.contexts.discard(cid)
                self.outbox.append((worker.wid, forget))

    def pause_client(self, cid: int) -> None:
        """The client is not reading its results fast enough: its jobs wait."""
        client = self.clients.get(cid)
        if client is not None:
            client.paused = True          # its entry in self.ready is skipped when popped

    def resume_client(self, cid: int) -> None:
        client = self.clients.get(cid)
        if client is not None and client.paused:
            client.paused = False
            self._make_ready(client)
            self._pump()

    def add_worker(self, wid: int, info: dict) -> None:
        node = self.placement.join(wid, info)
        worker = self.workers[wid] = WorkerRecord(wid, info, self.clock(), node)
        self.epoch += 1
        for payload in self.setups:
            self._send_setup(worker, payload)
        self._place(worker)
        self._make_all_ready()
        self._pump()

    def add_setup(self, payload) -> None:
        """A job for every worker that connects from now on, before any other
        (a sticky ``install``).  Workers connected now got it from the client."""
        if len(self.setups) >= self.MAX_SETUPS:
            raise ProtocolError(f"more than {self.MAX_SETUPS} setup jobs; restart the master to clear them")
        self.setups.append(bytes(payload))

    def drain_worker(self, wid: int) -> None:
        """The worker finishes its current job and takes no other (it is stopping)."""
        worker = self.workers.get(wid)
        if worker is not None:
            worker.draining = True
            # It gives back (REVOKED) every job sent ahead; only this one runs.
            worker.drain_head = worker.jobs[0].gid if worker.jobs else None
            self.epoch += 1
            self._place(worker)
            self._recheck_placeable()

    def remove_worker(self, wid: int) -> None:
        worker = self.workers.pop(wid, None)
        if worker is None:
            return
        self.epoch += 1
        self._place(worker)
        if worker.revoking is not None:
            self.revokes -= 1
        jobs = list(worker.jobs)
        # Back to the heads of their queues in the order they were sent.  Only
        # the first had started, with those it ran while lent (a draining
        # worker starts none after the one it ran when it said DRAIN), so only
        # they count as an attempt.
        if not worker.draining or (jobs and jobs[0].gid == worker.drain_head):
            started = jobs[:1 + worker.lent]
        else:
            started = []
        for job in jobs:
            self._leave(worker, job)
        self.placement.leave(worker)
        for job in reversed(jobs[len(started):]):
            job.attempts -= 1
            self._requeue(job)
        for job in reversed(started):   # each goes to the front: the first sent ends up first
            self._job_lost(job, worker)
        self._recheck_placeable()
        self._pump()

    # --- jobs ---------------------------------------------------------------

    def submit(self, cid: int, jobid: int, retries: int, timeout: float, payload, priority: int = 0,
               options: dict | None = None) -> None:
        """A job; ``options`` as cw.wire.options normalises them (None or {} for none)."""
        client = self.clients[cid]
        if jobid in client.jobs:
            raise ProtocolError(f"the client submitted job id {jobid} twice")
        max_attempts = self.max_attempts if retries == DEFAULT_RETRIES else retries + 1
        queue = client.queue_for(options) if options else client.plain
        job = Job(client, jobid, payload, max_attempts, timeout, priority, queue)
        client.jobs[jobid] = job
        client.submitted += 1
        client.queued += 1
        queue.push(job)
        self.queued += 1
        if queue.key is not None:
            self._check_placeable(client, queue, job)   # tell at once, even while every worker is busy
        self._make_ready(client)
        if self.idle or self.spare:
            self._pump()

    def set_limit(self, tag: str, limit: int | None) -> None:
        """At most ``limit`` jobs tagged ``tag`` run at once (None: no limit)."""
        self.placement.tags.set(tag, limit)
        self._make_all_ready()
        self._pump()

    def cancel(self, cid: int, jobid: int) -> None:
        client = self.clients[cid]
        job = client.jobs.pop(jobid, None)
        if job is None:
            # Finished already: its result is on the way, and the client drops it.
            self.outbox.append((cid, protocol.encode_cancelled(jobid, False)))
            return
        if job.state == QUEUED:
            self._drop_queued(job)
        else:
            self._abort(job)
        self.outbox.append((cid, protocol.encode_cancelled(jobid, True)))

    def outcome(self, wid: int, gid: int, status: int, payload) -> None:
        worker = self.workers[wid]
        jobs = worker.jobs
        if jobs and jobs[0].gid == gid:
            job = jobs[0]
        else:
            # While lent, the worker runs jobs sent after the one it lent for.
            job = next((j for j in worker.running()[1:] if j.gid == gid), None)
            if job is None:
                raise ProtocolError(f"the worker sent an outcome for job {gid}, which it was not running")
        self._leave(worker, job)
        if jobs:
            jobs[0].state = RUNNING
        worker.done += 1
        if status != protocol.OK:
            worker.failures += 1
        self.throughput.count(self.clock())
        self._place(worker)
        if job.client is None:
            job.state = DONE
        else:
            self._finish(job, status, worker.label, payload)
        self._pump()

    def output(self, wid: int, gid: int, text: bytes) -> None:
        """What a job printed (it comes just before its outcome): on to its client."""
        worker = self.workers[wid]
        job = next((j for j in worker.running() if j.gid == gid), None)
        if job is None:
            raise ProtocolError(f"the worker sent output of job {gid}, which it was not running")
        if job.client is not None:
            text = text[:4 * settings.MAX_JOB_OUTPUT + 256]   # the worker bounds it; a bad one cannot make us keep more
            self.outbox.append((job.client.cid, protocol.encode_output_for_client(job.jobid, worker.label, text)))

    def revoked(self, wid: int, gid: int, given_back: bool) -> None:
        """The worker answers a REVOKE, or gives back a job sent ahead that it was told to ABORT."""
        worker = self.workers[wid]
        if worker.revoking == gid:
            worker.revoking = None
            self.revokes -= 1
        job = next((j for j in worker.jobs if j.gid == gid), None)
        if given_back:
            # The worker knows best: even the job we took for its running one
            # (its outcome for the one before came first) may not have started.
            if job is None:
                raise ProtocolError(f"the worker gave back job {gid}, which it did not have")
            self._leave(worker, job)
            if worker.jobs:
                worker.jobs[0].state = RUNNING
            job.attempts -= 1
            self._requeue(job)
        elif job is not None:
            job.pinned = True             # it started: asking again cannot get it back
        self._place(worker)
        self._pump()

    def lend(self, wid: int) -> None:
        """The worker's running job waits for jobs it submitted: run others meanwhile."""
        worker = self.workers[wid]
        if worker.lent >= len(worker.jobs):
            raise ProtocolError("the worker lent a slot without a running job to lend it")
        worker.lent += 1
        if len(worker.jobs) > worker.lent:
            worker.jobs[worker.lent].state = RUNNING     # the worker starts the job sent ahead
        self._place(worker)
        self._pump()

    def reclaim(self, wid: int) -> None:
        """A job that waited on its children runs again."""
        worker = self.workers[wid]
        if worker.lent == 0:
            raise ProtocolError("the worker reclaimed a slot it had not lent")
        worker.lent -= 1
        self._place(worker)

    def expire(self) -> None:
        """Fails jobs that no connected worker could run for longer than
        ``unplaceable_timeout`` (the master calls this every second or so)."""
        now = self.clock()
        for client in list(self.clients.values()):
            for queue in list(client.queues.values()):
                since = queue.waiting_since
                if since is None or now - since < self.unplaceable_timeout:
                    continue
                if queue.checked != self.epoch and self.placement.why_never(queue) is None:
                    queue.waiting_since = None      # a worker that fits came meanwhile
                    continue
                body = json.dumps({"reason": queue.reason, "waited": round(now - since, 1)}).encode()
                for job in list(queue.jobs()):
                    self.queued -= 1
                    client.queued -= 1
                    self._finish(job, protocol.UNPLACEABLE, b"master:0", body)
                queue.waiting_since = None
                queue.checked = -1           # the next job of this kind is looked at afresh
                client.notified.discard(queue.key)

    def status(self) -> dict:
        return report.status(self)

    # --- a job's way to a worker and back -----------------------------------

    def _new_gid(self) -> int:
        """A fresh id for a job being sent to a worker: a job sent again gets
        a new one, so a late word about an earlier sending can never match it."""
        gid = self._next_gid
        self._next_gid += 1
        return gid

    def _send_setup(self, worker: WorkerRecord, payload: bytes) -> None:
        job = Job(None, 0, payload, 1, 0.0, 0, self._setup_queue)
        job.gid = self._new_gid()
        job.state = AHEAD if worker.jobs else RUNNING
        job.worker = worker
        job.pinned = True                # never handed to another worker
        job.attempts = 1
        worker.jobs.append(job)
        self.outbox.append((worker.wid, protocol.encode_job(job.gid, 0, 0.0, payload)))

    def _assign(self, job: Job, worker: WorkerRecord, growth: dict) -> None:
        client = job.client
        queue = job.queue
        queue.pop_head()
        if queue.waiting_since is not None or queue.reason is not None:
            queue.waiting_since = queue.reason = None
            client.notified.discard(queue.key)
        self.queued -= 1
        client.queued -= 1
        env = self.placement.book(worker, job, growth)
        outbox = self.outbox
        cid = client.cid
        if cid not in worker.contexts:
            worker.contexts.add(cid)
            outbox.append((worker.wid, protocol.encode_context_for_worker(cid, client.context)))
        job.state = AHEAD if len(worker.jobs) > worker.lent else RUNNING
        job.worker = worker
        job.attempts += 1
        job.gid = self._new_gid()     # not before: queued jobs carry no id of their own (B5 counts bytes)
        worker.jobs.append(job)
        self._place(worker)
        if env is not None:
            outbox.append((worker.wid, protocol.encode_job_env(job.gid, env)))
        outbox.append((worker.wid, protocol.encode_job(job.gid, cid, job.timeout, job.payload)))

    def _leave(self, worker: WorkerRecord, job: Job) -> None:
        """``job`` is no longer at ``worker``."""
        jobs = worker.jobs
        if jobs[0] is job:
            jobs.popleft()
        else:
            jobs.remove(job)
        if worker.lent > len(jobs):
            worker.lent = len(jobs)
        self.placement.release(worker, job)

    def _job_lost(self, job: Job, worker: WorkerRecord) -> None:
        job.lost_on = (job.lost_on or ()) + (worker.label.decode("utf-8", "replace"),)
        worker.failures += 1
        if job.client is not None and job.attempts >= job.max_attempts:
            body = json.dumps({"attempts": job.attempts, "workers": list(job.lost_on)}).encode()
            self._finish(job, protocol.LOST, worker.label, body)
        else:
            self._requeue(job)

    def _requeue(self, job: Job) -> None:
        """Puts a job that had gone to a worker back at the head of its client's queue."""
        job.worker = None
        client = job.client
        if client is None:
            job.state = DONE             # nobody wants it any more
            return
        job.state = QUEUED
        self.queued += 1
        client.queued += 1
        queue = job.queue = client.queues.setdefault(job.queue.key, job.queue)
        queue.push(job, front=True)      # it waited its turn once already
        self._make_ready(client)

    def _drop_queued(self, job: Job) -> None:
        job.state = DONE                 # skipped when it reaches the head of its queue
        job.payload = None
        job.client.queued -= 1
        job.client = None
        self.queued -= 1

    def _abort(self, job: Job) -> None:
        """Nobody wants this job's result: its worker stops it if it runs, or
        gives it back (REVOKED) if it has not started it."""
        job.client = None
        self.outbox.append((job.worker.wid, protocol.encode_abort(job.gid)))

    def _finish(self, job: Job, status: int, label: bytes, payload) -> None:
        client = job.client
        job.state = DONE
        job.payload = None
        del client.jobs[job.jobid]
        client.done += 1
        if status != protocol.OK:
            client.failed += 1
        self.outbox.append((client.cid, protocol.encode_result(job.jobid, status, label, payload)))

    # --- which job goes where -------------------------------------------------

    def _place(self, worker: WorkerRecord) -> None:
        """Files the worker under idle, spare and donors by the jobs it was sent."""
        wid = worker.wid
        load = len(worker.jobs) - worker.lent      # jobs it runs or will run, not counting lent ones
        self.idle.pop(wid, None)
        self.spare.pop(wid, None)
        self.donors.pop(wid, None)
        if wid not in self.workers:
            return
        if not worker.draining:
            if load <= 0:
                self.idle[wid] = None
            elif load < self.slots:
                self.spare[wid] = None
        if load >= 2 and worker.revoking is None and not worker.draining and not worker.jobs[-1].pinned:
            self.donors[wid] = None

    def _make_ready(self, client: ClientRecord) -> None:
        if not client.in_ready and not client.paused and client.queued:
            client.in_ready = True
            if client.vtime < self._vclock:
                client.vtime = self._vclock   # no credit for the time it had nothing queued
            self._seq += 1
            heapq.heappush(self.ready, (client.vtime, self._seq, client.cid))

    def _make_all_ready(self) -> None:
        """Something changed that may let blocked jobs go (a worker came, a limit rose)."""
        for client in self.clients.values():
            self._make_ready(client)

    def _pump(self) -> None:
        """Hands queued jobs to workers, idle ones first; then lets idle
        workers take over jobs sent ahead to busy ones."""
        idle, spare, ready, clients = self.idle, self.spare, self.ready, self.clients
        blocked = []
        while ready and (idle or spare):
            _, _, cid = heapq.heappop(ready)
            client = clients.get(cid)
            if client is None:
                continue                   # it left
            client.in_ready = False
            if client.paused:
                continue                   # resume_client puts it back
            picked = self._pick(client)
            if picked is None:
                if client.queued:
                    blocked.append(client)  # nothing of it fits now; back in the heap below
                continue
            self._assign(*picked)
            self._vclock = client.vtime
            client.vtime += 1.0 / client.weight
            self._make_ready(client)
        if self.donors and len(idle) > self.revokes and not ready:
            self._steal()
        for client in blocked:
            self._make_ready(client)

    def _pick(self, client: ClientRecord):
        """(job, worker, growth): the client's best job that can go now."""
        queues = client.queues
        find = self.placement.find
        if len(queues) == 1:
            queue = client.plain
            job = queue.head()
            if job is None:
                return None
            found = find(queue, job, self.idle, self.spare)
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
            found = find(queue, job, self.idle, self.spare)
            if found is not None:
                return (job, *found)
            if queue.key is not None:
                # If no connected worker could ever run it, say so; else keep
                # a machine free for the client's most urgent job.
                self._check_placeable(client, queue, job)
                if queue.reason is None and first:
                    self.placement.reserve(queue, job)
            first = False
        return None

    def _steal(self) -> None:
        """Idle workers take over jobs sent ahead to busy ones."""
        takers = sum(1 for wid in self.idle if self.placement.can_take_plain(self.workers[wid]))
        while self.donors and takers > self.revokes:
            donor = self.workers[next(iter(self.donors))]
            donor.revoking = donor.jobs[-1].gid
            self.revokes += 1
            self._place(donor)
            self.outbox.append((donor.wid, protocol.encode_revoke(donor.revoking)))

    # --- jobs no connected worker could run ------------------------------------

    def _check_placeable(self, client: ClientRecord, queue: JobQueue, job: Job) -> None:
        """Finds out (once per change of workers) whether any connected worker
        could ever run the queue's jobs; if none, says so to the client once
        and starts the clock of --unplaceable-timeout."""
        if queue.checked == self.epoch:
            return
        queue.checked = self.epoch
        queue.reason = self.placement.why_never(queue)
        if queue.reason is None:
            queue.waiting_since = None
            client.notified.discard(queue.key)
        elif queue.waiting_since is None:
            queue.waiting_since = self.clock()
            if queue.key not in client.notified:
                client.notified.add(queue.key)
                text = (f"{queue.reason}; it waits for such a worker to join, and fails after "
                        f"{self.unplaceable_timeout:g} s")
                self.outbox.append((client.cid, protocol.encode_notice(job.jobid, text)))

    def _recheck_placeable(self) -> None:
        """Workers left: jobs that only they could run must be told, and timed,
        now, not when some worker next frees up."""
        for client in list(self.clients.values()):
            for key, queue in list(client.queues.items()):
                if key is not None:
                    job = queue.head()
                    if job is not None:
                        self._check_placeable(client, queue, job)
