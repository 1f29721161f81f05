"""A worker whose jobs are quick holds twice its slots (cw.master.slots):
pure calls to the dispatcher, a clock the test moves, no sockets."""
from __future__ import annotations

import pytest
from test_dispatch import drain, of, submit
from test_dispatch_scheduling import Clock, client, worker

from cw import settings
from cw.master.dispatch import Dispatcher
from cw.wire.frames import Frame, Status

C1, W1, W2 = 101, 1, 2


class OneWorker:
    """Runs W1's jobs in order, each taking ``seconds`` on the test's clock."""

    def __init__(self, slots: int, jobs: int = 1000):
        self.clock = Clock()
        self.d = Dispatcher(slots=slots, clock=self.clock)
        client(self.d, C1)
        worker(self.d, W1)
        submit(self.d, C1, *range(jobs))
        self.held = [job[0] for job in of(drain(self.d), Frame.JOB, W1)]

    def finish_one(self, seconds: float) -> int:
        """Ends the oldest held job; returns how many W1 holds after the master answered."""
        self.clock.now += seconds
        self.d.outcome(W1, self.held.pop(0), Status.OK, b"")
        self.held += [job[0] for job in of(drain(self.d), Frame.JOB, W1)]
        return len(self.held)


def test_quick_jobs_in_a_row_double_what_a_worker_holds_and_one_slow_job_ends_that():
    run = OneWorker(slots=2)
    assert len(run.held) == 2
    quick = settings.QUICK_JOB / 2
    held = [run.finish_one(quick) for _ in range(settings.QUICK_STREAK - 1)]
    assert held == [2] * (settings.QUICK_STREAK - 1)          # not yet a streak
    assert run.finish_one(quick) == 4                          # the streak: twice the slots, at once
    assert [run.finish_one(quick) for _ in range(20)] == [4] * 20
    # One slow job: no job replaces it, nor the next ones, until it holds two again.
    assert [run.finish_one(settings.QUICK_JOB * 2)] + [run.finish_one(quick) for _ in range(2)] == [3, 2, 2]


def test_a_pause_between_quick_jobs_ends_the_streak():
    run = OneWorker(slots=2)
    for _ in range(settings.QUICK_STREAK):
        run.finish_one(0.0)
    assert len(run.held) == 4
    assert run.finish_one(5.0) == 3                           # the worker stalled (or nothing came)
    assert run.finish_one(0.0) == 2


@pytest.mark.parametrize("slots", [1, 3])
def test_quick_jobs_hold_twice_the_slots_given_and_never_prefetch_with_one(slots):
    run = OneWorker(slots=slots)
    for _ in range(settings.QUICK_STREAK + 5):
        run.finish_one(0.0)
    assert len(run.held) == (1 if slots == 1 else 2 * slots)


def test_a_worker_falling_idle_takes_over_a_quick_workers_held_jobs():
    # The deeper hold is still a promise an idle worker may break (a steal).
    run = OneWorker(slots=2, jobs=settings.QUICK_STREAK + 4)
    for _ in range(settings.QUICK_STREAK):
        run.finish_one(0.0)
    assert len(run.held) == 4                                 # and nothing left in the queue
    d = run.d
    worker(d, W2)
    revokes = of(drain(d), Frame.REVOKE, W1)
    assert len(revokes) == 1
