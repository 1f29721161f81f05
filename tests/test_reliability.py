"""Liveness, timeouts, aborts, draining and slow peers, with real processes."""
from __future__ import annotations

import os
import signal
import socket

import jobs
import pytest
from conftest import alive, wait_until

from cw.errors import BrokenCluster, JobTimeout
from cw.launch.local import start_master
from cw.wire import frames
from cw.wire.auth import load_secret
from cw.wire.frames import Frame
from cw.wire.link import open_link, peer_info
from cw.wire.payload import dumps_call

FAST = ["--heartbeat", "0.2", "--peer-timeout", "1.5"]


def started(directory):
    return sorted(int(p) for p in os.listdir(directory) if p.isdigit())


@pytest.fixture
def fast_cluster():
    """Two workers on a master with a 1.5 s peer timeout."""
    cluster = start_master(port=0, args=FAST)
    cluster.add_workers(2)
    cluster.wait_for_workers(2)
    yield cluster
    cluster.stop()


def test_a_frozen_worker_is_declared_lost_and_its_job_runs_elsewhere(fast_cluster, tmp_path):
    release = tmp_path / "release"
    with fast_cluster.executor() as ex:
        future = ex.submit(jobs.block, str(tmp_path), str(release), "done")
        frozen = wait_until(lambda: started(tmp_path), what="the job to start")[0]
        os.kill(frozen, signal.SIGSTOP)
        try:
            rerun = wait_until(lambda: [p for p in started(tmp_path) if p != frozen], what="the re-run")[0]
            release.touch()
            assert future.result(timeout=30) == "done"
            assert future.worker.pid == rerun
        finally:
            os.kill(frozen, signal.SIGCONT)
        # The thawed worker finds its connection gone, drops its late result
        # and reconnects; the client saw exactly one result.  (Only clients
        # that submitted: wait_for_workers's own executor, closed just now,
        # may not have left the master's books yet.)
        fast_cluster.wait_for_workers(2)
        assert [c["done"] for c in ex.status()["clients"] if c["pid"] == os.getpid() and c["submitted"]] == [1]


def test_a_client_whose_master_freezes_fails_its_futures_without_a_reconnect_window(fast_cluster):
    ex = fast_cluster.executor(reconnect_timeout=0)
    future = ex.submit(jobs.sleep, 60)
    os.kill(fast_cluster.master.pid, signal.SIGSTOP)
    try:
        exc = future.exception(timeout=30)
        assert isinstance(exc, BrokenCluster) and "nothing heard from the master" in str(exc)
    finally:
        os.kill(fast_cluster.master.pid, signal.SIGCONT)


def test_a_job_past_its_timeout_fails_and_its_worker_is_replaced(cluster, executor):
    future = executor.submit_with(jobs.sleep, (60,), timeout=0.5)
    exc = future.exception(timeout=30)
    assert isinstance(exc, JobTimeout) and isinstance(exc, TimeoutError)
    assert "timeout of 0.5 s" in str(exc)
    wait_until(lambda: not alive(future.worker.pid), what="the timed-out worker to exit")
    cluster.wait_for_workers(2)
    assert executor.submit(jobs.identity, "next").result(timeout=30) == "next"


def test_the_executor_default_timeout_applies_to_every_job(cluster):
    with cluster.executor(timeout=0.5) as ex:
        assert ex.submit(jobs.identity, 1).result(timeout=30) == 1
        assert isinstance(ex.submit(jobs.sleep, 60).exception(timeout=30), JobTimeout)
        results = ex.map(jobs.sleep, [60])
        with pytest.raises(JobTimeout):
            next(results)


def test_cancelling_a_running_job_aborts_it_on_the_worker(cluster, executor, tmp_path):
    release = tmp_path / "release"
    marker = tmp_path / "marker"

    def block_then_mark(directory, release, marker):
        jobs.block(directory, release)
        jobs.append_line(marker)

    future = executor.submit(block_then_mark, str(tmp_path), str(release), str(marker))
    pid = wait_until(lambda: started(tmp_path), what="the job to start")[0]
    assert future.cancel()
    wait_until(lambda: not alive(pid), what="the worker running the cancelled job to exit")
    release.touch()
    cluster.wait_for_workers(2)
    assert executor.submit(jobs.identity, "next").result(timeout=30) == "next"
    assert not marker.exists()


