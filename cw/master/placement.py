"""Where a job may go: the books of each worker machine, tag limits, the
workers a job may name, and machines kept free for big jobs.  Pure; the
dispatcher (cw.master.dispatch) asks, and tells what it decided.

The rules kept here:

- A worker process runs one job at a time, so it books on its machine the
  most any of its jobs needs, not their sum: a job sent ahead behind a
  running one costs nothing more unless it needs more.  A machine never
  books more than it offers.
- A worker has as many GPU ids as whole GPUs it booked (``_match_gpus``),
  and a job is told the first of them as its ``CUDA_VISIBLE_DEVICES``.
- Jobs with a tag run at most as many at once as the tag's limit.
- A job that names workers runs only on those (by id or host name).
- A job that cannot fit now may have a machine kept for it (a
  reservation): nothing new starts there until it fits, except, on a lent
  worker, jobs that book nothing more.
"""
from __future__ import annotations

from cw.master.records import Job, JobQueue, WorkerRecord
from cw.wire.options import PLAIN, check_name, format_amounts, parse_amount


class Node:
    """One worker machine (a supervisor and its processes): what it offers,
    what its workers have booked, which GPU ids are free, and the job it is
    kept for, if any."""

    __slots__ = ("capacity", "free_gpus", "key", "reserved_for", "used", "workers")

    def __init__(self, key: str, capacity: dict, gpu_ids: list[str]):
        self.key = key
        self.capacity = dict(capacity)
        self.used: dict = {}
        self.free_gpus = list(gpu_ids)
        self.workers: set[int] = set()
        self.reserved_for: Job | None = None

    def can_ever_fit(self, need: dict) -> bool:
        capacity = self.capacity
        return all(amount <= capacity.get(name, 0) for name, amount in need.items())

    def growth(self, booked: dict, need: dict) -> dict | None:
        """What booking ``need`` on top of a worker's ``booked`` costs the
        machine ({} for nothing); None if it does not fit now."""
        extra = {}
        used, capacity = self.used, self.capacity
        for name, amount in need.items():
            more = amount - booked.get(name, 0)
            if more > 0:
                if used.get(name, 0) + more > capacity.get(name, 0):
                    return None
                extra[name] = more
        return extra

    def take(self, extra: dict) -> None:
        used = self.used
        for name, amount in extra.items():
            used[name] = used.get(name, 0) + amount

    def give_back(self, booked: dict, kept: dict) -> None:
        used = self.used
        for name, amount in booked.items():
            less = amount - kept.get(name, 0)
            if less > 0:
                used[name] = used.get(name, 0) - less

    def free_gpu_ids(self, ids: list[str]) -> None:
        self.free_gpus += ids
        self.free_gpus.sort(key=lambda i: (len(i), i))   # "2" before "10"

    def book(self, worker: WorkerRecord, extra: dict) -> None:
        """The worker books ``extra`` more (what ``growth`` said)."""
        self.take(extra)
        booked = worker.booked
        for name, amount in extra.items():
            booked[name] = booked.get(name, 0) + amount
        self._match_gpus(worker)

    def rebook(self, worker: WorkerRecord, kept: dict) -> None:
        """The worker's booking shrinks to ``kept``."""
        self.give_back(worker.booked, kept)
        worker.booked = kept
        self._match_gpus(worker)

    def _match_gpus(self, worker: WorkerRecord) -> None:
        """A worker has one GPU id per whole GPU it booked."""
        want, have = int(worker.booked.get("gpu", 0)), worker.gpus
        if want > len(have):
            more = want - len(have)
            have += self.free_gpus[:more]
            del self.free_gpus[:more]
        elif want < len(have):
            self.free_gpu_ids(have[want:])
            del have[want:]


def worker_offer(info: dict) -> tuple[dict, list[str]]:
    """The resources and GPU ids a worker's HELLO declares for its machine,
    read by the rules jobs' amounts follow (what breaks them is left out); a
    worker that declares none offers one CPU (itself)."""
    offer = info.get("resources")
    if not isinstance(offer, dict) or not offer:
        return dict(PLAIN), []
    clean = {}
    for name, amount in offer.items():
        try:
            clean[check_name(name)] = parse_amount(amount, str(name))
        except ValueError:
            continue
    gpus = int(clean.get("gpu", 0))
    ids = info.get("gpu_ids")
    ids = [str(i) for i in ids] if isinstance(ids, list) else []
    ids += [str(i) for i in range(len(ids), gpus)]     # declared but not named: 0..n-1
    if gpus:
        clean["gpu"] = gpus
    return clean, ids[:gpus]


class TagLimits:
    """How many jobs of each tag may run at once, and how many do."""

    def __init__(self):
        self.limits: dict[str, int] = {}
        self.running: dict[str, int] = {}   # jobs at workers

    def set(self, tag: str, limit: int | None) -> None:
        if limit is None:
            self.limits.pop(tag, None)
        else:
            self.limits[tag] = limit

    def full(self, tag: str | None) -> bool:
        """No more jobs with this tag may start now."""
        limit = self.limits.get(tag) if tag is not None else None
        return limit is not None and self.running.get(tag, 0) >= limit

    def started(self, tag: str | None) -> None:
        if tag is not None:
            self.running[tag] = self.running.get(tag, 0) + 1

    def stopped(self, tag: str | None) -> None:
        if tag is not None:
            self.running[tag] -= 1

    def report(self) -> dict:
        return {t: {"limit": n, "running": self.running.get(t, 0)} for t, n in self.limits.items()}


