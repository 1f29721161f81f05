"""However a job ends its worker process, the supervisor replaces the process
and the job fails with WorkerLost: no exit status or signal a job can produce
is read as a message from the worker (it says why it exits on a channel of
its own)."""
from __future__ import annotations

import os
import signal
import sys
import threading

import pytest

from cw.errors import WorkerLost

# What a job may do to the process that runs it.
ENDINGS = {f"os._exit({n})": (lambda n=n: os._exit(n)) for n in (0, 1, 2, 3, 4, 5, 6, 255)}
ENDINGS["SIGSEGV via ctypes"] = lambda: __import__("ctypes").string_at(0)
ENDINGS["SIGKILL"] = lambda: os.kill(os.getpid(), signal.SIGKILL)
ENDINGS["SIGABRT"] = lambda: os.abort()


@pytest.fixture(scope="module")
def two_workers():
    from cw.launch.local import start_master
    cluster = start_master(port=0)
    cluster.add_workers(2)
    cluster.wait_for_workers(2)
    yield cluster
    cluster.stop()


@pytest.mark.parametrize("ending", list(ENDINGS))
def test_a_job_that_ends_its_process_fails_and_the_worker_is_replaced(two_workers, ending):
    with two_workers.executor(max_retries=1) as ex:
        crash = ex.submit(ENDINGS[ending])
        exc = crash.exception(timeout=60)
        assert isinstance(exc, WorkerLost), exc
        assert exc.attempts == 2        # re-run once, as any crash
        # Both worker processes died, and both were replaced: later jobs run.
        assert list(ex.map(lambda x: x * x, range(20), timeout=60)) == [x * x for x in range(20)]
    two_workers.wait_for_workers(2, timeout=30)


def test_two_crashing_jobs_leave_a_two_worker_cluster_working(two_workers):
    # The defect this file was written for: two jobs calling os._exit(3)
    # retired both workers for good, and the queued jobs waited for ever.
    with two_workers.executor(max_retries=0) as ex:
        crashes = [ex.submit(lambda: os._exit(3)) for _ in range(2)]
        queued = [ex.submit(lambda i=i: i + 1) for i in range(50)]
        for f in crashes:
            assert isinstance(f.exception(timeout=60), WorkerLost)
        assert [f.result(timeout=60) for f in queued] == list(range(1, 51))


def test_sys_exit_in_a_thread_the_job_started_ends_only_that_thread(two_workers):
    def job():
        t = threading.Thread(target=sys.exit, args=(3,))
        t.start()
        t.join()
        return os.getpid()

    with two_workers.executor() as ex:
        pid = ex.submit(job).result(timeout=60)
        assert ex.submit(os.getpid).result(timeout=60) in {pid, *[w.pid for w in ex.workers()]}
        assert pid in [w.pid for w in ex.workers()]     # the process lives on


def test_a_worker_keeps_looking_for_a_master_past_one_attempt(tmp_path):
    # One connection attempt lasts at most 5 s (then the address is asked
    # again); a master that comes up later, within --connect-timeout, still
    # gets the worker: it once gave up after the first attempt (issue 13).
    import socket
    import subprocess

    from conftest import wait_until

    from cw.launch.local import start_master
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = tmp_path / "worker.log"
    with open(log, "w") as err:
        worker = subprocess.Popen([sys.executable, "-m", "cw.worker", f"127.0.0.1:{port}", "--connect-timeout", "60"],
                                  stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err)
    try:
        wait_until(lambda: "trying again" in log.read_text(), timeout=30, what="the first attempt to run out")
        assert worker.poll() is None, log.read_text()
        cluster = start_master(port=port)
        try:
            cluster.wait_for_workers(1, timeout=30)
        finally:
            cluster.stop()
    finally:
        worker.terminate()
        worker.wait(30)
