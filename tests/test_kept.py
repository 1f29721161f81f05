"""Kept values and futures as arguments (issue 14), with real masters and
workers: a job takes other jobs' futures and ``put`` Refs as arguments and
gets their values; failures, cancellations and releases reach it; a value
reaches a machine once and lives as long as something needs it; the
master's memory for them is bounded."""
from __future__ import annotations

import gc
import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
from conftest import wait_until

from cw.errors import DependencyFailed, KeptValueError
from cw.launch.local import start_master


@pytest.fixture(autouse=True)
def kept_dir(tmp_path, monkeypatch):
    """Each test's workers share a machine cache of their own (they inherit it)."""
    path = tmp_path / "kept"
    monkeypatch.setenv("CW_KEPT_DIR", str(path))
    return path


@pytest.fixture
def opened(executor, tmp_path):
    """A path gated jobs wait for; made at the latest when the test ends, before
    the executor waits for its jobs (so a failing test does not hang)."""
    path = tmp_path / "open"
    yield path
    path.touch()


def gate(path, value=None):
    """A job that waits until ``path`` exists, then returns ``value``."""
    while not os.path.exists(path):
        time.sleep(0.02)
    return value


def add(a, b):
    return a + b


def fail(text):
    raise ValueError(text)


def slice_sum(array, i):
    return float(array[i * 1000:(i + 1) * 1000].sum())


def pid_then_gate(array, marks, release):
    """Leaves a mark naming this worker, then waits; returns the array's sum."""
    open(os.path.join(marks, str(os.getpid())), "w").close()
    while not os.path.exists(release):
        time.sleep(0.02)
    return float(array.sum())


def kept(ex) -> dict:
    return ex.status()["kept"]


def test_a_job_gets_the_results_of_the_futures_it_takes_and_waits_for_them(executor, opened):
    first = executor.submit(gate, str(opened), 40)
    second = executor.submit(pow, 2, 1)
    total = executor.submit(add, first, second)
    nested = executor.submit(sum, [first, second, 1])            # nested in a list: resolved too
    # Held by the master, which says what it waits for; so does the future.
    assert wait_until(lambda: total.state == "waiting", what="the dependent to be held")
    assert total.waits_for == (first, second)
    assert second.result(30) == 2
    wait_until(lambda: {h["job"]: h["waits_for"] for h in kept(executor)["waiting"]}.get(total.jobid)
               == [first.jobid], what="the status to say the job waits for the first future only")
    opened.touch()
    assert total.result(30) == 42
    assert nested.result(30) == 43
    assert total.waits_for == ()
    # map takes futures in its iterables; a finished future travels as its value.
    futures = [executor.submit(pow, i, 2) for i in range(5)]
    assert list(executor.map(add, futures, range(5))) == [i * i + i for i in range(5)]
    assert executor.submit(add, first, 2).result(30) == 42


def test_a_failed_dependency_fails_the_job_naming_it_and_carrying_its_exception(executor, opened):
    waiting = executor.submit(gate, str(opened))
    broken = executor.submit(fail, "broken on purpose")
    child = executor.submit(add, broken, waiting)
    grandchild = executor.submit(add, child, 1)
    opened.touch()
    with pytest.raises(DependencyFailed) as info:
        child.result(30)
    assert info.value.jobid == broken.jobid
    assert f"job {broken.jobid}" in str(info.value) and "broken on purpose" in str(info.value)
    assert isinstance(info.value.__cause__, ValueError)
    with pytest.raises(DependencyFailed) as info:                 # on down a chain
        grandchild.result(30)
    assert info.value.jobid == child.jobid
    # A future that failed already fails the job at once.
    with pytest.raises(DependencyFailed):
        executor.submit(add, broken, 1).result(30)


def test_a_cancelled_dependency_cancels_the_job_that_takes_it(executor, opened):
    blocker = executor.submit(gate, str(opened))
    queued = executor.submit(gate, str(opened), 1)
    dependent = executor.submit(add, queued, 1)
    second = executor.submit(add, dependent, 1)
    assert wait_until(lambda: dependent.state == "waiting", what="the dependent to be held")
    assert queued.cancel()
    wait_until(second.cancelled, what="the cancellation to reach the dependents")
    assert dependent.cancelled()
    assert executor.submit(add, queued, 1).cancelled()            # cancelled already: at once
    opened.touch()
    assert blocker.result(30) is None
    assert wait_until(lambda: kept(executor)["held_jobs"] == 0, what="no held job left")


