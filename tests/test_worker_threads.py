"""How a worker's threads share the work (cw/worker/session.py, Session): the
reader's role passes to another thread when the reader runs a job itself."""
from __future__ import annotations

import jobs
import pytest
from conftest import wait_until


@pytest.fixture
def one_worker(master):
    master.add_workers(1)
    master.wait_for_workers(1)
    with master.executor() as ex:
        yield ex


def test_a_job_reaching_an_idle_worker_runs_on_the_thread_that_read_it(one_worker):
    # The reader runs such a job itself and an idle runner becomes the reader,
    # so one-at-a-time jobs run on both threads in turn.  Were every job handed
    # to a runner thread (a wake-up on each job's way), one thread would run them all.
    calls = [one_worker.submit(jobs.pid_and_thread).result(timeout=30) for _ in range(20)]
    assert len({pid for pid, _ in calls}) == 1
    assert len({thread for _, thread in calls}) >= 2


def test_a_job_run_by_the_reader_can_still_be_cancelled(one_worker, tmp_path):
    # While the former reader runs the job, the new reader must take the ABORT.
    started, release = tmp_path / "started", tmp_path / "release"
    started.mkdir()
    first_pid = one_worker.submit(jobs.pid).result(timeout=30)
    future = one_worker.submit(jobs.block, str(started), str(release))
    wait_until(lambda: any(started.iterdir()), what="the job to start")
    assert future.cancel()
    # The job could not be stopped otherwise: its worker process is replaced.
    wait_until(lambda: one_worker.submit(jobs.pid).result(timeout=30) != first_pid,
               what="a new worker process to run jobs")
    assert not release.exists()
