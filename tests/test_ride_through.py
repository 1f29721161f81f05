"""Clients ride through a lost master: their unfinished futures wait while
the client reaches a master again (the same one restarted on its port), then
every unfinished job is given to it again; jobs submitted meanwhile wait in
the client.  Only when the reconnect window ends do futures fail."""
from __future__ import annotations

import os
import threading
import time

import pytest
from conftest import wait_until

from cw.client import ClientThread
from cw.errors import BrokenCluster
from cw.launch.local import start_master


@pytest.fixture
def restartable():
    """A master with two workers whose master can be killed and started
    again on the same port; stops whatever runs at the end."""
    cluster = start_master(port=0)
    cluster.add_workers(2)
    cluster.wait_for_workers(2)
    state = {"cluster": cluster, "masters": [cluster.master]}

    def restart():
        cluster.master.kill()
        cluster.master.wait()
        again = start_master(port=cluster.port)
        cluster.master = again.master
        state["masters"].append(again.master)

    state["restart"] = restart
    yield state
    cluster.stop()
    for proc in state["masters"]:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def slow_square(x, delay):
    time.sleep(delay)
    return x * x


def test_futures_survive_a_master_restart_and_each_completes_once(restartable, tmp_path):
    cluster = restartable["cluster"]
    runs = tmp_path / "runs"
    runs.mkdir()

    def job(i):
        # Each run leaves a mark: a job may run twice (at least once), but its future completes once.
        (runs / f"{i}.{os.getpid()}.{time.monotonic_ns()}").touch()
        time.sleep(0.05)
        return i * 10

    with cluster.executor(reconnect_timeout=60) as ex:
        futures = [ex.submit(job, i) for i in range(40)]
        wait_until(lambda: len(os.listdir(runs)) >= 4, what="some jobs to run")
        restartable["restart"]()
        # Submitted while the master may still be away: these wait in the client.
        later = [ex.submit(lambda i=i: -i) for i in range(10)]
        assert [f.result(timeout=60) for f in futures] == [i * 10 for i in range(40)]
        assert [f.result(timeout=60) for f in later] == [-i for i in range(10)]
        done = []
        for f in futures:
            f.add_done_callback(done.append)
        assert len(done) == 40             # each once: a completed future stays as it is
        # Every job ran at least once.
        ran = {int(name.split(".")[0]) for name in os.listdir(runs)}
        assert ran == set(range(40))
        # The new master knows this client's jobs: it finished them.
        mine = [c for c in ex.status()["clients"] if c["pid"] == os.getpid() and c["submitted"]]
        assert mine and mine[0]["done"] >= 10


def test_limits_and_the_context_reach_a_restarted_master(restartable, tmp_path):
    cluster = restartable["cluster"]
    with cluster.executor(reconnect_timeout=60) as ex:
        ex.limit("db", 1)
        assert ex.submit(os.getcwd).result(timeout=30) == os.getcwd()
        restartable["restart"]()
        wait_until(lambda: ex.status()["limits"].get("db", {}).get("limit") == 1, what="the limit on the new master")
        # One db job at a time on the new master, though two workers are free.
        stamps = [ex.submit(lambda: (time.time(), time.sleep(0.3), time.time())[::2], tag="db") for _ in range(3)]
        spans = sorted(f.result(timeout=60) for f in stamps)
        assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:], strict=False))
        assert ex.submit(os.getcwd).result(timeout=30) == os.getcwd()


def test_a_master_that_does_not_come_back_fails_futures_when_the_window_ends(restartable):
    cluster = restartable["cluster"]
    ex = cluster.executor(reconnect_timeout=2)
    future = ex.submit(slow_square, 3, 30)
    wait_until(lambda: ex.status()["running"] == 1, what="the job to start")
    cluster.master.kill()
    started = time.monotonic()
    exc = future.exception(timeout=30)
    waited = time.monotonic() - started
    assert isinstance(exc, BrokenCluster)
    assert "within 2 s" in str(exc) and "reconnect_timeout" in str(exc)
    assert waited >= 2.0                      # it did wait for the master, not fail at once
    with pytest.raises(BrokenCluster):
        ex.submit(slow_square, 1, 0)


