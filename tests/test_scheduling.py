"""Scheduling (issue #6) end to end: priorities, resources and GPUs, jobs no
worker can run, tag limits, placement, nested jobs and weighted fair share.

Real master and worker processes on port 0.  Nothing sleeps to synchronise:
jobs block on files that the test creates, and the test polls the master's
status or the files with ``wait_until``, whose timeouts only catch hangs.
"""
from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import time

import jobs
import pytest
import sched_jobs
from conftest import wait_until

import cw
from cw.client import WorkerInfo
from cw.launch.local import start_master


@pytest.fixture
def make_cluster():
    """Starts masters with extra command-line arguments, each with one worker
    supervisor of ``workers`` processes; stops exactly what it started."""
    started = []

    def make(workers=0, resources="", args=(), env=None):
        cluster = start_master(port=0, args=list(args))
        started.append(cluster)
        if workers:
            cluster.add_workers(workers, resources=resources, env=env)
            cluster.wait_for_workers(workers)
        return cluster

    yield make
    for cluster in started:
        cluster.stop()


@pytest.fixture
def release(tmp_path):
    """The file whose creation releases the test's blocked jobs; created at the
    end in any case, so that a test that fails half-way leaves no job blocked
    (request it after the cluster and executor fixtures: it is torn down first)."""
    path = tmp_path / "release"
    yield path
    path.touch()


@contextlib.contextmanager
def releasing(path):
    """Creates ``path`` on the way out of a ``with`` (put it after the executors)."""
    try:
        yield
    finally:
        path.touch()


def without_gpus_in_env() -> dict:
    """This process's environment minus CUDA_VISIBLE_DEVICES, so that a worker
    detects no GPUs of its own and offers exactly what --resources declares."""
    return {k: v for k, v in os.environ.items() if k != "CUDA_VISIBLE_DEVICES"}


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def nothing_left(executor) -> bool:
    """No job queued, held or running anywhere, for any client."""
    status = executor.status()
    return (status["queued"] == 0 and status["running"] == 0
            and all(c["queued"] == 0 and c["running"] == 0 for c in status["clients"]))


def lines(path) -> list[str]:
    return path.read_text().split() if path.exists() else []


# --- priorities ---------------------------------------------------------------------

def test_higher_priority_runs_first_and_equal_ones_in_order(make_cluster, tmp_path, release):
    cluster = make_cluster(1, args=["--slots", "1"])   # no prefetch: the order of starts is the order run
    started, order = tmp_path / "started", tmp_path / "order"
    with cluster.executor() as ex, releasing(release):
        blocker = ex.submit(sched_jobs.mark_and_wait, str(started), str(release), "blocker")
        wait_until(started.exists, what="the blocker to occupy the only worker")
        futures = [
            ex.submit(sched_jobs.record, str(order), "low", priority=1),
            ex.submit(sched_jobs.record, str(order), "high", priority=10),
            ex.submit(sched_jobs.record, str(order), "mid", priority=5),
            ex.submit(sched_jobs.record, str(order), "mid2", priority=5),
            ex.submit(sched_jobs.record, str(order), "default"),                  # priority 0
            ex.submit_with(sched_jobs.record, (str(order), "negative"), priority=-3),
        ]
        mapped = ex.map(sched_jobs.record, [str(order)] * 2, ["map1", "map2"], priority=7)
        wait_until(lambda: ex.status()["queued"] == 8, what="all 8 jobs to be queued")
        queues = {q["priority"]: q["queued"] for q in ex.status()["queues"]}
        assert queues == {-3: 1, 0: 1, 1: 1, 5: 2, 7: 2, 10: 1}
        assert not order.exists()
        release.touch()
        assert blocker.result(timeout=30) == "blocker"
        assert list(mapped) == ["map1", "map2"]
        assert [f.result(timeout=30) for f in futures] == ["low", "high", "mid", "mid2", "default", "negative"]
    assert lines(order) == ["high", "map1", "map2", "mid", "mid2", "low", "default", "negative"]


def test_priority_is_checked_in_the_client(executor):
    for bad in (1.5, True, "high", 2 ** 31):
        with pytest.raises(ValueError, match="priority"):
            executor.submit(jobs.identity, 1, priority=bad)


