"""What the master keeps of each job, client and worker (cw.master.dispatch
changes them; nothing here decides anything).

A job is, in turn: QUEUED in one of its client's queues; sent to a worker,
where it is RUNNING, or AHEAD (sent ahead to a worker busy with another job,
not started yet, so the worker never waits a round trip between jobs); then
DONE.  A queued job costs the master only its ``Job`` (benchmark B5 counts
its bytes), so everything jobs of one kind share lives in their queue.
"""
from __future__ import annotations

import bisect
from collections import deque

from cw.wire.options import PLAIN

QUEUED, AHEAD, RUNNING, DONE = "queued", "ahead", "running", "done"


class Job:
    __slots__ = ("attempts", "client", "gid", "jobid", "lost_on", "max_attempts", "payload", "pinned",
                 "priority", "queue", "state", "timeout", "worker")

    def __init__(self, client: ClientRecord | None, jobid: int, payload, max_attempts: int, timeout: float,
                 priority: int, queue: JobQueue):
        self.gid = 0                  # its id towards the worker it was last sent to; given at each sending
        self.client = client          # ClientRecord, or None once nobody wants the result
        self.jobid = jobid            # the client's own id for it
        self.payload = payload
        self.state = QUEUED
        self.worker = None            # WorkerRecord while at a worker
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

    @property
    def waiting(self) -> bool:
        """Queued, and may go as soon as it fits (its client is there and reads)."""
        return self.state == QUEUED and self.client is not None and not self.client.paused


class JobQueue:
    """One client's queued jobs of one shape (the same needs, tag and allowed
    workers): highest priority first, FIFO among equals.  Jobs of one shape
    fit the same workers, so when its head cannot go anywhere, neither can
    the rest: the dispatcher looks at heads only."""

    __slots__ = ("allowed", "buckets", "checked", "key", "need", "order", "reason", "tag", "threads",
                 "waiting_since")

    def __init__(self, key, need: dict = PLAIN, tag: str | None = None, allowed: frozenset | None = None,
                 threads: int | None = None):
        self.key = key                # None for jobs that ask for nothing
        self.need = need
        self.tag = tag
        self.threads = threads        # their BLAS/OpenMP threads (None: the worker decides)
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


class ClientRecord:
    __slots__ = ("cid", "context", "done", "failed", "floor", "functions", "held", "in_ready", "info", "jobs",
                 "notified", "paused", "plain", "queued", "queues", "submitted", "vtime", "weight")

    def __init__(self, cid: int, info: dict):
        self.cid = cid
        self.info = info
        self.context = b"{}"
        self.jobs = {}                # client jobid -> Job, queued or at a worker
        self.plain = JobQueue(None)   # jobs that ask for nothing special
        self.queues = {None: self.plain}   # shape key -> JobQueue
        self.queued = 0
        self.paused = False           # behind on reading its results: its jobs wait
        self.in_ready = False         # has an entry in FairShare.ready
        self.vtime = 0.0              # fair-share clock: advances 1/weight per job given out
        weight = info.get("weight", 1)
        self.weight = float(weight) if isinstance(weight, (int, float)) and 0 < weight <= 1e6 else 1.0
        self.notified = set()         # shape keys it was told cannot run now
        self.floor = None             # the lowest priority it submitted (cw.master.outrank)
        self.held = None              # its jobs sent ahead, by priority, once it used two priorities
        self.functions: dict = {}     # digests of the functions it sent (FUNC): FunctionStore.held_by's
        self.submitted = 0
        self.done = 0
        self.failed = 0

    def add(self, job: Job) -> None:
        """A job it submitted."""
        self.jobs[job.jobid] = job
        self.submitted += 1
        self.queued += 1
        job.queue.push(job)

    def requeue(self, job: Job) -> None:
        """A job that had gone to a worker waits again, at the head of its
        queue: it waited its turn once already."""
        job.state = QUEUED
        job.worker = None
        self.queued += 1
        queue = job.queue = self.queues.setdefault(job.queue.key, job.queue)
        queue.push(job, front=True)

    def drop(self, job: Job) -> None:
        """A queued job nobody wants any more (skipped when it reaches the head of its queue)."""
        job.state = DONE
        job.payload = None
        job.client = None
        self.queued -= 1

    def finish(self, job: Job, ok: bool) -> None:
        """Its result goes out: the job is done with."""
        job.state = DONE
        job.payload = None
        del self.jobs[job.jobid]
        self.done += 1
        if not ok:
            self.failed += 1

    def queue_for(self, options: dict) -> JobQueue:
        """The queue for jobs of this shape (``options`` as cw.wire.options normalises them)."""
        need = options.get("resources") or PLAIN
        tag = options.get("tag")
        allowed = options.get("workers")
        allowed = frozenset(allowed) if allowed is not None else None
        threads = options.get("threads")
        key = (tuple(sorted(need.items())) if need is not PLAIN else None, tag, allowed, threads)
        if key == (None, None, None, None):
            return self.plain
        queue = self.queues.get(key)
        if queue is None:
            queue = self.queues[key] = JobQueue(key, need, tag, allowed, threads)
        return queue


