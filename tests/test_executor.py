"""The concurrent.futures contract and the ClientThread API, against real processes."""
from __future__ import annotations

import concurrent.futures
import itertools
import os
import threading

import jobs
import pytest
from conftest import alive, wait_until

import cw
from cw.client import ClientThread, ClusterExecutor
from cw.errors import (
    CallPicklingError,
    CallUnpicklingError,
    RemoteError,
    RemoteTraceback,
    ResultPicklingError,
    ResultUnpicklingError,
)


def worker_pids(executor):
    return {w["pid"] for w in executor.status()["workers"]}


def test_submit_returns_result_and_names_the_worker(executor):
    future = executor.submit(jobs.add, 2, y=40)
    assert future.result(timeout=30) == 42
    assert future.worker.pid in worker_pids(executor)
    assert future.worker.host == os.uname().nodename or future.worker.host


def test_closures_and_lambdas_travel(executor):
    base = 10
    assert executor.submit(lambda x: x + base, 5).result(timeout=30) == 15


def test_jobs_are_spread_over_workers(executor):
    futures = [executor.submit(jobs.sleep, 0.05, i) for i in range(20)]
    assert [f.result(timeout=30) for f in futures] == list(range(20))
    assert len({f.worker.pid for f in futures}) == 2


@pytest.mark.parametrize("chunksize", [1, 7, 1000])
def test_map_gives_results_in_order(executor, chunksize):
    assert list(executor.map(jobs.add, range(300), range(300), chunksize=chunksize)) == [2 * i for i in range(300)]


def test_map_over_an_endless_generator_stays_bounded(executor):
    consumed = itertools.count()

    def numbers():
        for i in itertools.count():
            next(consumed)
            yield i

    results = executor.map(jobs.square, numbers(), chunksize=10, window=4)
    assert list(itertools.islice(results, 500)) == [i * i for i in range(500)]
    results.close()
    # 500 results taken, at most window chunks of chunksize read ahead.
    assert next(consumed) <= 500 + 4 * 10 + 10


def test_map_raises_at_the_failing_item(executor):
    results = executor.map(_fail_on_three, range(6), chunksize=2)
    assert next(results) == 0
    assert next(results) == 1
    assert next(results) == 2
    with pytest.raises(KeyError, match="three"):
        next(results)


def _fail_on_three(x):
    if x == 3:
        raise KeyError("three")
    return x


def test_map_timeout(executor):
    results = executor.map(jobs.sleep, [5], timeout=0.2)
    with pytest.raises(concurrent.futures.TimeoutError):
        next(results)


def test_exception_keeps_its_type_with_the_remote_traceback(executor):
    future = executor.submit(jobs.fail, "bad input")
    exc = future.exception(timeout=30)
    assert type(exc) is ValueError and str(exc) == "bad input"
    assert isinstance(exc.__cause__, RemoteTraceback)
    assert "in fail" in exc.__cause__.tb and "raise ValueError" in exc.__cause__.tb
    assert executor.submit(jobs.identity, 1).result(timeout=30) == 1


def test_each_failed_future_has_its_own_exception(executor):
    a, b = executor.submit(jobs.fail, "x"), executor.submit(jobs.fail, "x")
    assert a.exception(timeout=30) is not b.exception(timeout=30)


def test_cancel_takes_a_queued_job_out_of_the_master(executor, tmp_path):
    release = tmp_path / "release"
    marker = tmp_path / "marker"
    blockers = [executor.submit(jobs.block, str(tmp_path), str(release), i) for i in range(2)]
    wait_until(lambda: executor.status()["running"] == 2, what="both workers busy")
    queued = executor.submit(jobs.append_line, str(marker))
    wait_until(lambda: executor.status()["queued"] == 1, what="the job to be queued")
    assert queued.cancel()
    assert queued.cancelled()
    wait_until(lambda: executor.status()["queued"] == 0, what="the master to drop the job")
    release.touch()
    assert [f.result(timeout=30) for f in blockers] == [0, 1]
    # A job submitted afterwards runs; the cancelled one never did.
    assert executor.submit(jobs.identity, "after").result(timeout=30) == "after"
    assert not marker.exists()


def test_shutdown_waits_and_refuses_new_work(cluster):
    ex = cluster.executor()
    futures = [ex.submit(jobs.sleep, 0.1, i) for i in range(4)]
    ex.shutdown(wait=True)
    assert all(f.done() for f in futures)
    with pytest.raises(RuntimeError, match="cannot schedule new futures after shutdown"):
        ex.submit(jobs.identity, 1)


def _started(directory) -> list[int]:
    """The pids of the workers that started a ``jobs.block`` job there."""
    return sorted(int(p) for p in os.listdir(directory) if p.isdigit())


def test_shutdown_can_cancel_unfinished_futures(cluster, tmp_path):
    release = tmp_path / "release"
    marker = tmp_path / "marker"
    ex = cluster.executor()
    blockers = [ex.submit(jobs.block, str(tmp_path), str(release)) for _ in range(2)]
    # Both blockers started on their workers (each leaves a file named after
    # its pid), not only sent: the master's "running" counts a job on its way.
    wait_until(lambda: len(_started(tmp_path)) == 2, what="both blockers to start")
    pids = _started(tmp_path)
    queued = [ex.submit(jobs.append_line, str(marker)) for i in range(5)]
    ex.shutdown(wait=True, cancel_futures=True)
    assert all(f.cancelled() for f in queued + blockers)
    done, _ = concurrent.futures.wait(queued + blockers, timeout=0)
    assert len(done) == 7
    # The cancellations act on the workers after shutdown returns: a running
    # job's worker process is replaced.  Release the blockers only then, or a
    # blocker could finish first and its worker run a queued job whose ABORT
    # it had not read yet (the test would measure that race, not cancel).
    wait_until(lambda: not any(alive(pid) for pid in pids), what="the blockers' worker processes to be replaced")
    release.touch()
    with cluster.executor() as other:  # the queue is empty: this runs right after the blockers
        assert other.submit(jobs.identity, 1).result(timeout=30) == 1
    assert not marker.exists()


