"""A job's BLAS/OpenMP thread pools match the CPUs it was given (cw/worker/threads.py):
one by default, N for resources={"cpu": N}, whether numpy was loaded before the job or
by it; the worker's --job-threads and the job's threads= override that."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from cw.wire import options
from cw.worker import threads

np = pytest.importorskip("numpy")
pytest.importorskip("threadpoolctl")

#: Cores OpenBLAS sees: it caps the count it reads from OPENBLAS_NUM_THREADS at load time to them.
CORES = os.cpu_count() or 1


def _user_functions():
    """The jobs, defined in a function so that they travel by value, as a
    user's script functions and lambdas do (the worker never imports this module)."""
    def report():
        """The BLAS pools' thread counts as threadpoolctl sees them from
        inside the job, and the OPENBLAS_NUM_THREADS the job sees."""
        import numpy  # noqa: F401  (a job that loads numpy first loads it here)
        from threadpoolctl import threadpool_info
        counts = sorted({info["num_threads"] for info in threadpool_info() if info["user_api"] == "blas"})
        return counts, os.environ.get("OPENBLAS_NUM_THREADS")

    def load_numpy():
        import numpy  # noqa: F401

    return report, load_numpy


report, load_numpy = _user_functions()


def start_worker(master, *args, env=None):
    """One worker process (with its supervisor) with these options; the
    cluster's stop() stops it."""
    proc = subprocess.Popen([sys.executable, "-m", "cw.worker", master.address, "-n", "1",
                             "--log-level", "WARNING", *args], stdin=subprocess.DEVNULL, env=env)
    master.workers.append(proc)
    master.wait_for_workers(len(master.workers))
    return proc


def test_a_plain_job_gets_one_blas_thread_whoever_loaded_numpy(master):
    start_worker(master)
    with master.executor() as ex:
        # The worker process has not loaded numpy: the job loads it (the variables do it).
        assert ex.submit(report).result(timeout=60) == ([1], "1")
        # Loaded before the job: threadpoolctl (the job loading it the first time set nothing).
        assert ex.submit(report).result(timeout=60) == ([1], "1")


def test_a_job_given_four_cpus_gets_four_threads(master):
    start_worker(master, "--resources", "cpu=4")
    four = {"resources": {"cpu": 4}}
    with master.executor() as ex:
        # numpy loaded first by a 4-CPU job: it starts with OPENBLAS_NUM_THREADS=4
        # (OpenBLAS caps what it reads at load time to the cores it sees).
        assert ex.submit_with(report, **four).result(timeout=60) == ([min(4, CORES)], "4")
        assert ex.submit(report).result(timeout=60) == ([1], "1")       # a plain job after it: 1 again
        # numpy loaded before the job: threadpoolctl raises the pools to 4.
        assert ex.submit_with(report, **four).result(timeout=60) == ([4], "4")
        assert ex.submit(report).result(timeout=60) == ([1], "1")


def test_a_worker_that_loaded_numpy_in_a_setup_job_sizes_later_jobs(master):
    start_worker(master, "--resources", "cpu=4")
    with master.executor() as ex:
        ex.submit(load_numpy).result(timeout=60)
        assert ex.submit_with(report, resources={"cpu": 4}).result(timeout=60) == ([4], "4")
        assert ex.submit(lambda: report()).result(timeout=60) == ([1], "1")


def test_the_jobs_threads_option_overrides_its_cpus(master):
    start_worker(master, "--resources", "cpu=4")
    with master.executor() as ex:
        ex.submit(load_numpy).result(timeout=60)
        assert ex.submit_with(report, threads=3).result(timeout=60) == ([3], "3")
        assert ex.submit_with(report, threads=2, resources={"cpu": 4}).result(timeout=60) == ([2], "2")
        assert ex.submit(report).result(timeout=60) == ([1], "1")
        with pytest.raises(ValueError, match="threads must be a whole number from 1"):
            ex.submit_with(report, threads=0)
        with pytest.raises(ValueError, match="threads must be"):
            ex.submit_with(report, threads="4")


def test_the_worker_option_sets_every_jobs_count(master):
    start_worker(master, "--job-threads", "3")
    with master.executor() as ex:
        assert ex.submit(report).result(timeout=60) == ([min(3, CORES)], "3")
        assert ex.submit(report).result(timeout=60) == ([3], "3")
        assert ex.submit_with(report, threads=2).result(timeout=60) == ([2], "2")   # the job's option wins
        assert ex.submit(report).result(timeout=60) == ([3], "3")


def test_job_threads_off_leaves_the_libraries_alone(master):
    env = {k: v for k, v in os.environ.items() if k not in threads.THREAD_VARS}
    env["OPENBLAS_NUM_THREADS"] = "2"      # the machine's own setting, which "off" keeps
    start_worker(master, "--job-threads", "off", env=env)
    with master.executor() as ex:
        assert ex.submit(report).result(timeout=60) == ([min(2, CORES)], "2")
        assert ex.submit_with(report, threads=1).result(timeout=60) == ([1], "1")   # asked for: given
        assert ex.submit(report).result(timeout=60) == ([min(2, CORES)], "2")       # and given back


def test_a_nested_job_and_the_job_waiting_on_it_keep_their_own_counts(master):
    # A child runs in the process of its parent, which lends its worker while it
    # waits: the child gets its own count, and the parent its own back after.
    start_worker(master)

    def parent():
        import cw
        before = report()
        child = cw.get_executor().submit(report).result(timeout=60)
        return before, child, report(), os.getpid()

    with master.executor() as ex:
        ex.submit(load_numpy).result(timeout=60)
        before, child, after, _ = ex.submit_with(parent, threads=2).result(timeout=60)
        assert (before, child, after) == (([2], "2"), ([1], "1"), ([2], "2"))


def test_a_bad_job_threads_value_is_a_clear_error():
    proc = subprocess.run([sys.executable, "-m", "cw.worker", "localhost:1", "--job-threads", "lots"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "--job-threads 'lots' is not valid: write 'cpus'" in proc.stderr


def test_policies_and_counts():
    assert threads.parse_policy("cpus") == "cpus" and threads.parse_policy("OFF") == "off"
    assert threads.parse_policy("8") == 8
    for bad in ("0", "-1", "1.5", "", "many"):
        with pytest.raises(ValueError, match="--job-threads"):
            threads.parse_policy(bad)
    assert threads.job_count("cpus", {"CW_JOB_CPUS": "4"}) == 4
    assert threads.job_count("cpus", {"CW_JOB_CPUS": "0.5"}) == 1
    assert threads.job_count(3, {"CW_JOB_CPUS": "4"}) == 3
    assert threads.job_count("off", {"CW_JOB_CPUS": "4"}) is None
    assert threads.job_count("off", {"CW_JOB_THREADS": "2", "CW_JOB_CPUS": "4"}) == 2
    assert threads.worker_environ({"A": "b", "OMP_NUM_THREADS": "8"}, "cpus")["OMP_NUM_THREADS"] == "1"
    assert threads.worker_environ({"OMP_NUM_THREADS": "8"}, "off") == {"OMP_NUM_THREADS": "8"}


def test_the_master_accepts_the_threads_option_the_client_sends():
    assert options.check_submitted({"threads": 4}) == {"threads": 4}
    for bad in (0, True, 2.5, "4", 10 ** 6):
        with pytest.raises(Exception, match="threads must be"):
            options.check_submitted({"threads": bad})