def test_a_put_value_reaches_each_machine_once_and_leaves_when_released(executor, kept_dir):
    array = np.arange(2_000_000, dtype=np.float64)
    ref = executor.put(array)
    assert ref.size >= array.nbytes
    sums = [f.result(60) for f in [executor.submit(slice_sum, ref, i) for i in range(40)]]
    assert sums == [slice_sum(array, i) for i in range(40)]
    status = kept(executor)
    assert status["fetched"] == 1              # two workers, one machine: fetched once
    assert os.path.exists(kept_dir / f"{ref.key:016x}")
    ref.release()
    with pytest.raises(KeptValueError, match="released"):
        executor.submit(slice_sum, ref, 0)
    wait_until(lambda: not os.path.exists(kept_dir / f"{ref.key:016x}"), what="the machine cache to drop it")
    # A Ref collected in the client is released too.
    other = executor.put(list(range(1000)))
    assert executor.submit(len, other).result(30) == 1000
    before = kept(executor)["values"]
    del other
    gc.collect()
    wait_until(lambda: kept(executor)["values"] < before, what="the master to drop the collected Ref's value")


def test_a_broadcast_value_is_on_every_machine_before_any_job_asks(executor, kept_dir):
    ref = executor.put(np.ones(500_000), broadcast=True)
    wait_until(lambda: os.path.exists(kept_dir / f"{ref.key:016x}"), what="the broadcast to reach the machine")
    assert executor.submit(np.sum, ref).result(30) == 500_000
    assert kept(executor)["fetched"] == 0


def test_a_worker_killed_while_it_holds_a_shared_input_does_not_lose_the_job(executor, opened, tmp_path):
    marks, release = tmp_path / "marks", opened
    marks.mkdir()
    array = np.arange(1_000_000, dtype=np.float64)
    ref = executor.put(array)
    future = executor.submit(pid_then_gate, ref, str(marks), str(release))
    pid = int(wait_until(lambda: os.listdir(marks), what="the job to start")[0])
    os.kill(pid, signal.SIGKILL)
    wait_until(lambda: len(os.listdir(marks)) >= 2, what="the job to run again elsewhere")
    release.touch()
    assert future.result(60) == float(array.sum())


CLIENT = textwrap.dedent("""
    import sys, numpy as np
    from cw.client.executor import ClusterExecutor
    ex = ClusterExecutor(sys.argv[1], int(sys.argv[2]))
    ref = ex.put(np.ones(300_000))
    import test_kept
    blocker = ex.submit(test_kept.gate, sys.argv[3])
    held = ex.submit(test_kept.add, blocker, ref)
    print("ready", flush=True)
    sys.stdin.readline()
""")


def test_a_client_that_leaves_with_refs_outstanding_takes_its_values_and_held_jobs_along(cluster, tmp_path):
    here = os.path.dirname(__file__)
    with cluster.executor() as ex:
        client = subprocess.Popen([sys.executable, "-c", CLIENT, cluster.host, str(cluster.port),
                                   str(tmp_path / "never")], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                  text=True, env={**os.environ, "PYTHONPATH": os.pathsep.join([here, *sys.path])})
        try:
            assert client.stdout.readline().strip() == "ready"
            assert wait_until(lambda: kept(ex)["held_jobs"] == 1, what="the held job")
            assert kept(ex)["values"] == 1
        finally:
            client.kill()
            client.wait()
        wait_until(lambda: kept(ex)["values"] == 0 and kept(ex)["held_jobs"] == 0,
                   what="the master to drop the lost client's values and held jobs")


def test_the_masters_memory_for_kept_values_is_bounded():
    cluster = start_master(port=0, args=["--kept-bytes", "1M"])
    try:
        cluster.add_workers(1)
        cluster.wait_for_workers(1)
        with cluster.executor() as ex:
            small = ex.put(np.ones(10_000))
            with pytest.raises(KeptValueError, match="--kept-bytes"):
                ex.put(np.ones(200_000))                        # 1.6 MB
            assert ex.submit(np.sum, small).result(30) == 10_000
            big = ex.submit(np.ones, 200_000)                  # its result does not fit: its dependents fail
            with pytest.raises(KeptValueError, match="--kept-bytes"):
                ex.submit(np.sum, big).result(30)
            assert big.result(30).shape == (200_000,)          # its own client still gets it
    finally:
        cluster.stop()


def test_futures_and_refs_of_another_executor_are_refused_at_submit(cluster):
    other = start_master(port=0)
    try:
        with cluster.executor() as ex, other.executor() as stranger:
            future = ex.submit(pow, 2, 2)
            ref = ex.put([1, 2, 3])
            with pytest.raises(ValueError, match="another executor"):
                stranger.submit(add, future, 1)
            with pytest.raises(ValueError, match="another executor"):
                stranger.submit(len, ref)
            future.result(30)
        with pytest.raises(ValueError, match="another executor"):
            with cluster.executor() as again:
                again.submit(add, future, 1)                    # its executor is closed
    finally:
        other.stop()


