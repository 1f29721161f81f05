"""Job timeouts on a worker (cw.worker.deadlines): one watcher thread for
every job of a session, not a timer thread per job."""
from __future__ import annotations

import threading

from conftest import wait_until

from cw.worker.deadlines import Deadlines


class Expiries:
    def __init__(self):
        self.gids: list[int] = []
        self.event = threading.Event()

    def __call__(self, gid: int) -> None:
        self.gids.append(gid)
        self.event.set()


def test_a_job_past_its_time_expires_and_one_that_ended_does_not():
    expired = Expiries()
    deadlines = Deadlines(expired)
    ended = deadlines.watch(1, 0.05)
    deadlines.cancel(ended)
    deadlines.watch(2, 0.1)
    assert expired.event.wait(30)
    assert expired.gids == [2]
    deadlines.stop()


def test_a_sooner_deadline_wakes_the_watcher_early():
    expired = Expiries()
    deadlines = Deadlines(expired)
    deadlines.watch(1, 3600)              # the watcher sleeps for an hour...
    wait_until(lambda: deadlines._wake_at < float("inf"), what="the watcher to wait for job 1")
    deadlines.watch(2, 0.05)              # ...unless this one wakes it
    assert expired.event.wait(30)         # (a timeout only to catch a hang)
    assert expired.gids == [2]
    deadlines.stop()


def test_many_jobs_share_one_thread(cluster):
    # A script's closure, as users submit: each job lists the threads of its worker.
    def threads_now(_):
        return sorted(t.name for t in threading.enumerate())

    with cluster.executor(timeout=60) as ex:
        seen = list(ex.map(threads_now, range(100)))
    assert all("cw-deadlines" in names for names in seen)
    # A timer thread per job would add a new name to every job's list.
    assert len(set().union(*map(set, seen))) < 20, seen[-1]