# --- resources ----------------------------------------------------------------------

def test_gpu_jobs_get_their_own_device_ids(make_cluster, tmp_path, release):
    cluster = make_cluster(2, resources="gpu=2", env=without_gpus_in_env())
    with cluster.executor() as ex, releasing(release):
        described = ex.workers()
        assert [(w.resources["cpu"], w.resources["gpu"]) for w in described] == [(2, 2), (2, 2)]
        markers = [tmp_path / "a", tmp_path / "b"]
        pair = [ex.submit(sched_jobs.gpu_env, str(m), str(release), resources={"gpu": 1}) for m in markers]
        # Both run at once, each holding one of the two GPUs.
        wait_until(lambda: all(m.exists() for m in markers), what="both one-GPU jobs to run at once")
        release.touch()
        assert sorted(f.result(timeout=30) for f in pair) == ["0", "1"]
        assert pair[0].worker.pid != pair[1].worker.pid
        assert ex.submit(sched_jobs.gpu_env, resources={"gpu": 2}).result(timeout=30) == "0,1"
        # A job without GPUs on a GPU machine sees none (not every GPU).
        assert ex.submit(sched_jobs.gpu_env).result(timeout=30) == ""
        assert ex.submit(sched_jobs.job_env, resources={"cpu": 2, "mem": "1M"}).result(timeout=30) == {
            "CUDA_VISIBLE_DEVICES": "", "CW_JOB_CPUS": "2", "CW_JOB_MEM": str(1 << 20)}
        # As Ray's and SLURM's users write them: the same resources, not ones no worker offers.
        assert ex.submit(sched_jobs.job_env, resources={"CPUs": 2, "memory": "1M", "gpus": 1}).result(
            timeout=30)["CW_JOB_MEM"] == str(1 << 20)
        # map passes resources on to every chunk.
        assert list(ex.map(sched_jobs.gpu_env, [None] * 3, resources={"gpu": 2})) == ["0,1"] * 3


def test_the_gpus_held_by_a_job_are_not_given_twice(make_cluster, tmp_path, release):
    cluster = make_cluster(2, resources="gpu=1", env=without_gpus_in_env())
    started = tmp_path / "started"
    with cluster.executor() as ex, releasing(release):
        described = ex.workers()
        first = ex.submit(sched_jobs.gpu_env, str(started), str(release), resources={"gpu": 1})
        wait_until(started.exists, what="the first GPU job to start")
        second = ex.submit(sched_jobs.gpu_env, resources={"gpu": 1})
        # The other worker process is idle, but the machine's only GPU is taken.
        status = ex.status()
        assert (status["queued"], status["running"]) == (1, 1)
        assert sorted(w["state"] for w in status["workers"]) == ["busy", "idle"]
        # The machine is kept for the waiting GPU job; a job that needs no GPU
        # runs meanwhile on the other machine.
        cluster.add_workers(1, env=without_gpus_in_env())
        cluster.wait_for_workers(3)
        plain = ex.submit(sched_jobs.gpu_env)
        assert plain.result(timeout=30) is None
        assert plain.worker.pid not in {w.pid for w in described}
        assert not second.done()
        release.touch()
        assert first.result(timeout=30) == "0" and second.result(timeout=30) == "0"


def test_gpus_come_from_the_workers_cuda_visible_devices(make_cluster, tmp_path, release):
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "3,5"}     # as a batch system hands them out
    cluster = make_cluster(2, env=env)
    with cluster.executor() as ex, releasing(release):
        assert [w.resources.get("gpu") for w in ex.workers()] == [2, 2]
        markers = [tmp_path / "a", tmp_path / "b"]
        pair = [ex.submit(sched_jobs.gpu_env, str(m), str(release), resources={"gpu": 1}) for m in markers]
        wait_until(lambda: all(m.exists() for m in markers), what="both one-GPU jobs to run at once")
        release.touch()
        assert sorted(f.result(timeout=30) for f in pair) == ["3", "5"]
        assert ex.submit(sched_jobs.gpu_env, resources={"gpu": 2}).result(timeout=30) == "3,5"
        assert ex.submit(sched_jobs.gpu_env).result(timeout=30) == ""


