"""The master's status report: the dict ``Dispatcher.status()`` returns,
which ``python -m cw.status`` and ``ClusterExecutor.status()`` show.

A job sent ahead to a busy worker has not started: it counts as queued, and
a worker's ``held`` says how many it has (the report's name for them).
"""
from __future__ import annotations

from collections import deque
from typing import TYPE_CHECKING

from cw.master.records import AHEAD, QUEUED

if TYPE_CHECKING:
    from cw.master.dispatch import Dispatcher

#: Seconds over which the report gives throughput.
THROUGHPUT_WINDOW = 60


class Throughput:
    """Jobs finished per second over the last ``THROUGHPUT_WINDOW`` seconds."""

    def __init__(self):
        self.seconds: deque = deque()      # [second, jobs finished in it]

    def count(self, now: float) -> None:
        second = int(now)
        seconds = self.seconds
        if seconds and seconds[-1][0] == second:
            seconds[-1][1] += 1
        else:
            seconds.append([second, 1])
            while seconds[0][0] <= second - THROUGHPUT_WINDOW:
                seconds.popleft()

    def report(self, now: float, started: float) -> dict:
        done = sum(n for s, n in self.seconds if s > int(now) - THROUGHPUT_WINDOW)
        return {"window_s": THROUGHPUT_WINDOW, "jobs": done,
                "per_s": round(done / min(THROUGHPUT_WINDOW, max(now - started, 1.0)), 2)}


def _by_client(jobs) -> dict:
    """{client id (str, for JSON): [its job ids]} of some running jobs."""
    out: dict = {}
    for job in jobs:
        if job.client is not None:
            out.setdefault(str(job.client.cid), []).append(job.jobid)
    return out


def _workers(d: Dispatcher, now: float) -> list[dict]:
    return [{
        "id": w.wid, "host": w.info.get("host"), "pid": w.info.get("pid"),
        "node": w.node.key.partition(":")[2] if w.node.key.startswith("node:") else None,
        "resources": w.node.capacity,
        "state": "draining" if w.draining else "lending" if w.lent else "busy" if w.jobs else "idle",
        "current": [j.jobid for j in w.running() if j.client is not None],
        "current_jobs": _by_client(w.running()),
        "held": w.ahead, "jobs_done": w.done, "failures": w.failures,
        "connected_s": round(now - w.since, 3),
    } for w in d.workers.values()]


def _ahead_by_client(d: Dispatcher) -> dict[int, int]:
    """Jobs sent ahead and not started, by client id: read from the workers'
    books (a few jobs each), not from the clients' (every job they have)."""
    ahead: dict[int, int] = {}
    for w in d.workers.values():
        for job in w.jobs:
            if job.state == AHEAD and job.client is not None:
                cid = job.client.cid
                ahead[cid] = ahead.get(cid, 0) + 1
    return ahead


def _queued_by_priority(c) -> dict[int, int]:
    """{priority: jobs queued} of one client.  A client with one queue of one
    priority (the usual) has them all there: its count says how many, with
    no walk through a queue that may hold millions (a dashboard asks every
    second).  Otherwise the buckets are counted, skipping jobs cancelled
    while queued, which stay in them until they reach the head."""
    queues = c.queues
    if len(queues) == 1:
        buckets = next(iter(queues.values())).buckets
        if len(buckets) == 1:
            return {next(iter(buckets)): c.queued} if c.queued else {}
    by_priority: dict[int, int] = {}
    for queue in queues.values():
        for priority, bucket in queue.buckets.items():
            count = sum(1 for j in bucket if j.state == QUEUED)
            if count:
                by_priority[priority] = by_priority.get(priority, 0) + count
    return by_priority


def _clients(d: Dispatcher, now: float) -> tuple[list, list, list]:
    """(clients, queues by priority, jobs waiting for a worker that could run them)."""
    clients, queues, waiting = [], [], []
    ahead_by_client = _ahead_by_client(d)
    for c in d.clients.values():
        ahead = ahead_by_client.get(c.cid, 0)
        clients.append({
            "id": c.cid, "host": c.info.get("host"), "pid": c.info.get("pid"),
            "submitted": c.submitted, "done": c.done, "failed": c.failed, "paused": c.paused,
            "weight": c.weight, "queued": c.queued + ahead, "running": len(c.jobs) - c.queued - ahead,
        })
        by_priority = _queued_by_priority(c)
        for queue in c.queues.values():
            if queue.waiting_since is not None:
                waiting.append({"client": c.cid, "count": sum(1 for _ in queue.jobs()), "reason": queue.reason,
                                "since_s": round(now - queue.waiting_since, 1)})
        queues += [{"client": c.cid, "priority": p, "queued": n} for p, n in sorted(by_priority.items())]
    return clients, queues, waiting


def status(d: Dispatcher) -> dict:
    now = d.clock()
    clients, queues, waiting = _clients(d, now)
    running = sum(min(len(w.jobs), 1 + w.lent) for w in d.workers.values())
    ahead = sum(w.ahead for w in d.workers.values())
    return {"workers": _workers(d, now), "clients": clients, "queues": queues, "waiting": waiting,
            "limits": d.placement.tags.report(),
            "queued": d.queued + ahead, "running": running,
            "throughput": d.throughput.report(now, d.started), "functions": d.functions.report(),
            "kept": d.kept.report(),
            "uptime_s": round(now - d.started, 3)}
