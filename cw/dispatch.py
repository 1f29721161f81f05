"""The master's scheduling state, with no I/O.

Everything that decides where a job goes lives in this file.  The master's
asyncio shell turns what peers send into calls of ``Dispatcher`` methods
(events) and writes what the dispatcher leaves in ``outbox``: pairs of
``(peer id, frame)`` where a frame is ``bytes`` or a ``(head, payload)``
tuple.  Tests drive it with plain calls and read the outbox, no sockets.

Rules kept here:
- Each client has a FIFO queue.  Idle workers take jobs from the clients'
  queues in turn: the next job comes from the client with queued jobs that
  was served least recently, so one client's 100,000 queued jobs do not
  starve another's ten.
- A worker holds up to ``slots`` jobs (default 2): the one it runs and the
  next, so it never waits a round trip between jobs.  Jobs go to idle
  workers first.  A worker that falls idle while another holds a job it has
  not started takes that job over (REVOKE, then REVOKED gives it back), so a
  job never waits behind a long one while a worker is free.
- A client that is behind on reading its results is paused: its jobs wait
  until it catches up, so its results cannot pile up in the master.
- A result goes only to the client that submitted the job, exactly once.
  A worker may only report the job it holds; anything else is a protocol
  error that costs the worker its connection.
- A worker that leaves gives its jobs back to the head of their clients'
  queues; the one it was running counts as an attempt, and after
  ``max_attempts`` workers died running it, it fails with LOST.  A draining
  worker finishes its job and gets no other.
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
from collections import deque

from . import protocol, settings
from .errors import ProtocolError

DEFAULT_MAX_ATTEMPTS = settings.MAX_ATTEMPTS
#: SUBMIT's retries byte that means "use the master's default".
DEFAULT_RETRIES = 0xFF

QUEUED, HELD, RUNNING, DONE = "queued", "held", "running", "done"   # HELD: sent to a busy worker


class Job:
    __slots__ = ("attempts", "client", "gid", "jobid", "lost_on", "max_attempts", "payload", "pinned", "state",
                 "timeout", "worker")

    def __init__(self, gid, client, jobid, payload, max_attempts, timeout):
        self.gid = gid
        self.client = client          # ClientState, or None once nobody wants the result
        self.jobid = jobid            # the client's own id for it
        self.payload = payload
        self.state = QUEUED
        self.worker = None            # WorkerState while running
        self.attempts = 0
        self.max_attempts = max_attempts
        self.timeout = timeout        # seconds, enforced by the worker; 0 for none
        self.lost_on = None           # labels of workers that died running it
        self.pinned = False           # its worker said it started it: never ask for it back


class ClientState:
    __slots__ = ("cid", "context", "done", "in_ready", "info", "jobs", "last_served", "paused", "queue",
                 "submitted")

    def __init__(self, cid, info):
        self.cid = cid
        self.info = info
        self.context = b"{}"
        self.jobs = {}                # client jobid -> Job, queued or running
        self.queue = deque()          # its queued Jobs (and cancelled ones, skipped lazily)
        self.paused = False
        self.in_ready = False         # has an entry in Dispatcher.ready
        self.last_served = 0          # Dispatcher turn in which it last got a worker
        self.submitted = 0
        self.done = 0


class WorkerState:
    __slots__ = ("contexts", "done", "drain_head", "draining", "info", "jobs", "label", "revoking", "since", "wid")

    def __init__(self, wid, info, label, now):
        self.wid = wid
        self.info = info
        self.label = label            # b"host:pid", sent with each of its results
        self.jobs = deque()           # jobs sent to it, in order; the first one runs
        self.revoking = None          # gid of a held job we asked it to give back
        self.drain_head = None        # gid of the job it was running when it said DRAIN
        self.contexts = set()         # client ids whose CONTEXT it holds
        self.draining = False
        self.done = 0
        self.since = now


def worker_label(info: dict) -> bytes:
    label = f"{info.get('host', '?')}:{info.get('pid', '?')}".encode("utf-8", "replace")
    return label[:255]


class Dispatcher:
    def __init__(self, max_attempts: int = DEFAULT_MAX_ATTEMPTS, clock=time.monotonic,
                 slots: int = settings.WORKER_SLOTS):
        self.max_attempts = max_attempts
        self.slots = max(1, slots)
        self.clock = clock
        self.started = clock()
        self.outbox: list = []
        self.clients: dict[int, ClientState] = {}
        self.workers: dict[int, WorkerState] = {}
        self.ready: list = []               # heap of (last_served, cid): clients that may have jobs to run
        self.idle: dict[int, None] = {}     # wids with no job, in the order they freed up
        self.spare: dict[int, None] = {}    # wids running a job with a slot free for the next
        self.donors: dict[int, None] = {}   # wids holding a job they have not started (and no REVOKE out)
        self.revokes = 0                    # REVOKEs awaiting an answer
        self.queued = 0
        self._turn = 0
        self._next_gid = 1

    # --- peers come and go ------------------------------------------------

    def add_client(self, cid: int, info: dict) -> None:
        self.clients[cid] = ClientState(cid, info)

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
        client.queue.clear()
        forget = protocol.encode_context_for_worker(cid, b"{}")
        for worker in self.workers.values():
            if cid in worker.contexts:
                worker.contexts.discard(cid)
                self.outbox.append((worker.wid, forget))

    def pause_client(self, cid: int) -> None:
        """The client is not reading its results fast enough: hold its jobs back."""
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
        worker = self.workers[wid] = WorkerState(wid, info, worker_label(info), self.clock())
        self._place(worker)
        self._pump()

    def _place(self, worker: WorkerState) -> None:
        """Files the worker under idle, spare and donors by what it holds."""
        wid, held = worker.wid, len(worker.jobs)
        self.idle.pop(wid, None)
        self.spare.pop(wid, None)
        self.donors.pop(wid, None)
        if wid not in self.workers:
            return
        if not worker.draining:
            if held == 0:
                self.idle[wid] = None
            elif held < self.slots:
                self.spare[wid] = None
        if held >= 2 and worker.revoking is None and not worker.draining and not worker.jobs[-1].pinned:
            self.donors[wid] = None

    def drain_worker(self, wid: int) -> None:
        """The worker finishes its current job and takes no other (it is stopping)."""
        worker = self.workers.get(wid)
        if worker is not None:
            worker.draining = True
            # It gives back (REVOKED) every job it has not started; only this one runs.
            worker.drain_head = worker.jobs[0].gid if worker.jobs else None
            self._place(worker)

    def remove_worker(self, wid: int) -> None:
        worker = self.workers.pop(wid, None)
        if worker is None:
            return
        self._place(worker)
        if worker.revoking is not None:
            self.revokes -= 1
        jobs = list(worker.jobs)
        worker.jobs.clear()
        # Back to the heads of their queues in the order they were sent.  Only
        # the first had started (a draining worker starts none after the one
        # it ran when it said DRAIN), so only it counts as an attempt.
        started = jobs[:1] if not worker.draining or (jobs and jobs[0].gid == worker.drain_head) else []
        for job in reversed(jobs[len(started):]):
            job.attempts -= 1
            self._requeue(job)
        if started:
            self._job_lost(started[0], worker)
        self._pump()

    def _job_lost(self, job: Job, worker: WorkerState) -> None:
        job.lost_on = (job.lost_on or ()) + (worker.label.decode("utf-8", "replace"),)
        if job.client is not None and job.attempts >= job.max_attempts:
            body = json.dumps({"attempts": job.attempts, "workers": list(job.lost_on)}).encode()
            self._finish(job, protocol.LOST, worker.label, body)
        else:
            self._requeue(job)

    def _requeue(self, job: Job) -> None:
        """Puts a job that had gone to a worker back at the head of its client's queue."""
        job.worker = None
        if job.client is None:
            job.state = DONE             # nobody wants it any more
            return
        job.state = QUEUED
        self.queued += 1
        job.client.queue.appendleft(job)  # it waited its turn once already
        self._make_ready(job.client)

    # --- jobs ---------------------------------------------------------------

    def submit(self, cid: int, jobid: int, retries: int, timeout: float, payload) -> None:
        client = self.clients[cid]
        if jobid in client.jobs:
            raise ProtocolError(f"the client submitted job id {jobid} twice")
        max_attempts = self.max_attempts if retries == DEFAULT_RETRIES else retries + 1
        job = Job(self._next_gid, client, jobid, payload, max_attempts, timeout)
        self._next_gid += 1
        client.jobs[jobid] = job
        client.submitted += 1
        client.queue.append(job)
        self.queued += 1
        self._make_ready(client)
        if self.idle or self.spare:
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

    def _drop_queued(self, job: Job) -> None:
        job.state = DONE                 # skipped when it reaches the head of its queue
        job.payload = None
        job.client = None
        self.queued -= 1

    def _abort(self, job: Job) -> None:
        """Nobody wants this job's result: its worker stops it if it runs, or
        gives it back (REVOKED) if it has not started it."""
        job.client = None
        self.outbox.append((job.worker.wid, protocol.encode_abort(job.gid)))

    def outcome(self, wid: int, gid: int, status: int, payload) -> None:
        worker = self.workers[wid]
        jobs = worker.jobs
        if not jobs or jobs[0].gid != gid:
            raise ProtocolError(f"the worker sent an outcome for job {gid}, which it was not running")
        job = jobs.popleft()
        if jobs:
            jobs[0].state = RUNNING
        worker.done += 1
        self._place(worker)
        if job.client is None:
            job.state = DONE
        else:
            self._finish(job, status, worker.label, payload)
        self._pump()

    def revoked(self, wid: int, gid: int, given_back: bool) -> None:
        """The worker answers a REVOKE, or gives back a held job it was told to ABORT."""
        worker = self.workers[wid]
        if worker.revoking == gid:
            worker.revoking = None
            self.revokes -= 1
        job = next((j for j in worker.jobs if j.gid == gid), None)
        if given_back:
            # The worker knows best: even the job we took for its running one
            # (its outcome for the one before came first) may not have started.
            if job is None:
                raise ProtocolError(f"the worker gave back job {gid}, which it did not hold")
            worker.jobs.remove(job)
            if worker.jobs:
                worker.jobs[0].state = RUNNING
            job.attempts -= 1
            self._requeue(job)
        elif job is not None:
            job.pinned = True             # it started: asking again cannot get it back
        self._place(worker)
        self._pump()

    def _finish(self, job: Job, status: int, label: bytes, payload) -> None:
        client = job.client
        job.state = DONE
        job.payload = None
        del client.jobs[job.jobid]
        client.done += 1
        self.outbox.append((client.cid, protocol.encode_result(job.jobid, status, label, payload)))

    def _make_ready(self, client: ClientState) -> None:
        if not client.in_ready and not client.paused and client.queue:
            client.in_ready = True
            heapq.heappush(self.ready, (client.last_served, client.cid))

    def _next_job(self) -> Job | None:
        """The next job of the client served least recently (see the rules)."""
        ready = self.ready
        while ready:
            _, cid = heapq.heappop(ready)
            client = self.clients.get(cid)
            if client is None:
                continue                   # it left
            client.in_ready = False
            if client.paused:
                continue                   # resume_client puts it back
            queue = client.queue
            while queue:
                job = queue.popleft()
                if job.state == QUEUED:
                    self._turn += 1
                    client.last_served = self._turn
                    self._make_ready(client)
                    return job
        return None

    def _pump(self) -> None:
        """Hands queued jobs to workers, idle ones first; then lets idle
        workers take over jobs held unstarted by busy ones."""
        idle, spare, outbox = self.idle, self.spare, self.outbox
        while self.ready and (idle or spare):
            job = self._next_job()
            if job is None:
                break
            self.queued -= 1
            worker = self.workers[next(iter(idle or spare))]
            cid = job.client.cid
            if cid not in worker.contexts:
                worker.contexts.add(cid)
                outbox.append((worker.wid, protocol.encode_context_for_worker(cid, job.client.context)))
            job.state = HELD if worker.jobs else RUNNING
            job.worker = worker
            job.attempts += 1
            worker.jobs.append(job)
            self._place(worker)
            outbox.append((worker.wid, protocol.encode_job(job.gid, cid, job.timeout, job.payload)))
        while self.donors and len(idle) > self.revokes and not self.ready:
            donor = self.workers[next(iter(self.donors))]
            donor.revoking = donor.jobs[-1].gid
            self.revokes += 1
            self._place(donor)
            outbox.append((donor.wid, protocol.encode_revoke(donor.revoking)))

    # --- what the master can tell ------------------------------------------

    def status(self) -> dict:
        now = self.clock()
        workers = [{
            "id": w.wid, "host": w.info.get("host"), "pid": w.info.get("pid"),
            "state": "draining" if w.draining else "busy" if w.jobs else "idle",
            "held": max(0, len(w.jobs) - 1), "jobs_done": w.done, "connected_s": round(now - w.since, 3),
        } for w in self.workers.values()]
        clients = [{
            "id": c.cid, "host": c.info.get("host"), "pid": c.info.get("pid"),
            "submitted": c.submitted, "done": c.done, "paused": c.paused,
            "queued": sum(1 for j in c.jobs.values() if j.state in (QUEUED, HELD)),
            "running": sum(1 for j in c.jobs.values() if j.state == RUNNING),
        } for c in self.clients.values()]
        running = sum(1 for w in self.workers.values() if w.jobs)
        held = sum(len(w.jobs) - 1 for w in self.workers.values() if w.jobs)
        # A job held by a busy worker has not started: it counts as queued.
        return {"workers": workers, "clients": clients, "queued": self.queued + held,
                "running": running, "uptime_s": round(now - self.started, 3)}