def test_a_named_resource_is_counted_like_cpus(make_cluster, tmp_path, release):
    cluster = make_cluster(2, resources="license=1")
    started, log = tmp_path / "started", tmp_path / "log"
    with cluster.executor() as ex, releasing(release):
        assert [w.resources["license"] for w in ex.workers()] == [1, 1]
        first = ex.submit(sched_jobs.mark_and_wait, str(started), str(release), "first", resources={"license": 1})
        wait_until(started.exists, what="the first licensed job to start")
        second = ex.submit(sched_jobs.record, str(log), "second", resources={"license": 1})
        status = ex.status()
        assert (status["queued"], status["running"]) == (1, 1)
        assert sorted(w["state"] for w in status["workers"]) == ["busy", "idle"]
        release.touch()
        assert first.result(timeout=30) == "first" and second.result(timeout=30) == "second"


def test_cpus_are_never_over_allocated(cluster, executor, tmp_path, release):
    """The cluster fixture is one machine of 2 worker processes: cpu=2."""
    started, log = tmp_path / "started", tmp_path / "log"
    first = executor.submit(sched_jobs.mark_and_wait, str(started), str(release), "first", resources={"cpu": 2})
    wait_until(started.exists, what="the two-CPU job to start")
    second = executor.submit(sched_jobs.record, str(log), "second", resources={"cpu": 2})
    status = executor.status()     # answered after the master placed what it could of the SUBMIT before
    assert (status["queued"], status["running"]) == (1, 1)
    assert sorted(w["state"] for w in status["workers"]) == ["busy", "idle"]
    release.touch()
    assert first.result(timeout=30) == "first" and second.result(timeout=30) == "second"
    # Many at once: none may start while another holds the lock.
    lock = tmp_path / "lock"
    futures = [executor.submit(sched_jobs.exclusive, str(lock), 0.05, f"job{i}", resources={"cpu": 2})
               for i in range(6)]
    assert [f.result(timeout=60) for f in futures] == [f"job{i}" for i in range(6)]


def test_resources_are_checked_in_the_client(executor):
    with pytest.raises(ValueError, match="whole GPUs"):
        executor.submit(jobs.identity, 1, resources={"gpu": 0.5})
    with pytest.raises(ValueError, match="cannot read"):
        executor.submit(jobs.identity, 1, resources={"mem": "lots"})
    with pytest.raises(ValueError, match="resources must be a dict"):
        executor.submit(jobs.identity, 1, resources=["gpu"])


# --- jobs that no worker can run ------------------------------------------------------

def test_a_job_no_worker_can_run_warns_then_fails(make_cluster, caplog):
    cluster = make_cluster(2, args=["--unplaceable-timeout", "2"])
    caplog.set_level(logging.WARNING, logger="cw.client")
    with cluster.executor() as ex:
        big = ex.submit(jobs.identity, "big", resources={"gpu": 8})
        wait_until(lambda: big.notice, what="the master's notice that the job cannot run")
        assert "gpu=8" in big.notice
        waiting = ex.status()["waiting"]
        assert len(waiting) == 1 and waiting[0]["count"] == 1 and "gpu=8" in waiting[0]["reason"]
        # The client's other jobs do not wait for it.
        assert ex.submit(jobs.identity, "plain").result(timeout=30) == "plain"
        assert not big.done()
        with pytest.raises(cw.Unplaceable, match="gpu=8"):
            big.result(timeout=30)
        assert big.worker is None
        assert ex.status()["waiting"] == []
        assert nothing_left(ex)
    warnings = [r.getMessage() for r in caplog.records if r.name == "cw.client" and r.levelno == logging.WARNING]
    assert any(f"job {big.jobid}" in m and "gpu=8" in m for m in warnings)


def test_a_waiting_job_runs_when_a_worker_that_fits_joins(make_cluster):
    cluster = make_cluster(1)
    with cluster.executor() as ex:
        future = ex.submit(sched_jobs.gpu_env, resources={"gpu": 1})
        wait_until(lambda: future.notice, what="the notice that no worker has a GPU")
        cluster.add_workers(1, resources="gpu=1", env=without_gpus_in_env())
        assert future.result(timeout=60) == "0"


# --- tag limits -------------------------------------------------------------------------