def test_sigterm_drains_a_worker_and_a_second_one_stops_it_now(cluster, executor, tmp_path):
    release = tmp_path / "release"
    first = executor.submit(jobs.block, str(tmp_path), str(release), "finished")
    pid = wait_until(lambda: started(tmp_path), what="the job to start")[0]
    os.kill(pid, signal.SIGTERM)
    wait_until(lambda: any(w["pid"] == pid and w["state"] == "draining" for w in executor.status()["workers"]),
               what="the worker to report draining")
    # It takes no new job: these go to the other worker.
    others = [executor.submit(jobs.pid) for _ in range(5)]
    assert pid not in {f.result(timeout=30) for f in others}
    release.touch()
    assert first.result(timeout=30) == "finished" and first.worker.pid == pid
    wait_until(lambda: not alive(pid), what="the drained worker to exit")

    release.unlink()
    second = executor.submit(jobs.block, str(tmp_path), str(release), "re-run")
    pid2 = wait_until(lambda: [p for p in started(tmp_path) if p != pid], what="the job to start")[0]
    os.kill(pid2, signal.SIGTERM)
    # A second SIGTERM sent before the first is handled would merge with it.
    wait_until(lambda: any(w["pid"] == pid2 and w["state"] == "draining" for w in executor.status()["workers"]),
               what="the worker to report draining")
    os.kill(pid2, signal.SIGTERM)
    wait_until(lambda: not alive(pid2), what="the worker to stop at once")
    cluster.add_workers(1)
    release.touch()
    assert second.result(timeout=30) == "re-run" and second.worker.pid != pid2


def test_a_supervisor_sigterm_lets_running_jobs_finish(master, tmp_path):
    release = tmp_path / "release"
    supervisor = master.add_workers(1)
    master.wait_for_workers(1)
    with master.executor() as ex:
        future = ex.submit(jobs.block, str(tmp_path), str(release), "kept")
        wait_until(lambda: started(tmp_path), what="the job to start")
        supervisor.terminate()
        wait_until(lambda: ex.status()["workers"][0]["state"] == "draining", what="draining")
        release.touch()
        assert future.result(timeout=30) == "kept"
    assert supervisor.wait(30) == 0


def big_result(n):
    return b"r" * n


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS")


def test_a_client_that_stops_reading_is_paused_and_hurts_no_one(cluster):
    link = open_link(cluster.host, cluster.port, load_secret(), peer_info("client"))
    try:
        context = {"cwd": os.getcwd(), "path": [os.path.dirname(jobs.__file__)]}
        link.send(frames.encode_json(Frame.CONTEXT, context))
        payload = dumps_call(big_result, (1 << 20,), {})
        before = rss_kib(cluster.master.pid)
        for jobid in range(300):      # 300 MB of results it never reads
            link.send(frames.encode_submit(jobid, 255, 0.0, payload))
        with cluster.executor() as ex:
            def slow_client():
                return [c for c in ex.status()["clients"] if c["submitted"] == 300]
            wait_until(lambda: slow_client() and slow_client()[0]["paused"], what="the master to pause it")
            # Another client is served while the slow one is held back.
            assert list(ex.map(jobs.square, range(100))) == [i * i for i in range(100)]
            held_back = slow_client()[0]
            assert held_back["queued"] > 200 and held_back["done"] < 100
            grown_mib = (rss_kib(cluster.master.pid) - before) / 1024
            assert grown_mib < 64, f"the master grew by {grown_mib:.0f} MiB for a client that does not read"
    finally:
        link.close()


def test_a_crowd_of_idle_and_half_open_connections_does_not_lock_out_a_client(master):
    crowd = []
    try:
        for i in range(200):
            s = socket.create_connection((master.host, master.port))
            if i % 3 == 1:
                s.sendall(frames.HEADER.pack(64, Frame.RESPONSE) + b"\x00" * 10)  # a truncated frame
            elif i % 3 == 2:
                s.shutdown(socket.SHUT_WR)                                               # half-open
            crowd.append(s)
        master.add_workers(1)
        with master.executor(connect_timeout=5) as ex:
            assert ex.submit(jobs.identity, "through").result(timeout=30) == "through"
    finally:
        for s in crowd:
            s.close()
