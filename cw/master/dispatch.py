"""The master's scheduling state, with no I/O.

Everything that decides where a job goes lives in this file.  The master's
asyncio shell turns what peers send into calls of ``Dispatcher`` methods
(events) and writes what the dispatcher leaves in ``outbox``: pairs of
``(peer id, frame)`` where a frame is ``bytes`` or a ``(head, payload)``
tuple.  Tests drive it with plain calls and read the outbox, no sockets.

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
- A worker holds up to ``slots`` jobs (default 2): the one it runs and the
  next, so it never waits a round trip between jobs.  Only jobs that ask
  for nothing more are sent ahead like that.  A worker that falls idle while
  another holds a job it has not started takes that job over (REVOKE, then
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

import bisect
import heapq
import json
import time
from collections import deque

from cw import settings
from cw.errors import ProtocolError
from cw.resources import PLAIN, Node, format_amounts
from cw.wire import protocol

DEFAULT_MAX_ATTEMPTS = settings.MAX_ATTEMPTS
#: SUBMIT's retries byte that means "use the master's default".
DEFAULT_RETRIES = 0xFF
#: Seconds over which status() reports throughput.
THROUGHPUT_WINDOW = 60

QUEUED, HELD, RUNNING, DONE = "queued", "held", "running", "done"   # HELD: sent to a busy worker


class Job:
    __slots__ = ("attempts", "client", "gid", "jobid", "lost_on", "max_attempts", "payload", "pinned",
                 "priority", "queue", "state", "timeout", "worker")

    def __init__(self, client, jobid, payload, max_attempts, timeout, priority, queue):
        self.gid = 0                  # its id towards the worker it was last sent to; given at each sending
        self.client = client          # ClientState, or None once nobody wants the result
        self.jobid = jobid            # the client's own id for it
        self.payload = payload
        self.state = QUEUED
        self.worker = None            # WorkerState while running
        self.attempts = 0
        self.max_attempts = max_attempts
        # Seconds, enforced by the worker; 0 for none.  "or 0.0" shares one
        # float for the usual no-timeout case: a float each is 24 B a job (B5).
        self.timeout = timeout or 0.0
        self.lost_on = None           # labels of workers that died running it
        self.pinned = False           # its worker said it started it: never ask for it back
        self.priority = priority
        self.queue = queue            # the JobQueue it waits in (its shape)

    @property
    def need(self) -> dict:
        """What it asks of a worker's machine (its queue's: no copy per job, B5 counts bytes)."""
        return self.queue.need


class JobQueue:
    """One client's queued jobs of one shape (the same needs, tag and allowed
    workers): highest priority first, FIFO among equals.  Jobs of one shape
    fit the same workers, so when its head cannot go anywhere, neither can
    the rest: the dispatcher looks at heads only."""

    __slots__ = ("allowed", "buckets", "checked", "key", "need", "order", "reason", "tag", "waiting_since")

    def __init__(self, key, need=PLAIN, tag=None, allowed=None):
        self.key = key                # None for jobs that ask for nothing
        self.need = need
        self.tag = tag
        self.allowed = allowed        # frozenset of worker ids and host names, or None
        self.buckets: dict[int, deque] = {}
        self.order: list[int] = []    # priorities present, ascending: the last one goes first
        self.waiting_since = None     # when it was found that no connected worker could run it
        self.reason = None
        self.checked = -1             # Dispatcher.epoch of that finding

    def push(self, job: Job, front: bool = False) -> None:
        bucket = self.buckets.get(job.priority)
        if bucket is None:
            bucket = self.buckets[job.priority] = deque()
            bisect.insort(self.order, job.priority)
        if front:
            bucket.appendleft(job)
        else:
            bucket.append(job)

    def head(self) -> Job | None:
        """The next queued job; cancelled ones are dropped on the way."""
        order, buckets = self.order, self.buckets
        while order:
            bucket = buckets[order[-1]]
            while bucket:
                job = bucket[0]
                if job.state == QUEUED:
                    return job
                bucket.popleft()
            del buckets[order.pop()]
        return None

    def pop_head(self) -> None:
        self.buckets[self.order[-1]].popleft()

    def jobs(self):
        for bucket in self.buckets.values():
            yield from (job for job in bucket if job.state == QUEUED)


class ClientState:
    __slots__ = ("cid", "context", "done", "failed", "in_ready", "info", "jobs", "notified", "paused", "plain",
                 "queued", "queues", "submitted", "vtime", "weight")

    def __init__(self, cid, info):
        self.cid = cid
        self.info = info
        self.context = b"{}"
        self.jobs = {}                # client jobid -> Job, queued or running
        self.plain = JobQueue(None)   # jobs that ask for nothing special
        self.queues = {None: self.plain}   # shape key -> JobQueue
        self.queued = 0
        self.paused = False
        self.in_ready = False         # has an entry in Dispatcher.ready
        self.vtime = 0.0              # fair-share clock: advances 1/weight per job given out
        weight = info.get("weight", 1)
        self.weight = float(weight) if isinstance(weight, (int, float)) and 0 < weight <= 1e6 else 1.0
        self.notified = set()         # shape keys it was told cannot run now
        self.submitted = 0
        self.done = 0
        self.failed = 0


class WorkerState:
    __slots__ = ("contexts", "done", "drain_head", "draining", "failures", "gpus", "held", "info", "jobs", "label",
                 "lent", "node", "revoking", "since", "wid")

    def __init__(self, wid, info, label, now, node):
        self.wid = wid
        self.info = info
        self.label = label            # b"host:pid", sent with each of its results
        self.node = node              # the Node (machine) whose resources it shares
        self.held: dict = {}          # resources reserved on the node: the most any of its jobs needs
        self.gpus: list = []          # GPU ids reserved on the node
        self.jobs = deque()           # jobs sent to it, in order; the first one runs
        self.lent = 0                 # running jobs waiting on their children (LEND)
        self.revoking = None          # gid of a held job we asked it to give back
        self.drain_head = None        # gid of the job it was running when it said DRAIN
        self.contexts = set()         # client ids whose CONTEXT it holds
        self.draining = False
        self.done = 0
        self.failures = 0
        self.since = now


def _running(worker) -> list:
    """The jobs a worker runs: the first it holds, and those it started while lent."""
    return list(worker.jobs)[:1 + worker.lent]


def _still_waiting(job) -> bool:
    """A queued job that may go as soon as it fits (its client is there and reads)."""
    return job.state == QUEUED and job.client is not None and not job.client.paused


def _by_client(jobs) -> dict:
    """{client id (str, for JSON): [its job ids]} of some running jobs."""
    out: dict = {}
    for job in jobs:
        if job.client is not None:
            out.setdefault(str(job.client.cid), []).append(job.jobid)
    return out


def worker_label(info: dict) -> bytes:
    label = f"{info.get('host', '?')}:{info.get('pid', '?')}".encode("utf-8", "replace")
    return label[:255]


def _worker_offer(info: dict) -> tuple[dict, list]:
    """The resources and GPU ids a worker's HELLO declares for its machine;
    a worker that declares none offers one CPU (itself)."""
    offer = info.get("resources")
    if not isinstance(offer, dict) or not offer:
        return dict(PLAIN), []
    clean = {k: v for k, v in offer.items()
             if isinstance(k, str) and isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0}
    ids = info.get("gpu_ids")
    ids = [str(i) for i in ids] if isinstance(ids, list) else []
    if len(ids) < clean.get("gpu", 0):
        ids += [str(i) for i in range(len(ids), int(clean["gpu"]))]
    return clean, ids[:int(clean.get("gpu", 0))]


def _names(allowed) -> str:
    return ", ".join(str(a) for a in sorted(allowed, key=str))


class Dispatcher:
    def __init__(self, max_attempts: int = DEFAULT_MAX_ATTEMPTS, clock=time.monotonic,
                 slots: int = settings.WORKER_SLOTS, unplaceable_timeout: float = settings.UNPLACEABLE_TIMEOUT):
        self.max_attempts = max_attempts
        self.slots = max(1, slots)
        self.clock = clock
        self.unplaceable_timeout = unplaceable_timeout
        self.started = clock()
        self.outbox: list = []
        self.clients: dict[int, ClientState] = {}
        self.workers: dict[int, WorkerState] = {}
        self.nodes: dict[str, Node] = {}
        self.ready: list = []               # heap of (vtime, seq, cid): clients that may have jobs to run
        self.idle: dict[int, None] = {}     # wids with nothing to run, in the order they freed up
        self.spare: dict[int, None] = {}    # wids running a job with a slot free for the next
        self.donors: dict[int, None] = {}   # wids holding a job they have not started (and no REVOKE out)
        self.limits: dict[str, int] = {}    # tag -> most jobs with that tag running at once
        self.tagged: dict[str, int] = {}    # tag -> jobs with that tag at workers
        self.revokes = 0                    # REVOKEs awaiting an answer
        self.queued = 0
        self.epoch = 0                      # bumped when workers come or go
        self._setup_queue = JobQueue(None)  # what setup jobs count as: plain
        self.finished: deque = deque()      # [second, jobs finished in it], for throughput
        self.setups: list = []              # payloads every worker that connects runs first
        self._vclock = 0.0
        self._seq = 0
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
        client.queues.clear()
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
        key = info.get("node")
        key = f"node:{key}" if isinstance(key, str) and key else f"worker:{wid}"
        offer, gpu_ids = _worker_offer(info)
        node = self.nodes.get(key)
        if node is None:
            node = self.nodes[key] = Node(key, offer, gpu_ids)
        node.workers.add(wid)
        worker = self.workers[wid] = WorkerState(wid, info, worker_label(info), self.clock(), node)
        self.epoch += 1
        for payload in self.setups:
            self._send_setup(worker, payload)
        self._place(worker)
        self._make_all_ready()
        self._pump()

    MAX_SETUPS = 64

    def add_setup(self, payload) -> None:
        """A job for every worker that connects from now on, before any other
        (a sticky ``install``).  Workers connected now got it from the client."""
        if len(self.setups) >= self.MAX_SETUPS:
            raise ProtocolError(f"more than {self.MAX_SETUPS} setup jobs; restart the master to clear them")
        self.setups.append(bytes(payload))

    def _new_gid(self) -> int:
        """A fresh id for a job being sent to a worker: a job sent again gets
        a new one, so a late word about an earlier sending can never match it."""
        gid = self._next_gid
        self._next_gid += 1
        return gid

    def _send_setup(self, worker: WorkerState, payload: bytes) -> None:
        job = Job(None, 0, payload, 1, 0.0, 0, self._setup_queue)
        job.gid = self._new_gid()
        job.state = HELD if worker.jobs else RUNNING
        job.worker = worker
        job.pinned = True                # never handed to another worker
        job.attempts = 1
        worker.jobs.append(job)
        self.outbox.append((worker.wid, protocol.encode_job(job.gid, 0, 0.0, payload)))

    def _place(self, worker: WorkerState) -> None:
        """Files the worker under idle, spare and donors by what it holds."""
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

    def drain_worker(self, wid: int) -> None:
        """The worker finishes its current job and takes no other (it is stopping)."""
        worker = self.workers.get(wid)
        if worker is not None:
            worker.draining = True
            # It gives back (REVOKED) every job it has not started; only this one runs.
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
        node = worker.node
        node.workers.discard(wid)
        if not node.workers:
            del self.nodes[node.key]
        for job in reversed(jobs[len(started):]):
            job.attempts -= 1
            self._requeue(job)
        for job in reversed(started):   # each goes to the front: the first sent ends up first
            self._job_lost(job, worker)
        self._recheck_placeable()
        self._pump()

    def _job_lost(self, job: Job, worker: WorkerState) -> None:
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

    # --- jobs ---------------------------------------------------------------

    def submit(self, cid: int, jobid: int, retries: int, timeout: float, payload, priority: int = 0,
               options: dict | None = None) -> None:
        client = self.clients[cid]
        if jobid in client.jobs:
            raise ProtocolError(f"the client submitted job id {jobid} twice")
        max_attempts = self.max_attempts if retries == DEFAULT_RETRIES else retries + 1
        queue = client.plain if not options else self._queue_for(client, options)
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

    def _queue_for(self, client: ClientState, options: dict) -> JobQueue:
        """The client's queue for jobs of this shape (options checked by protocol.decode_options)."""
        need = options.get("resources") or PLAIN
        tag = options.get("tag")
        allowed = options.get("workers")
        allowed = frozenset(allowed) if allowed is not None else None
        key = (tuple(sorted(need.items())) if need is not PLAIN else None, tag, allowed)
        if key == (None, None, None):
            return client.plain
        queue = client.queues.get(key)
        if queue is None:
            queue = client.queues[key] = JobQueue(key, need, tag, allowed)
        return queue

    def set_limit(self, tag: str, limit: int | None) -> None:
        """At most ``limit`` jobs tagged ``tag`` run at once (None: no limit)."""
        if limit is None:
            self.limits.pop(tag, None)
        else:
            self.limits[tag] = limit
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

    def outcome(self, wid: int, gid: int, status: int, payload) -> None:
        worker = self.workers[wid]
        jobs = worker.jobs
        if jobs and jobs[0].gid == gid:
            job = jobs[0]
        else:
            # While lent, the worker runs jobs sent after the one it lent for.
            job = next((j for j in _running(worker)[1:] if j.gid == gid), None)
            if job is None:
                raise ProtocolError(f"the worker sent an outcome for job {gid}, which it was not running")
        self._leave(worker, job)
        if jobs:
            jobs[0].state = RUNNING
        worker.done += 1
        if status != protocol.OK:
            worker.failures += 1
        self._count_finished()
        self._place(worker)
        if job.client is None:
            job.state = DONE
        else:
            self._finish(job, status, worker.label, payload)
        self._pump()

    def output(self, wid: int, gid: int, text: bytes) -> None:
        """What a job printed (it comes just before its outcome): on to its client."""
        worker = self.workers[wid]
        job = next((j for j in _running(worker) if j.gid == gid), None)
        if job is None:
            raise ProtocolError(f"the worker sent output of job {gid}, which it was not running")
        if job.client is not None:
            text = text[:4 * settings.MAX_JOB_OUTPUT + 256]   # the worker bounds it; a bad one cannot make us hold more
            self.outbox.append((job.client.cid, protocol.encode_output_for_client(job.jobid, worker.label, text)))

    def _count_finished(self) -> None:
        second = int(self.clock())
        finished = self.finished
        if finished and finished[-1][0] == second:
            finished[-1][1] += 1
        else:
            finished.append([second, 1])
            while finished[0][0] <= second - THROUGHPUT_WINDOW:
                finished.popleft()

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
            worker.jobs[worker.lent].state = RUNNING     # the worker starts the job it held
        self._place(worker)
        self._pump()

    def reclaim(self, wid: int) -> None:
        """A job that waited on its children runs again."""
        worker = self.workers[wid]
        if worker.lent == 0:
            raise ProtocolError("the worker reclaimed a slot it had not lent")
        worker.lent -= 1
        self._place(worker)

    def _finish(self, job: Job, status: int, label: bytes, payload) -> None:
        client = job.client
        job.state = DONE
        job.payload = None
        del client.jobs[job.jobid]
        client.done += 1
        if status != protocol.OK:
            client.failed += 1
        self.outbox.append((client.cid, protocol.encode_result(job.jobid, status, label, payload)))

    # --- placing jobs ---------------------------------------------------------

    def _make_ready(self, client: ClientState) -> None:
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

    def _fits(self, worker: WorkerState, job: Job):
        """What giving ``job`` to ``worker`` takes from its machine ({} for
        nothing more), or None if it does not fit there now."""
        node = worker.node
        growth = node.growth(worker.held, job.need)
        reserved_for = node.reserved_for
        if reserved_for is not None and reserved_for is not job and growth is not None:
            if not _still_waiting(reserved_for):
                node.reserved_for = None
            elif growth or not worker.lent:
                # The machine is kept for a bigger job.  A lent worker may
                # still run what takes nothing more: its parent waits for it,
                # and the big job for the parent.
                return None
        return growth

    def _find_worker(self, queue: JobQueue, job: Job):
        """(worker, growth) for the queue's head, first fit, or None."""
        workers = self.workers
        if queue.key is None:
            # Asks for nothing: any worker with a free slot, idle ones first.
            for pool in (self.idle, self.spare):
                for wid in pool:
                    worker = workers[wid]
                    growth = self._fits(worker, job)
                    if growth is not None:
                        return worker, growth
            return None
        if self._at_limit(queue.tag):
            return None
        for wid in self.idle:
            worker = workers[wid]
            if worker.jobs:
                continue       # lent: it takes only jobs that ask for nothing more
            if not self._allowed(queue, worker):
                continue
            growth = self._fits(worker, job)
            if growth is not None:
                return worker, growth
        return None

    def _pick(self, client: ClientState):
        """(job, worker, growth): the client's best job that can go now."""
        queues = client.queues
        if len(queues) == 1:
            queue = client.plain
            job = queue.head()
            if job is None:
                return None
            found = self._find_worker(queue, job)
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
            found = self._find_worker(queue, job)
            if found is not None:
                return (job, *found)
            if queue.key is not None:
                self._cannot_place(client, queue, job, reserve=first)
            first = False
        return None

    def _cannot_place(self, client: ClientState, queue: JobQueue, job: Job, reserve: bool) -> None:
        """The head of a constrained queue found no worker.  If no connected
        worker could ever run it, say so (once) and start its clock; else,
        for the client's most urgent job, keep a machine free for it."""
        self._check_placeable(client, queue, job)
        if queue.reason is not None or not reserve or job.need is PLAIN:
            return
        if self._at_limit(queue.tag):
            return                  # waits for the limit, not for room: keeping a machine helps nothing
        if any(node.reserved_for is job for node in self.nodes.values()):
            return
        for worker in self.workers.values():
            node = worker.node
            if node.reserved_for is None or not _still_waiting(node.reserved_for):
                if self._allowed(queue, worker) and node.can_ever_fit(job.need) and not worker.draining:
                    node.reserved_for = job
                    return

    def _check_placeable(self, client: ClientState, queue: JobQueue, job: Job) -> None:
        """Finds out (once per change of workers) whether any connected worker
        could ever run the queue's jobs; if none, says so to the client once
        and starts the clock of --unplaceable-timeout."""
        if queue.checked == self.epoch:
            return
        queue.checked = self.epoch
        queue.reason = self._why_never(queue)
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

    def _at_limit(self, tag: str | None) -> bool:
        """Jobs with this tag run as many at once as its limit allows."""
        limit = self.limits.get(tag) if tag is not None else None
        return limit is not None and self.tagged.get(tag, 0) >= limit

    @staticmethod
    def _allowed(queue: JobQueue, worker: WorkerState) -> bool:
        allowed = queue.allowed
        return allowed is None or worker.wid in allowed or worker.info.get("host") in allowed

    def _why_never(self, queue: JobQueue) -> str | None:
        """Why no connected worker could ever run jobs of this queue, or None."""
        candidates = [w for w in self.workers.values() if self._allowed(queue, w) and not w.draining]
        if not candidates:
            if queue.allowed is None or not all(isinstance(a, int) for a in queue.allowed):
                # Workers may still be starting (a SLURM job waiting in its
                # queue): only ids of workers that left can never come back.
                return None if not self.workers or queue.allowed is None else (
                    f"none of the workers it may run on ({_names(queue.allowed)}) is connected")
            return f"the workers it may run on ({_names(queue.allowed)}) have left"
        if not any(w.node.can_ever_fit(queue.need) for w in candidates):
            best = max((w.node for w in candidates), key=lambda n: sorted(n.capacity.items()))
            return (f"it needs {format_amounts(queue.need)} and no connected worker machine has that "
                    f"(one offers {format_amounts(best.capacity)})")
        return None

    def _assign(self, job: Job, worker: WorkerState, growth: dict) -> None:
        client = job.client
        queue = job.queue
        queue.pop_head()
        if queue.waiting_since is not None or queue.reason is not None:
            queue.waiting_since = queue.reason = None
            client.notified.discard(queue.key)
        self.queued -= 1
        client.queued -= 1
        node = worker.node
        if growth:
            node.take(growth)
            held = worker.held
            for name, amount in growth.items():
                held[name] = held.get(name, 0) + amount
        gpus = job.need.get("gpu", 0)
        if gpus > len(worker.gpus):
            more = int(gpus) - len(worker.gpus)
            worker.gpus += node.free_gpus[:more]
            del node.free_gpus[:more]
        if node.reserved_for is job:
            node.reserved_for = None
        tag = job.queue.tag
        if tag is not None:
            self.tagged[tag] = self.tagged.get(tag, 0) + 1
        outbox = self.outbox
        cid = client.cid
        if cid not in worker.contexts:
            worker.contexts.add(cid)
            outbox.append((worker.wid, protocol.encode_context_for_worker(cid, client.context)))
        job.state = HELD if len(worker.jobs) > worker.lent else RUNNING
        job.worker = worker
        job.attempts += 1
        job.gid = self._new_gid()     # not before: queued jobs carry no id of their own (B5 counts bytes)
        worker.jobs.append(job)
        self._place(worker)
        if job.need is not PLAIN or node.capacity.get("gpu"):
            outbox.append((worker.wid, protocol.encode_job_env(job.gid, self._job_env(job, worker))))
        outbox.append((worker.wid, protocol.encode_job(job.gid, cid, job.timeout, job.payload)))

    @staticmethod
    def _job_env(job: Job, worker: WorkerState) -> dict:
        """Environment variables that tell a job what it was given."""
        env = {}
        if worker.node.capacity.get("gpu"):
            env["CUDA_VISIBLE_DEVICES"] = ",".join(worker.gpus[:int(job.need.get("gpu", 0))])
        if job.need is not PLAIN:
            env["CW_JOB_CPUS"] = str(job.need.get("cpu", 1))
            if "mem" in job.need:
                env["CW_JOB_MEM"] = str(int(job.need["mem"]))
        return env

    def _leave(self, worker: WorkerState, job: Job) -> None:
        """``job`` is no longer at ``worker``: free what it alone reserved."""
        jobs = worker.jobs
        if jobs[0] is job:
            jobs.popleft()
        else:
            jobs.remove(job)
        if worker.lent > len(jobs):
            worker.lent = len(jobs)
        tag = job.queue.tag
        if tag is not None:
            self.tagged[tag] -= 1
        if job.need is PLAIN and jobs:
            return        # what it needed, the jobs left need too
        kept: dict = {}
        for other in jobs:
            for name, amount in other.need.items():
                if amount > kept.get(name, 0):
                    kept[name] = amount
        node = worker.node
        node.give_back(worker.held, kept)
        worker.held = kept
        keep_gpus = int(kept.get("gpu", 0))
        if len(worker.gpus) > keep_gpus:
            node.free_gpu_ids(worker.gpus[keep_gpus:])
            del worker.gpus[keep_gpus:]

    def _pump(self) -> None:
        """Hands queued jobs to workers, idle ones first; then lets idle
        workers take over jobs held unstarted by busy ones."""
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

    def _steal(self) -> None:
        """Idle workers take over jobs that busy ones hold unstarted."""
        takers = sum(1 for wid in self.idle if self._can_take_plain(self.workers[wid]))
        while self.donors and takers > self.revokes:
            donor = self.workers[next(iter(self.donors))]
            donor.revoking = donor.jobs[-1].gid
            self.revokes += 1
            self._place(donor)
            self.outbox.append((donor.wid, protocol.encode_revoke(donor.revoking)))

    def _can_take_plain(self, worker: WorkerState) -> bool:
        node = worker.node
        if node.reserved_for is not None and _still_waiting(node.reserved_for):
            return False
        return node.growth(worker.held, PLAIN) is not None

    def expire(self) -> None:
        """Fails jobs that no connected worker could run for longer than
        ``unplaceable_timeout`` (the master calls this every second or so)."""
        now = self.clock()
        for client in list(self.clients.values()):
            for queue in list(client.queues.values()):
                since = queue.waiting_since
                if since is None or now - since < self.unplaceable_timeout:
                    continue
                if queue.checked != self.epoch and self._why_never(queue) is None:
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

    # --- what the master can tell ------------------------------------------

    def status(self) -> dict:
        now = self.clock()
        workers = [{
            "id": w.wid, "host": w.info.get("host"), "pid": w.info.get("pid"),
            "node": w.node.key.partition(":")[2] if w.node.key.startswith("node:") else None,
            "resources": w.node.capacity,
            "state": "draining" if w.draining else "lending" if w.lent else "busy" if w.jobs else "idle",
            "current": [j.jobid for j in _running(w) if j.client is not None],
            "current_jobs": _by_client(_running(w)),
            "held": max(0, len(w.jobs) - 1 - w.lent), "jobs_done": w.done, "failures": w.failures,
            "connected_s": round(now - w.since, 3),
        } for w in self.workers.values()]
        clients, queues, waiting = [], [], []
        for c in self.clients.values():
            held = sum(1 for j in c.jobs.values() if j.state == HELD)
            clients.append({
                "id": c.cid, "host": c.info.get("host"), "pid": c.info.get("pid"),
                "submitted": c.submitted, "done": c.done, "failed": c.failed, "paused": c.paused,
                "weight": c.weight, "queued": c.queued + held, "running": len(c.jobs) - c.queued - held,
            })
            by_priority: dict[int, int] = {}
            for queue in c.queues.values():
                for priority, bucket in queue.buckets.items():
                    count = sum(1 for j in bucket if j.state == QUEUED)
                    if count:
                        by_priority[priority] = by_priority.get(priority, 0) + count
                if queue.waiting_since is not None:
                    waiting.append({"client": c.cid, "count": sum(1 for _ in queue.jobs()), "reason": queue.reason,
                                    "since_s": round(now - queue.waiting_since, 1)})
            queues += [{"client": c.cid, "priority": p, "queued": n} for p, n in sorted(by_priority.items())]
        running = sum(min(len(w.jobs), 1 + w.lent) for w in self.workers.values())
        held = sum(max(0, len(w.jobs) - 1 - w.lent) for w in self.workers.values())
        second = int(now)
        done = sum(n for s, n in self.finished if s > second - THROUGHPUT_WINDOW)
        # A job held by a busy worker has not started: it counts as queued.
        return {"workers": workers, "clients": clients, "queues": queues, "waiting": waiting,
                "limits": {t: {"limit": n, "running": self.tagged.get(t, 0)} for t, n in self.limits.items()},
                "queued": self.queued + held, "running": running,
                "throughput": {"window_s": THROUGHPUT_WINDOW, "jobs": done,
                               "per_s": round(done / min(THROUGHPUT_WINDOW, max(now - self.started, 1.0)), 2)},
                "uptime_s": round(now - self.started, 3)}