def test_tag_limit_holds_across_the_cluster(executor, tmp_path, release):
    executor.limit("db", 1)
    started, log = tmp_path / "started", tmp_path / "log"
    first = executor.submit(sched_jobs.mark_and_wait, str(started), str(release), "db1", tag="db")
    wait_until(started.exists, what="the first db job to start")
    second = executor.submit(sched_jobs.record, str(log), "db2", tag="db")
    status = executor.status()
    assert status["queued"] == 1 and status["limits"] == {"db": {"limit": 1, "running": 1}}
    # Untagged jobs use the other worker meanwhile.
    assert [executor.submit(jobs.square, i).result(timeout=30) for i in range(5)] == [0, 1, 4, 9, 16]
    assert not second.done() and not log.exists()
    release.touch()
    assert first.result(timeout=30) == "db1" and second.result(timeout=30) == "db2"

    # Six tagged jobs with untagged ones among them: no two tagged ones overlap.
    lock = tmp_path / "lock"
    tagged = [executor.submit(sched_jobs.exclusive, str(lock), 0.05, f"db{i}", tag="db") for i in range(6)]
    plain = [executor.submit(jobs.sleep, 0.02, i) for i in range(10)]
    assert [f.result(timeout=60) for f in tagged] == [f"db{i}" for i in range(6)]
    assert [f.result(timeout=60) for f in plain] == list(range(10))

    # Lifted: two tagged jobs that each wait for the other complete (under
    # limit 1 they would wait for each other until their timeout).
    executor.limit("db", None)
    a, b = tmp_path / "a", tmp_path / "b"
    pair = [executor.submit(sched_jobs.meet, str(a), str(b), tag="db"),
            executor.submit(sched_jobs.meet, str(b), str(a), tag="db")]
    pids = [f.result(timeout=60) for f in pair]
    assert len(set(pids)) == 2
    assert "db" not in executor.status()["limits"]


def test_limit_zero_holds_tagged_jobs_until_raised(cluster, executor, tmp_path):
    executor.limit("gate", 0)
    log = tmp_path / "log"
    held = [executor.submit(sched_jobs.record, str(log), f"g{i}", tag="gate") for i in range(3)]
    assert executor.submit(jobs.identity, "untagged").result(timeout=30) == "untagged"
    status = executor.status()
    assert status["queued"] == 3 and not log.exists()
    # Another client sees and changes the same limit.
    with cluster.executor() as other:
        assert other.status()["limits"] == {"gate": {"limit": 0, "running": 0}}
        other.limit("gate", 1)
    assert sorted(f.result(timeout=30) for f in held) == ["g0", "g1", "g2"]


def test_limit_arguments_are_checked(executor):
    with pytest.raises(ValueError, match="limit"):
        executor.limit("db", -1)
    with pytest.raises(ValueError, match="tag"):
        executor.limit("", 1)
    with pytest.raises(ValueError, match="tag"):
        executor.submit(jobs.identity, 1, tag="")


# --- placement ---------------------------------------------------------------------------

def test_workers_lists_the_worker_processes(cluster, executor):
    described = executor.workers()
    assert len(described) == 2
    assert len({w.id for w in described}) == 2 and len({w.pid for w in described}) == 2
    for w in described:
        assert w.host == socket.gethostname()
        assert w.resources["cpu"] == 2 and "gpu" not in w.resources
        assert w.state == "idle" and w.jobs_done == 0
        assert w.info == WorkerInfo(w.host, w.pid)
    # One supervisor: both processes are on one machine.
    assert described[0].node == described[1].node
    assert described[0].node.endswith(f":{cluster.workers[0].pid}")


def test_pinned_jobs_run_only_on_their_worker(executor, tmp_path, release):
    target, other = executor.workers()
    started = tmp_path / "started"
    blocker = executor.submit(sched_jobs.pid_after, str(started), str(release), workers=[target])
    wait_until(started.exists, what="the pinned blocker to start")
    assert int(started.read_text()) == target.pid
    pinned = [executor.submit(jobs.pid, workers=[target]) for _ in range(5)]
    pinned += [executor.submit_with(jobs.pid, workers=target.id) for _ in range(5)]
    # The other worker is idle, yet none of them goes there.
    status = executor.status()
    assert status["queued"] == 10
    assert {w["pid"]: w["state"] for w in status["workers"]} == {target.pid: "busy", other.pid: "idle"}
    release.touch()
    assert blocker.result(timeout=30) == target.pid
    assert [f.result(timeout=30) for f in pinned] == [target.pid] * 10
    assert {f.worker.pid for f in pinned} == {target.pid}
    # A host name is a placement too.
    assert executor.submit(jobs.identity, 1, workers=[target.host]).result(timeout=30) == 1