def test_a_client_thread_rides_through_too(restartable):
    cluster = restartable["cluster"]
    got = {}
    lock = threading.Lock()

    def callback(jobid, result):
        with lock:
            got.setdefault(jobid, []).append(result)

    with ClientThread(callback, cluster.host, cluster.port, reconnect_timeout=60) as ct:
        for i in range(10):
            ct.submit(i, slow_square, i, 0.2)
        restartable["restart"]()
        for i in range(10, 15):
            ct.submit(i, slow_square, i, 0)
        ct.wait()
    assert got == {i: [i * i] for i in range(15)}


def test_jobs_waiting_on_their_children_survive_a_master_restart(restartable, tmp_path):
    """Every worker holds a parent job that waits on its children when the
    master dies: the parents' results still arrive once, with every child's.
    (A parent's worker cannot run another job's children while its own
    session is over, so it must not sit on its slot.)"""
    import cw
    cluster = restartable["cluster"]
    started = tmp_path / "started"
    started.mkdir()

    def child(i):
        (started / f"{i}.{os.getpid()}.{time.monotonic_ns()}").touch()
        time.sleep(0.5)
        return i * i

    def parent(base):
        inner = cw.get_executor()
        return sum(f.result() for f in [inner.submit(child, base + k) for k in range(2)])

    with cluster.executor(reconnect_timeout=60) as ex:
        parents = [ex.submit(parent, base) for base in (0, 10)]
        wait_until(lambda: len(os.listdir(started)) >= 2, what="children to start")
        restartable["restart"]()
        assert [f.result(timeout=120) for f in parents] == [0 + 1, 100 + 121]


def test_map_goes_on_after_a_master_restart(restartable):
    """``map`` over a generator keeps its window of chunks in flight: the
    chunks out when the master dies are resubmitted, the rest follow, and
    the results come in order."""
    cluster = restartable["cluster"]
    fed = []

    def numbers():
        for i in range(300):
            fed.append(i)
            yield i

    with cluster.executor(reconnect_timeout=60) as ex:
        results = ex.map(lambda i: (time.sleep(0.01), i * 3)[1], numbers(), chunksize=5, window=4)
        first = [next(results) for _ in range(30)]
        assert len(fed) < 300                       # the window holds the rest back
        restartable["restart"]()
        assert first + list(results) == [i * 3 for i in range(300)]


def test_a_job_cancelled_while_the_master_is_away_is_not_given_to_the_next_one(restartable, tmp_path):
    cluster = restartable["cluster"]
    ran = tmp_path / "ran"
    ran.mkdir()

    def job(i):
        (ran / str(i)).touch()
        return i

    with cluster.executor(reconnect_timeout=60) as ex:
        assert ex.submit(job, -1).result(timeout=30) == -1
        cluster.master.kill()
        cluster.master.wait()
        wait_until(lambda: not ex._connected.is_set(), what="the client to notice its master is gone")
        futures = [ex.submit(job, i) for i in range(6)]     # they wait in the client
        for f in futures[3:]:
            assert f.cancel()
        again = start_master(port=cluster.port)
        cluster.master = again.master
        restartable["masters"].append(again.master)
        assert [f.result(timeout=60) for f in futures[:3]] == [0, 1, 2]
        # The next job through the same workers comes after any resubmitted one would have.
        assert ex.submit(job, 99).result(timeout=60) == 99
    assert sorted(os.listdir(ran)) == sorted(["-1", "0", "1", "2", "99"])


def test_shutdown_cancelling_futures_while_the_master_is_away(restartable):
    cluster = restartable["cluster"]
    ex = cluster.executor(reconnect_timeout=60)
    future = ex.submit(slow_square, 3, 30)
    wait_until(lambda: ex.status()["running"] == 1, what="the job to start")
    cluster.master.kill()
    cluster.master.wait()
    wait_until(lambda: not ex._connected.is_set(), what="the client to notice its master is gone")
    ex.shutdown(wait=False, cancel_futures=True)          # (raised AttributeError on a None link)
    assert future.cancelled()
