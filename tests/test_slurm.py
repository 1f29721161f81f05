"""The SLURM helpers against a real single-node SLURM (see the local_slurm fixture)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import jobs
import pytest
from conftest import wait_until

from cw.client import ClusterExecutor
from cw.launch import slurm

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.usefixtures("local_slurm")


def slurm_py(*args, timeout=180) -> str:
    proc = subprocess.run([sys.executable, str(ROOT / "slurm.py"), *args], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


@pytest.fixture
def cluster_name(request):
    """A cluster name unique to this test; its jobs are cancelled at the end whatever happens."""
    name = f"t{os.getpid()}-{request.node.name[-20:].replace('_', '')}"
    names = [name]
    yield names
    for n in names:
        try:
            slurm.stop(n)
        except slurm.SlurmError:
            pass


def workers_of(executor) -> set[int]:
    return {w["pid"] for w in executor.status()["workers"]}


def test_start_find_status_and_stop(cluster_name, monkeypatch):
    name = cluster_name[0]
    out = slurm_py("start", "-n", "3", "--name", name, "--wait")
    assert "submitted master job" in out and "submitted workers job" in out
    monkeypatch.setenv("CW_CLUSTER", name)
    monkeypatch.delenv("CW_MASTER", raising=False)
    with ClusterExecutor() as ex:             # no host: found through SLURM
        assert (ex.host, ex.port) == slurm.master_address(name)
        wait_until(lambda: len(ex.status()["workers"]) == 3, timeout=120, what="3 workers on SLURM")
        futures = [ex.submit(jobs.sleep, 0.2, i) for i in range(12)]
        assert [f.result(timeout=60) for f in futures] == list(range(12))
        assert {f.worker.pid for f in futures} == workers_of(ex)
    status = slurm_py("status", "--name", name)
    assert "3 workers connected" in status and "RUNNING" in status
    assert f"cw-{name}-master" in status and f"cw-{name}-workers" in status
    slurm.stop(name, timeout=15)
    assert slurm.cluster_jobs(name) == []
    assert not slurm.address_file(name).exists()


def test_two_clusters_coexist(cluster_name):
    a, b = cluster_name[0] + "a", cluster_name[0] + "b"
    cluster_name[:] = [a, b]
    for name in (a, b):
        slurm.start(1, name=name)
    executors = [ClusterExecutor(*slurm.master_address(name)) for name in (a, b)]
    try:
        for ex in executors:
            wait_until(lambda ex=ex: len(ex.status()["workers"]) == 1, timeout=120, what="a worker")
        pids = [ex.submit(jobs.pid).result(timeout=60) for ex in executors]
        assert pids[0] != pids[1]
        assert [workers_of(ex) for ex in executors] == [{pids[0]}, {pids[1]}]
        assert slurm.master_address(a) != slurm.master_address(b)
    finally:
        for ex in executors:
            ex.shutdown()
    slurm_py("stop", "--name", a)
    assert slurm.cluster_jobs(a) == [] and len(slurm.cluster_jobs(b)) == 2


def test_a_cancelled_worker_job_has_its_running_job_rerun(cluster_name, tmp_path):
    name = cluster_name[0]
    first = slurm.start(1, name=name)["workers"]
    with ClusterExecutor(*slurm.master_address(name)) as ex:
        wait_until(lambda: len(ex.status()["workers"]) == 1, timeout=120, what="the first worker")
        release = tmp_path / "release"
        future = ex.submit(jobs.block, str(tmp_path), str(release), "survived")
        wait_until(lambda: os.listdir(tmp_path), what="the job to start")
        first_pid = int(os.listdir(tmp_path)[0])
        slurm.start(1, name=name, master=False)            # a second worker job
        wait_until(lambda: len(ex.status()["workers"]) == 2, timeout=120, what="the second worker")
        subprocess.run(["scancel", first], check=True)
        # SIGTERM drains the worker, then SLURM kills it after KillWait: the job runs again elsewhere.
        rerun = wait_until(lambda: [p for p in os.listdir(tmp_path) if int(p) != first_pid], timeout=120,
                           what="the job to be re-run on the other worker")
        release.touch()
        assert future.result(timeout=60) == "survived"
        assert future.worker.pid == int(rerun[0])


def test_allocate_uses_slurm_when_asked(monkeypatch):
    import cw
    monkeypatch.delenv("CW_MASTER", raising=False)
    with cw.allocate(2, backend="slurm") as cluster:
        name = cluster.name
        assert len(slurm.cluster_jobs(name)) == 2
        with ClusterExecutor() as ex:
            assert ex.port == cluster.port
            assert sorted(ex.map(jobs.square, range(5))) == [0, 1, 4, 9, 16]
    assert slurm.cluster_jobs(name) == []


def test_without_an_address_file_the_master_is_found_through_squeue(cluster_name):
    name = cluster_name[0]
    import socket
    with socket.socket() as s:
        s.bind(("", 0))
        port = s.getsockname()[1]
    slurm.start(1, name=name, port=port)
    assert slurm.master_address(name) == (socket.gethostname(), port)   # published
    slurm.address_file(name).unlink()                                     # as if home were not shared
    host, found_port = slurm.master_address(name, port=port, timeout=4)
    assert found_port == port and host == os.environ.get("CW_SLURM_NODE", host)
    with ClusterExecutor(host, port) as ex:
        assert ex.submit(jobs.identity, "via squeue").result(timeout=60) == "via squeue"


def test_an_unknown_cluster_is_a_clear_error():
    with pytest.raises(LookupError, match="no cw cluster named 'nosuch'.*slurm.py start"):
        slurm.master_address("nosuch", timeout=1)
    proc = subprocess.run([sys.executable, str(ROOT / "slurm.py"), "status", "--name", "nosuch"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and "no jobs" in proc.stdout


def test_a_client_started_right_after_start_waits_for_the_master(cluster_name, monkeypatch, caplog):
    # Issue 13 item 4: without --wait, the master job is still pending or
    # starting when the client looks for it; the client waits and says so.
    # The master job is submitted held, so the client surely finds it
    # pending, and released once the client has said what it waits for.
    import logging
    import re
    import threading
    name = cluster_name[0]
    out = slurm_py("start", "-n", "1", "--name", name, "--Xmaster=--hold")
    master_job = re.search(r"submitted master job (\d+)", out).group(1)
    monkeypatch.setenv("CW_CLUSTER", name)
    monkeypatch.delenv("CW_MASTER", raising=False)
    answers = []

    def client():
        with ClusterExecutor(connect_timeout=120) as ex:
            answers.append(ex.submit(jobs.square, 7).result(timeout=120))

    def said():
        return [r.getMessage() for r in caplog.records if r.name == "cw.client.discovery"]
    with caplog.at_level(logging.INFO, logger="cw.client.discovery"):
        thread = threading.Thread(target=client, daemon=True)
        thread.start()
        wait_until(said, timeout=60, what="the client to say it waits for the master")
        assert slurm.job_state(master_job) == "PENDING"
        subprocess.run(["scontrol", "release", master_job], check=True, timeout=60)
        thread.join(180)
    assert not thread.is_alive() and answers == [49]
    assert len(said()) == 1 and f"cluster {name!r}: job {master_job} is PENDING" in said()[0], said()