def allowed(queue: JobQueue, worker: WorkerRecord) -> bool:
    """The queue's jobs may run on this worker (they name it, or name none)."""
    names = queue.allowed
    return names is None or worker.wid in names or worker.info.get("host") in names


def fits(worker: WorkerRecord, job: Job) -> dict | None:
    """What giving ``job`` to ``worker`` books on its machine ({} for
    nothing more), or None if it does not fit there now."""
    node = worker.node
    growth = node.growth(worker.booked, job.queue.need)
    reserved_for = node.reserved_for
    if reserved_for is not None and reserved_for is not job and growth is not None:
        if not reserved_for.waiting:
            node.reserved_for = None
        elif reserved_for.queue is job.queue:
            # A job of the same queue came back ahead of it (its worker died):
            # the machine is kept for whichever of them is first, or neither
            # would ever go.
            node.reserved_for = job
        elif growth or not worker.lent:
            # Kept for a bigger job.  A lent worker may still run what books
            # nothing more: its parent waits for it, and the big job for the parent.
            return None
    return growth


def _names(names) -> str:
    return ", ".join(str(a) for a in sorted(names, key=str))


class Placement:
    """The machines of the connected workers (``workers``, the dispatcher's
    own dict) and the tag limits: which worker a job may go to."""

    def __init__(self, workers: dict[int, WorkerRecord]):
        self.workers = workers
        self.nodes: dict[str, Node] = {}
        self.tags = TagLimits()

    def join(self, wid: int, info: dict) -> Node:
        """The machine of a worker that connects (its HELLO's ``node``, if any, is shared)."""
        key = info.get("node")
        key = f"node:{key}" if isinstance(key, str) and key else f"worker:{wid}"
        node = self.nodes.get(key)
        if node is None:
            node = self.nodes[key] = Node(key, *worker_offer(info))
        node.workers.add(wid)
        return node

    def leave(self, worker: WorkerRecord) -> None:
        """A worker that left, after its jobs did: its machine goes with its last worker."""
        node = worker.node
        node.workers.discard(worker.wid)
        if not node.workers:
            del self.nodes[node.key]

    def find(self, queue: JobQueue, job: Job, idle: dict, spare: dict):
        """(worker, growth) for the queue's head, first fit, or None.  Idle
        workers come first; a job that asks for nothing may also be sent
        ahead to one in ``spare`` (running a job, with a slot free)."""
        workers = self.workers
        if queue.key is None:
            for pool in (idle, spare):
                for wid in pool:
                    worker = workers[wid]
                    growth = fits(worker, job)
                    if growth is not None:
                        return worker, growth
            return None
        if self.tags.full(queue.tag):
            return None
        for wid in idle:
            worker = workers[wid]
            if worker.jobs:
                continue       # lent: it takes only jobs that ask for nothing more
            if not allowed(queue, worker):
                continue
            growth = fits(worker, job)
            if growth is not None:
                return worker, growth
        return None

    def can_take_plain(self, worker: WorkerRecord) -> bool:
        """The worker could run a job that asks for nothing (one taken over from another)."""
        node = worker.node
        if node.reserved_for is not None and node.reserved_for.waiting:
            return False
        return node.growth(worker.booked, PLAIN) is not None

    def reserve(self, queue: JobQueue, job: Job) -> None:
        """Keeps a machine free for ``job``, which found no room now, so
        smaller jobs cannot starve it."""
        if job.need is PLAIN or self.tags.full(queue.tag):
            return                 # waits for the limit, not for room: keeping a machine helps nothing
        if any(node.reserved_for is job for node in self.nodes.values()):
            return
        for worker in self.workers.values():
            node = worker.node
            if node.reserved_for is None or not node.reserved_for.waiting:
                if allowed(queue, worker) and node.can_ever_fit(job.need) and not worker.draining:
                    node.reserved_for = job
                    return

    def why_never(self, queue: JobQueue) -> str | None:
        """Why no connected worker could ever run jobs of this queue, or None."""
        candidates = [w for w in self.workers.values() if allowed(queue, w) and not w.draining]
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

    def book(self, worker: WorkerRecord, job: Job, growth: dict) -> dict | None:
        """``job`` goes to ``worker``: books what it takes; returns the
        environment that tells the job what it was given (None: nothing to tell)."""
        node = worker.node
        if growth:
            node.book(worker, growth)
        if node.reserved_for is job:
            node.reserved_for = None
        queue = job.queue
        if queue.tag is not None:
            self.tags.started(queue.tag)
        need, threads = queue.need, queue.threads
        if need is PLAIN and not node.capacity.get("gpu") and threads is None:
            return None
        env = {}
        if threads is not None:
            env["CW_JOB_THREADS"] = str(threads)
        if node.capacity.get("gpu"):
            env["CUDA_VISIBLE_DEVICES"] = ",".join(worker.gpus[:int(need.get("gpu", 0))])
        if need is not PLAIN:
            env["CW_JOB_CPUS"] = str(need.get("cpu", 1))
            if "mem" in need:
                env["CW_JOB_MEM"] = str(int(need["mem"]))
        return env

    def release(self, worker: WorkerRecord, job: Job) -> None:
        """``job`` left ``worker`` (already out of ``worker.jobs``): the
        worker keeps booked the most its other jobs need."""
        queue = job.queue
        if queue.tag is not None:
            self.tags.stopped(queue.tag)
        if queue.need is PLAIN and worker.jobs:
            return        # what it needed, the jobs left need too
        kept: dict = {}
        for other in worker.jobs:
            for name, amount in other.need.items():
                if amount > kept.get(name, 0):
                    kept[name] = amount
        worker.node.rebook(worker, kept)