def test_run_on_all_reaches_every_worker(executor):
    described = executor.workers()
    assert executor.run_on_all(os.getpid) == {w.info: w.pid for w in described}
    futures = executor.submit_on_all(jobs.add, 1, y=2)
    assert set(futures) == {w.info for w in described}
    assert {info: f.result(timeout=30) for info, f in futures.items()} == {w.info: 3 for w in described}
    assert all(f.worker == info for info, f in futures.items())


def test_run_on_all_names_the_workers_that_failed(executor):
    with pytest.raises(ValueError, match="boom") as caught:
        executor.run_on_all(jobs.fail, "boom")
    note = "\n".join(getattr(caught.value, "__notes__", []))
    assert note.startswith("failed on ") and note.count("ValueError: boom") == 2


def test_a_job_pinned_to_a_worker_that_is_gone_fails(make_cluster):
    cluster = make_cluster(2, args=["--unplaceable-timeout", "1"])
    with cluster.executor() as ex:
        victim, survivor = ex.workers()
        os.kill(victim.pid, signal.SIGKILL)       # a worker process of this test's supervisor
        wait_until(lambda: victim.id not in {w.id for w in ex.workers()}, what="the master to drop the worker")
        future = ex.submit(jobs.identity, 1, workers=[victim])
        with pytest.raises(cw.Unplaceable, match=rf"\b{victim.id}\b"):
            future.result(timeout=30)
        assert str(victim.id) in future.notice
        # The survivor still takes jobs pinned to it.
        assert ex.submit(jobs.pid, workers=[survivor]).result(timeout=30) == survivor.pid


# --- nested jobs --------------------------------------------------------------------------

@pytest.mark.timeout(300)
def test_recursive_fibonacci_on_two_workers(executor):
    begin = time.monotonic()
    assert executor.submit(sched_jobs.fib, 20).result(timeout=240) == 6765
    print(f"fib(20) on 2 workers: {time.monotonic() - begin:.1f} s")
    assert nothing_left(executor)


def test_a_chain_fifty_deep_completes_on_one_worker(make_cluster):
    cluster = make_cluster(1)
    with cluster.executor() as ex:
        assert ex.submit(sched_jobs.chain, 50).result(timeout=60) == 50
        # A job waiting through map's results lends its worker too.
        assert ex.submit(sched_jobs.squares_below, 5).result(timeout=60) == [0, 1, 4, 9, 16]
        assert nothing_left(ex)


def test_a_running_child_is_stopped_when_its_parent_fails(cluster, executor, tmp_path, release):
    child_marker = tmp_path / "child"
    parent = executor.submit(sched_jobs.parent_that_fails, str(child_marker), str(release))
    with pytest.raises(RuntimeError, match="the parent fails"):
        parent.result(timeout=60)
    child_pid = int(child_marker.read_text())
    assert child_pid != parent.worker.pid
    # Its worker process was replaced: a blocked job cannot be stopped otherwise.
    wait_until(lambda: not alive(child_pid), what="the child's worker process to end")
    wait_until(lambda: nothing_left(executor), what="the master to forget the child")
    release.touch()
    cluster.wait_for_workers(2)
    assert executor.submit(jobs.identity, "still works").result(timeout=30) == "still works"