SCRIPT = textwrap.dedent("""
    import json, os, sys, time
    import numpy as np
    from cw.client.executor import ClusterExecutor

    def gate(path, value):
        while not os.path.exists(path):
            time.sleep(0.02)
        return value

    with ClusterExecutor(sys.argv[1], int(sys.argv[2])) as ex:
        table = ex.put(np.arange(100.0))
        scale = 3

        def scaled(i):                       # a closure over a Ref: the job gets the value
            return float(table[i]) * scale

        base = ex.submit(gate, sys.argv[3], 5)

        def plus(i):                         # over a future not done yet: each call waits for it
            return base + i

        later = [ex.submit(plus, i) for i in range(3)]
        deadline = time.monotonic() + 20
        while ex.status()["kept"]["held_jobs"] < 3 and time.monotonic() < deadline:
            time.sleep(0.02)                 # each waits at the master (a hang would be a failure)
        open(sys.argv[3], "w").close()
        out = {"closure": [ex.submit(scaled, i).result() for i in range(3)],
               "lambda": [ex.submit(lambda t, i: float(t[i]), table, i).result() for i in range(3)],
               "future": ex.submit(lambda a, b: a + b, ex.submit(scaled, 1), ex.submit(scaled, 2)).result(),
               "pending": [f.result() for f in later]}
    print(json.dumps(out))
""")


def test_a_ref_reaches_main_style_lambdas_and_closures(cluster, tmp_path):
    script = tmp_path / "user_script.py"
    script.write_text(SCRIPT)
    run = subprocess.run([sys.executable, str(script), cluster.host, str(cluster.port), str(tmp_path / "open")],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    import json
    assert json.loads(run.stdout) == {"closure": [0.0, 3.0, 6.0], "lambda": [0.0, 1.0, 2.0], "future": 9.0,
                                      "pending": [5, 6, 7]}


def test_dependencies_survive_a_master_restart(tmp_path):
    cluster = start_master(port=0)
    masters = [cluster.master]
    try:
        cluster.add_workers(2)
        cluster.wait_for_workers(2)
        opened = tmp_path / "open"
        ex = cluster.executor(reconnect_timeout=60)
        try:
            ref = ex.put(np.arange(10.0))
            done = ex.submit(pow, 2, 5)
            assert done.result(30) == 32
            waiting = ex.submit(gate, str(opened), 10)
            total = ex.submit(lambda a, b, r: a + b + float(r.sum()), done, waiting, ref)
            assert wait_until(lambda: total.state == "waiting", what="the dependent to be held")
            cluster.master.kill()
            cluster.master.wait()
            cluster.master = start_master(port=cluster.port).master
            masters.append(cluster.master)
            opened.touch()
            # The new master learns the Ref, the unfinished jobs and (asking) the finished one's result.
            assert total.result(60) == 32 + 10 + 45.0
        finally:
            opened.touch()                        # (a failure above must not leave the gated job behind)
            ex.shutdown(wait=False, cancel_futures=True)
    finally:
        cluster.stop()
        for proc in masters:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def test_a_ref_or_a_future_pickled_outside_a_job_is_refused(executor):
    import pickle
    ref = executor.put(1)
    future = executor.submit(pow, 2, 2)
    with pytest.raises(TypeError, match="only be pickled as an argument of a job"):
        pickle.dumps(ref)
    with pytest.raises(TypeError, match="only be pickled as an argument of a job"):
        pickle.dumps([future])
    assert future.result(30) == 4


def test_a_kept_outcome_lives_while_its_future_does(executor, opened):
    first = executor.submit(gate, str(opened), 5)
    second = executor.submit(add, first, 1)
    opened.touch()
    assert second.result(30) == 6
    assert kept(executor)["values"] == 1             # first's outcome: its future may be passed again
    assert executor.submit(add, first, 2).result(30) == 7
    del first, second
    gc.collect()
    wait_until(lambda: kept(executor)["values"] == 0, what="the master to drop the collected future's outcome")


def test_a_broadcast_value_reaches_workers_that_join_later(master, kept_dir):
    with master.executor() as ex:
        ref = ex.put(np.ones(300_000), broadcast=True)
        master.add_workers(1)
        master.wait_for_workers(1)
        wait_until(lambda: os.path.exists(kept_dir / f"{ref.key:016x}"), what="the broadcast to reach the new machine")
        assert ex.submit(np.sum, ref).result(30) == 300_000
        assert kept(ex)["fetched"] == 0


def test_a_cluster_stopped_right_after_its_client_left_leaves_no_cached_values(kept_dir):
    cluster = start_master(port=0)
    try:
        cluster.add_workers(2)
        cluster.wait_for_workers(2)
        with cluster.executor() as ex:
            ref = ex.put(np.ones(300_000))
            assert ex.submit(np.sum, ref).result(30) == 300_000
            assert os.path.exists(kept_dir / f"{ref.key:016x}")
    finally:
        cluster.stop()                  # (the master may have had no time to tell the workers to drop it)
    assert [name for name in os.listdir(kept_dir) if name != ".users"] == []
