"""Held jobs are not held hostage (issue 13 item 5), with a real master and worker processes.

A job sent ahead to a worker (slots=2, the default) and not started yet gives way to a more urgent
job of its client, and is taken from a frozen worker that does not answer its REVOKE within the
revoke timeout.  Timeouts here only catch hangs."""
from __future__ import annotations

import contextlib
import os
import signal

import jobs
import pytest
from conftest import wait_until

from cw.launch.local import start_master


@pytest.fixture
def one_worker():
    cluster = start_master(port=0)
    cluster.add_workers(1)
    cluster.wait_for_workers(1)
    yield cluster
    cluster.stop()


def queued_by_priority(ex):
    return {q["priority"]: q["queued"] for q in ex.status()["queues"]}


def test_jobs_start_in_priority_order_though_low_ones_were_sent_ahead(one_worker, tmp_path):
    """lo0 runs, lo1 is held by the worker, lo2 queued; hi0, hi1, hi2 come.  hi0 takes lo1's place, and
    the jobs start lo0, hi0, hi1, hi2, lo1, lo2 (before: lo0, lo1, hi1, hi0, hi2, lo2)."""
    order, release = tmp_path / "order", tmp_path / "release"
    with one_worker.executor() as ex:
        futures = [ex.submit(jobs.block, str(tmp_path), str(release), "lo0")]
        wait_until(lambda: [p for p in os.listdir(tmp_path) if p.isdigit()], what="lo0 to start")
        futures += [ex.submit(jobs.append_line, str(order), f"lo{i}") for i in (1, 2)]
        futures += [ex.submit(jobs.append_line, str(order), f"hi{i}", priority=10) for i in (0, 1, 2)]
        # hi0 went ahead in lo1's place: lo1 and lo2 wait, and so do hi1 and hi2.
        wait_until(lambda: queued_by_priority(ex) == {0: 2, 10: 2}, what="hi0 to take lo1's place")
        release.touch()
        assert [f.result(timeout=30) for f in futures] == ["lo0", "lo1", "lo2", "hi0", "hi1", "hi2"]
    assert order.read_text().split() == ["hi0", "hi1", "hi2", "lo1", "lo2"]


def test_a_frozen_workers_held_job_runs_on_another_worker_before_the_peer_timeout(tmp_path):
    """Two workers each run a job that waits; a third job is sent ahead to one of them, which is then
    frozen (SIGSTOP).  The other finishes and asks for the held job; the frozen one cannot answer, so
    after the revoke timeout (3 s) the job runs on the other worker, long before the 60 s peer
    timeout.  Thawed, the frozen worker finishes its own job, keeps its connection, and runs jobs
    again; the client gets one result per job."""
    cluster = start_master(port=0, args=["--peer-timeout", "60"])
    frozen = None
    try:
        cluster.add_workers(2)
        cluster.wait_for_workers(2)
        with cluster.executor() as ex:
            dirs = {name: tmp_path / name for name in ("a", "b")}
            for d in dirs.values():
                d.mkdir()
            blocked = {name: ex.submit(jobs.block, str(d), str(tmp_path / f"release-{name}"), name)
                       for name, d in dirs.items()}
            runs = {name: int(wait_until(lambda d=d: os.listdir(d), what=f"job {name} to start")[0])
                    for name, d in dirs.items()}
            held = ex.submit(jobs.pid)
            workers = wait_until(lambda: [w for w in ex.status()["workers"] if w["held"] == 1],
                                 what="the third job to be sent ahead")
            frozen, frozen_id = workers[0]["pid"], workers[0]["id"]
            ids_before = sorted(w["id"] for w in ex.status()["workers"])
            os.kill(frozen, signal.SIGSTOP)
            try:
                other = next(name for name, pid in runs.items() if pid != frozen)
                mine = next(name for name, pid in runs.items() if pid == frozen)
                (tmp_path / f"release-{other}").touch()
                assert blocked[other].result(timeout=30) == other
                # The frozen worker never answers the REVOKE: the job runs on the other one.
                assert held.result(timeout=30) == runs[other]
                (tmp_path / f"release-{mine}").touch()
            finally:
                os.kill(frozen, signal.SIGCONT)
            assert blocked[mine].result(timeout=30) == mine
            assert ex.submit(jobs.pid, workers=[frozen_id]).result(timeout=30) == frozen
            status = ex.status()
            assert sorted(w["id"] for w in status["workers"]) == ids_before     # nobody was dropped
            mine_status = [c for c in status["clients"] if c["pid"] == os.getpid() and c["submitted"]]
            assert [(c["submitted"], c["done"]) for c in mine_status] == [(4, 4)]
    finally:
        if frozen is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(frozen, signal.SIGCONT)      # never leave a stopped process behind
        cluster.stop()
