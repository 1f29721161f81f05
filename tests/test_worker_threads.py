"""How a worker's threads share the work (cw/worker/session.py, Session): a
job that reaches an idle worker runs on the thread that read it; the reading
is put off to a standby thread, which takes it only when a job runs long."""
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


def test_quick_jobs_one_at_a_time_stay_on_one_thread(one_worker):
    # A quick job ends before the standby takes the reading over, so its own
    # thread reads the next job and runs it too: no thread wakes between them.
    # Were the reading handed to another thread with each job (as before),
    # the jobs would alternate between two threads.  (A job held up past the
    # standby's tick, on a loaded machine, moves the stream to the standby:
    # a few moves are allowed.)
    one_worker.submit(jobs.pid_and_thread).result(timeout=30)     # (the first job imports the module)
    threads = [one_worker.submit(jobs.pid_and_thread).result(timeout=30)[1] for _ in range(20)]
    moves = sum(a != b for a, b in zip(threads, threads[1:], strict=False))
    assert moves <= 4, threads


def test_a_job_run_by_the_reader_can_still_be_cancelled(one_worker, tmp_path):
    # While the former reader runs the job, the standby must start reading and take the ABORT.
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