def test_a_queued_child_is_withdrawn_when_its_parent_fails(cluster, executor, tmp_path, release):
    # Limit 0 keeps the child queued in the master for certain.  (A child held
    # by a worker may also be started and stopped: see the report of the race
    # in which an ABORT that comes as the worker starts the job is lost.)
    executor.limit("later", 0)
    child_log = tmp_path / "child.log"
    parent = executor.submit(sched_jobs.parent_that_fails_at_once, str(child_log), str(release), "later")
    with pytest.raises(RuntimeError, match="the parent fails at once"):
        parent.result(timeout=60)

    def child_withdrawn():
        nested = [c for c in executor.status()["clients"] if c["pid"] == parent.worker.pid]
        # The master had the child (its SUBMIT may come after the parent's outcome) and dropped it.
        return [c["submitted"] for c in nested] == [1] and nothing_left(executor)

    wait_until(child_withdrawn, what="the master to drop the child")
    executor.limit("later", None)
    release.touch()
    assert executor.submit(jobs.identity, "after", tag="later").result(timeout=30) == "after"
    assert not child_log.exists()


def test_children_are_dropped_when_the_parents_worker_dies(make_cluster, tmp_path, release):
    cluster = make_cluster(1)
    pid_file, child_log = tmp_path / "parent.pid", tmp_path / "child.log"
    never = tmp_path / "never"
    with cluster.executor() as ex:
        parent = ex.submit_with(sched_jobs.parent_that_hangs, (str(pid_file), str(child_log), str(release),
                                                                str(never)), max_retries=0)
        wait_until(pid_file.exists, what="the parent to start")
        parent_pid = int(pid_file.read_text())

        def nested_client():
            return [c for c in ex.status()["clients"] if c["pid"] == parent_pid]

        # The master has the child, which waits behind its parent (sent ahead to the only worker, or queued).
        wait_until(lambda: [c["submitted"] for c in nested_client()] == [1], what="the child to reach the master")
        os.kill(parent_pid, signal.SIGKILL)
        with pytest.raises(cw.WorkerLost):
            parent.result(timeout=60)
        wait_until(lambda: not nested_client() and nothing_left(ex), what="the child to be dropped")
        release.touch()
        cluster.wait_for_workers(1)
        assert ex.submit(jobs.identity, "still works").result(timeout=30) == "still works"
        assert not child_log.exists()


# --- weighted fair share ------------------------------------------------------------------

def test_a_client_of_weight_two_gets_twice_the_share(make_cluster, tmp_path, release):
    cluster = make_cluster(1, args=["--slots", "1"])
    started, order = tmp_path / "started", tmp_path / "order"
    with (cluster.executor() as blocking, cluster.executor(weight=2.0) as heavy, cluster.executor() as light,
          releasing(release)):
        blocker = blocking.submit(sched_jobs.mark_and_wait, str(started), str(release))
        wait_until(started.exists, what="the blocker to occupy the only worker")
        futures = [light.submit(sched_jobs.record, str(order), "light") for _ in range(30)]
        futures += [heavy.submit(sched_jobs.record, str(order), "heavy") for _ in range(30)]
        wait_until(lambda: heavy.status()["queued"] == 60, what="all 60 jobs to be queued")
        release.touch()
        blocker.result(timeout=30)
        for f in futures:
            f.result(timeout=60)
        weights = sorted(c["weight"] for c in heavy.status()["clients"])
    ran = lines(order)
    assert len(ran) == 60
    # 2:1 gives 10 of the first 15 and 20 of the first 30 to the heavy client;
    # equal shares would give 7 or 8 and 15, first come first served 0 or 15.
    assert 9 <= ran[:15].count("heavy") <= 11, ran
    assert 18 <= ran[:30].count("heavy") <= 22, ran
    assert weights == [1.0, 1.0, 2.0]


def test_weight_is_checked(cluster):
    for bad in (0, -1, True, "2"):
        with pytest.raises(ValueError, match="weight"):
            cluster.executor(weight=bad)


def test_a_job_run_while_its_parent_waits_does_not_see_the_parents_resources(make_cluster):
    """Jobs of one process that run while another waits get their own CW_JOB_* (the
    environment is the process's), not those of the waiting job."""
    cluster = make_cluster(workers=1, resources="cpu=2")
    with cluster.executor() as ex:
        parent, child = ex.submit(sched_jobs.parent_env_and_child_env, resources={"cpu": 2, "mem": "1M"}).result(60)
    assert parent == {"CUDA_VISIBLE_DEVICES": None, "CW_JOB_CPUS": "2", "CW_JOB_MEM": "1048576"}
    assert child == {"CUDA_VISIBLE_DEVICES": None, "CW_JOB_CPUS": None, "CW_JOB_MEM": None}