class WorkerRecord:
    __slots__ = ("booked", "contexts", "done", "drain_started", "draining", "failures", "functions", "gpus", "info",
                 "jobs", "label", "last_end", "lent", "node", "quick", "revoking", "since", "wid")

    def __init__(self, wid: int, info: dict, now: float, node):
        self.wid = wid
        self.info = info
        self.label = worker_label(info)   # b"host:pid", sent with each of its results
        self.node = node              # the placement.Node (machine) whose resources it shares
        self.booked: dict = {}        # resources booked on the node: the most any of its jobs needs
        self.gpus: list = []          # GPU ids booked on the node
        self.jobs = deque()           # jobs sent to it, in order; the first one runs
        self.lent = 0                 # running jobs waiting on their children (LEND)
        self.revoking = None          # gid of a job sent ahead that we asked it to give back
        self.drain_started: frozenset = frozenset()   # gids of the jobs it had started when it said DRAIN
        self.contexts = set()         # client ids whose CONTEXT it was sent
        self.functions = set()        # digests of the functions (FUNC) it was sent: a hint, see dispatch
        self.draining = False
        self.done = 0
        self.failures = 0
        self.since = now
        self.last_end = now           # when its last job ended
        self.quick = 0                # its jobs in a row that ended within QUICK_JOB of the one before

    def running(self) -> list[Job]:
        """The jobs it runs: the first it was sent, and those it started while lent."""
        return list(self.jobs)[:1 + self.lent]

    def started(self) -> list[Job]:
        """The jobs it has started: the first, with those it ran while lent
        (it may have died before it read the first: the master cannot know);
        once draining, exactly those it said it had started."""
        if self.draining:
            return [job for job in self.jobs if job.gid in self.drain_started]
        return list(self.jobs)[:1 + self.lent]

    def running_job(self, gid: int) -> Job | None:
        jobs = self.jobs
        if jobs and jobs[0].gid == gid:
            return jobs[0]          # the usual case, without a copy
        return next((j for j in self.running()[1:] if j.gid == gid), None)

    def take(self, job: Job, gid: int) -> None:
        """``job`` is sent to it as ``gid``: it runs it, or starts it after those before."""
        job.state = AHEAD if len(self.jobs) > self.lent else RUNNING
        job.worker = self
        job.gid = gid
        self.jobs.append(job)

    def give_up(self, job: Job) -> None:
        """``job`` is no longer at this worker (done, given back, or the worker left)."""
        jobs = self.jobs
        if jobs[0] is job:
            jobs.popleft()
        else:
            jobs.remove(job)
        if self.lent > len(jobs):
            self.lent = len(jobs)

    @property
    def ahead(self) -> int:
        """How many jobs it was sent ahead and has not started."""
        return max(0, len(self.jobs) - 1 - self.lent)


def worker_label(info: dict) -> bytes:
    label = f"{info.get('host', '?')}:{info.get('pid', '?')}".encode("utf-8", "replace")
    return label[:255]