def test_context_manager_waits_for_results(cluster):
    with cluster.executor() as ex:
        futures = [ex.submit(jobs.sleep, 0.05, i) for i in range(6)]
    assert [f.result(timeout=0) for f in futures] == list(range(6))


def test_unpicklable_argument_fails_only_its_future(executor):
    future = executor.submit(jobs.identity, threading.Lock())
    assert isinstance(future.exception(timeout=30), CallPicklingError)
    assert executor.submit(jobs.identity, 3).result(timeout=30) == 3


def test_unpicklable_result_fails_only_its_future(executor):
    future = executor.submit(threading.Lock)
    exc = future.exception(timeout=30)
    assert isinstance(exc, ResultPicklingError) and "pickle" in str(exc)
    assert executor.submit(jobs.identity, 3).result(timeout=30) == 3


class _FailsToUnpickle:
    """Pickles fine; unpickling it raises wherever that happens."""

    def __reduce__(self):
        return (_refuse, ("nope",))


def _refuse(message):
    raise RuntimeError(message)


def test_argument_that_cannot_be_unpickled_on_the_worker(executor):
    future = executor.submit(jobs.identity, _FailsToUnpickle())
    exc = future.exception(timeout=30)
    assert isinstance(exc, CallUnpicklingError) and "unpickle" in str(exc)
    assert executor.submit(jobs.identity, 3).result(timeout=30) == 3


def test_result_that_cannot_be_unpickled_in_the_client(executor):
    future = executor.submit(_FailsToUnpickle)
    assert isinstance(future.exception(timeout=30), ResultUnpicklingError)
    assert executor.submit(jobs.identity, 3).result(timeout=30) == 3


class _OddError(Exception):
    def __init__(self, a, b):
        super().__init__(a)  # unpickling calls _OddError(a) and fails


def _raise_odd():
    raise _OddError("a", "b")


def test_exception_that_cannot_be_unpickled_arrives_as_remote_error(executor):
    exc = executor.submit(_raise_odd).exception(timeout=30)
    assert isinstance(exc, RemoteError) and "_OddError" in str(exc)
    assert "_raise_odd" in exc.__cause__.tb


def _odd_on_two(x):
    if x == 2:
        raise _OddError("a", "b")
    return x


def test_an_unpicklable_exception_in_a_map_chunk_fails_only_its_item(executor):
    results = executor.map(_odd_on_two, range(4), chunksize=4)
    assert [next(results), next(results)] == [0, 1]
    with pytest.raises(RemoteError, match="_OddError"):
        next(results)


def test_job_runs_in_the_clients_directory_and_path(cluster, tmp_path, monkeypatch):
    (tmp_path / "cw_helper_mod.py").write_text("VALUE = 'from the client path'\n")
    workdir = tmp_path / "work"
    workdir.mkdir()
    monkeypatch.chdir(workdir)
    monkeypatch.syspath_prepend(str(tmp_path))

    def probe():
        import cw_helper_mod
        return cw_helper_mod.VALUE, os.getcwd()

    with cluster.executor() as ex:
        assert ex.submit(probe).result(timeout=30) == ("from the client path", str(workdir))


def test_two_clients_each_get_their_own_results(cluster):
    with cluster.executor() as a, cluster.executor() as b:
        fa = [a.submit(jobs.identity, ("a", i)) for i in range(200)]
        fb = [b.submit(jobs.identity, ("b", i)) for i in range(200)]
        assert [f.result(timeout=30) for f in fa] == [("a", i) for i in range(200)]
        assert [f.result(timeout=30) for f in fb] == [("b", i) for i in range(200)]


def test_client_thread_calls_back_for_each_job(cluster):
    seen = {}
    with ClientThread(lambda jobid, result: seen.__setitem__(jobid, result),
                      host=cluster.host, port=cluster.port) as client:
        ids = [cw.randid() for _ in range(50)]
        for i, jobid in enumerate(ids):
            client.submit(jobid, jobs.square, i)
        client.wait()
        assert seen == {jobid: i * i for i, jobid in enumerate(ids)}


def test_client_thread_wait_raises_a_failed_job(cluster):
    client = ClientThread(lambda jobid, result: None, host=cluster.host, port=cluster.port)
    client.start()
    try:
        client.submit(1, jobs.fail, "broken job")
        client.submit(2, jobs.identity, 2)
        with pytest.raises(ValueError, match="broken job"):
            client.wait()
        client.wait()  # the error was reported once
    finally:
        client.stop()


def test_allocate_points_clients_at_its_master(tmp_path):
    with cw.allocate(1, port=0) as cluster:
        with ClusterExecutor() as ex:
            assert ex.submit(jobs.identity, "found").result(timeout=30) == "found"
            assert ex.port == cluster.port
    assert cluster.master.poll() is not None
    assert all(w.poll() is not None for w in cluster.workers)
