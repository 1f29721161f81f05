"""The master's status report with many jobs queued (cw.master.report): a
client's counts come from its books and the workers', not from a walk
through every job it has (a dashboard asks every second).  Pure calls to
the dispatcher, no sockets."""
from __future__ import annotations

from collections import deque

from test_dispatch import drain, of
from test_dispatch_scheduling import client, submit, worker

from cw.master.dispatch import Dispatcher
from cw.wire.frames import Frame, Status

C1, C2, W1, W2 = 101, 102, 1, 2


class NotWalked(deque):
    def __iter__(self):
        raise AssertionError("the status walked a queue of jobs")


class JobsNotWalked(dict):
    def values(self):
        raise AssertionError("the status walked a client's jobs")


def queues_of(status):
    return {(q["client"], q["priority"]): q["queued"] for q in status["queues"]}


def test_a_client_with_one_queue_is_reported_from_its_counts_without_a_walk():
    d = Dispatcher(slots=2)
    client(d, C1)
    worker(d, W1)
    for jobid in range(10_000):
        submit(d, C1, jobid)
    drain(d)                                      # W1 runs one and holds one
    record = d.clients[C1]
    (queue,) = record.queues.values()
    (priority,) = queue.buckets
    queue.buckets[priority] = NotWalked(queue.buckets[priority])
    record.jobs = JobsNotWalked(record.jobs)
    status = d.status()
    assert queues_of(status) == {(C1, 0): 9_998}
    (c,) = status["clients"]
    assert (c["queued"], c["running"]) == (9_999, 1)      # the held one counts as queued
    assert status["workers"][0]["held"] == 1


def test_counts_stay_exact_with_two_priorities_cancelled_jobs_and_jobs_held_ahead():
    d = Dispatcher(slots=2)
    client(d, C1)
    client(d, C2)
    worker(d, W1)
    worker(d, W2)
    for jobid in range(6):
        submit(d, C1, jobid)
    for jobid in range(6, 10):
        submit(d, C1, jobid, priority=5)
    for jobid in range(4):
        submit(d, C2, jobid)
    jobs = of(drain(d), Frame.JOB)
    assert len(jobs) == 4                         # two workers, each running one and holding one
    d.cancel(C1, 3)                               # queued: stays in its bucket until it reaches the head
    d.cancel(C1, 9)
    drain(d)
    status = d.status()
    held = [(j, i > 0) for w in d.workers.values() for i, j in enumerate(w.jobs) if j.client is not None]
    ahead = {c: sum(1 for j, later in held if later and j.client.cid == c) for c in (C1, C2)}
    sent = {c: sum(1 for j, _ in held if j.client.cid == c) for c in (C1, C2)}
    # (a cancelled job that had been sent is aborted there: it is no client's any more, and not in ``held``)
    queued = {C1: 10 - 2 - sent[C1], C2: 4 - sent[C2]}
    by_client = {c["id"]: c for c in status["clients"]}
    for cid in (C1, C2):
        assert by_client[cid]["queued"] == queued[cid] + ahead[cid]
        assert by_client[cid]["running"] == sent[cid] - ahead[cid]
    assert sum(n for (cid, _), n in queues_of(status).items() if cid == C1) == queued[C1]
    assert queues_of(status)[(C2, 0)] == queued[C2]
    # And after jobs end, the counts follow.
    for fields in jobs:
        d.outcome(W1 if any(j.gid == fields[0] for j in d.workers[W1].jobs) else W2, fields[0], Status.OK, b"")
    drain(d)
    assert d.status()["queued"] + d.status()["running"] == sum(len(c.jobs) for c in d.clients.values())
