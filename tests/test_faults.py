"""Faults from day one: dead workers, poison jobs, a dead master, a wrong secret,
a client that vanishes.  Real processes throughout."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

import jobs
import pytest
from conftest import wait_until

from cw.client import ClusterExecutor
from cw.errors import AuthenticationError, BrokenCluster, WorkerLost
from cw.wire.auth import load_secret


def started(directory):
    return sorted(int(p) for p in os.listdir(directory) if p.isdigit())


def test_worker_killed_mid_job_reruns_it_elsewhere(cluster, executor, tmp_path):
    release = tmp_path / "release"
    future = executor.submit(jobs.block, str(tmp_path), str(release), "the answer")
    first = wait_until(lambda: started(tmp_path), what="the job to start")[0]
    os.kill(first, signal.SIGKILL)
    rerun = wait_until(lambda: [p for p in started(tmp_path) if p != first], what="the job to be re-run")
    release.touch()
    assert future.result(timeout=30) == "the answer"
    assert future.worker.pid == rerun[0] != first
    status = executor.status()
    assert [c["done"] for c in status["clients"] if c["pid"] == os.getpid()] == [1]
    cluster.wait_for_workers(2)  # the supervisor replaced the dead worker


def test_poison_job_fails_with_worker_lost_and_others_complete(cluster, executor):
    poison = executor.submit(jobs.hard_exit)
    others = [executor.submit(jobs.square, i) for i in range(200)]
    exc = poison.exception(timeout=60)
    assert isinstance(exc, WorkerLost)
    assert exc.attempts == 3 and len(exc.workers) == 3
    assert f"job {poison.jobid}" in str(exc) and "3 time" in str(exc)
    assert [f.result(timeout=60) for f in others] == [i * i for i in range(200)]


def test_max_retries_zero_runs_a_job_at_most_once(cluster, tmp_path):
    runs = tmp_path / "runs"

    def record_and_die(path):
        with open(path, "a") as f:
            f.write("x\n")
        os._exit(1)

    with cluster.executor(max_retries=0) as ex:
        exc = ex.submit(record_and_die, str(runs)).exception(timeout=60)
    assert isinstance(exc, WorkerLost) and exc.attempts == 1
    assert runs.read_text() == "x\n"


def test_master_killed_fails_waiting_futures_at_once_without_a_reconnect_window(cluster):
    ex = cluster.executor(reconnect_timeout=0)
    future = ex.submit(jobs.sleep, 60)
    wait_until(lambda: ex.status()["running"] == 1, what="the job to start")
    cluster.master.kill()
    exc = future.exception(timeout=5)
    assert isinstance(exc, BrokenCluster)
    assert "lost the connection to the cw master" in str(exc)
    with pytest.raises(BrokenCluster):
        ex.submit(jobs.identity, 1)


def test_wrong_secret_is_rejected_and_runs_nothing(master, tmp_path, monkeypatch):
    marker = tmp_path / "marker"
    with master.executor() as good:
        future = good.submit(jobs.append_line, str(marker))
        bad_secret = tmp_path / "other" / "secret"
        env = dict(os.environ, CW_SECRET_FILE=str(bad_secret))
        monkeypatch.setenv("CW_SECRET_FILE", str(bad_secret))
        load_secret(create=True)
        with pytest.raises(AuthenticationError, match="secret"):
            ClusterExecutor(master.host, master.port, connect_timeout=5)
        worker = subprocess.Popen([sys.executable, "-m", "cw.worker", master.address, "--connect-timeout", "5"],
                                  env=env, stderr=subprocess.PIPE, text=True)
        _, err = worker.communicate(timeout=60)
        assert worker.returncode == 2
        assert "secret" in err
        status = good.status()
        assert status["workers"] == [] and status["queued"] == 1
        assert not future.done()
        future.cancel()
    assert not marker.exists()


def test_a_client_that_vanishes_has_its_queued_jobs_dropped(cluster, tmp_path):
    release = tmp_path / "release"
    marker = tmp_path / "marker"
    script = textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {os.path.dirname(jobs.__file__)!r})
        import jobs
        from cw.client import ClusterExecutor
        ex = ClusterExecutor({cluster.host!r}, {cluster.port})
        for _ in range(2):
            ex.submit(jobs.block, {str(tmp_path)!r}, {str(release)!r})
        for _ in range(3):
            ex.submit(jobs.append_line, {str(marker)!r})
        print("submitted", flush=True)
        time.sleep(600)
    """)
    client = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert client.stdout.readline().strip() == "submitted"
        with cluster.executor() as observer:
            wait_until(lambda: observer.status()["queued"] == 3, what="the vanishing client's jobs to queue")
            client.kill()
            client.wait()
            wait_until(lambda: observer.status()["queued"] == 0, what="the master to drop the jobs")
            release.touch()
            assert observer.submit(jobs.identity, 1).result(timeout=30) == 1
    finally:
        client.kill()
        client.wait()
        client.stdout.close()
    assert not marker.exists()


def test_reading_a_link_this_process_closed_is_an_os_error_not_a_crash(master):
    """A client's reader thread can be between two reads when shutdown closes
    the link: it must see a connection error (and end quietly), not a
    ValueError from select() on descriptor -1 (logged as an internal error)."""
    from cw.wire.link import open_link, peer_info
    link = open_link(master.host, master.port, load_secret(), peer_info("client"), 10)
    link.close(flush_timeout=0)
    with pytest.raises(OSError, match="closed here"):
        link.recv(timeout=5)
