"""The function cache with real processes: functions defined the way users
define them (in a script's ``__main__``, lambdas and closures) travel to
each worker once, a redefined function or a rebound global is seen, and a
worker without them (a replaced worker, one whose cache let them go, a
restarted master) still runs the jobs."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
from conftest import alive, wait_until

from cw.launch.local import start_master

SCRIPT = textwrap.dedent("""
    import json, sys
    from cw.client.executor import ClusterExecutor
    from cw.client.functions import FUNCTIONS

    offset = 1

    def add(x):
        return x + offset

    out = {}
    with ClusterExecutor(sys.argv[1], int(sys.argv[2])) as ex:
        out["first"] = [f.result() for f in [ex.submit(add, i) for i in range(50)]]
        offset = 100
        out["rebound"] = [ex.submit(add, i).result() for i in range(3)]

        def add(x):
            return x * 2

        out["redefined"] = [ex.submit(add, i).result() for i in range(3)]
        out["map"] = list(ex.map(add, range(20), chunksize=4))
        out["functions"] = ex.status()["functions"]
        out["pickled"] = FUNCTIONS.pickled
    print(json.dumps(out))
""")


def loaded_here():
    """Run as a job: how many functions this worker process unpickled from FUNCs."""
    from cw.wire import payload
    return payload.functions_loaded


def test_a_scripts_functions_travel_once_and_a_redefinition_or_rebound_global_is_seen(cluster, tmp_path):
    script = tmp_path / "user_script.py"
    script.write_text(SCRIPT)
    run = subprocess.run([sys.executable, str(script), cluster.host, str(cluster.port)],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    out = json.loads(run.stdout)
    assert out["first"] == [i + 1 for i in range(50)]
    assert out["rebound"] == [100, 101, 102]
    assert out["redefined"] == [0, 2, 4]
    assert out["map"] == [2 * i for i in range(20)]
    # Three versions of add, each pickled once and sent at most once to each of the two workers.
    assert out["pickled"] == 3
    assert out["functions"]["sent_to_workers"] <= 3 * 2


def test_lambdas_and_closures_are_unpickled_once_per_worker(executor):
    double = lambda x: 2 * x  # noqa: E731 - a lambda is the case under test

    def make(n):
        return lambda x: x + n

    assert [f.result() for f in [executor.submit(double, i) for i in range(40)]] == [2 * i for i in range(40)]
    assert [executor.submit(make(n), 1).result() for n in range(5)] == [1, 2, 3, 4, 5]
    loaded = {w: n for w, n in executor.run_on_all(loaded_here).items()}
    # At most: double, five closures (different captured values); loaded_here is a module's function.
    assert all(0 < n <= 6 for n in loaded.values()), loaded


def test_a_worker_whose_cache_let_a_function_go_asks_for_it_and_runs_the_job(master):
    env = dict(os.environ, CW_WORKER_FUNCTIONS="1")
    master.add_workers(1, env=env)
    master.wait_for_workers(1)
    f = lambda x: x + 1  # noqa: E731
    g = lambda x: x - 1  # noqa: E731
    with master.executor() as ex:
        results = [ex.submit(fn, 10).result(timeout=60) for fn in (f, g, f, g, f)]
        assert results == [11, 9, 11, 9, 11]
        assert ex.status()["functions"]["needs_answered"] >= 3


def wait_for_flag(flag: str, pids: str):
    """Run as a job: notes its worker's pid, then waits (bounded) for ``flag``."""
    with open(pids, "a") as out:
        out.write(f"{os.getpid()}\n")
    deadline = time.monotonic() + 60
    while not os.path.exists(flag) and time.monotonic() < deadline:
        time.sleep(0.01)
    return os.getpid()


def test_a_replaced_worker_without_the_function_still_runs_the_job(cluster, tmp_path):
    flag, pids = str(tmp_path / "flag"), str(tmp_path / "pids")
    waiter = lambda: wait_for_flag(flag, pids)  # noqa: E731 - by value: it goes through the cache
    with cluster.executor() as ex:
        future = ex.submit(waiter)
        pid = int(wait_until(lambda: open(pids).read().split() if os.path.exists(pids) else None,
                             what="the job to start")[0])
        os.kill(pid, signal.SIGKILL)
        wait_until(lambda: not alive(pid), what="the killed worker to exit")
        open(flag, "w").close()
        assert future.result(timeout=60) != pid
        wait_until(lambda: len(ex.status()["workers"]) == 2 and pid not in
                   {w["pid"] for w in ex.status()["workers"]}, what="the supervisor to replace the worker")
        assert len({p for p in ex.run_on_all(waiter).values()}) == 2
        assert ex.status()["functions"]["sent_to_workers"] >= 2    # the replacement got it too


@pytest.fixture
def restartable():
    cluster = start_master(port=0)
    cluster.add_workers(2)
    cluster.wait_for_workers(2)
    masters = [cluster.master]

    def restart():
        cluster.master.kill()
        cluster.master.wait()
        cluster.master = start_master(port=cluster.port).master
        masters.append(cluster.master)

    yield cluster, restart
    cluster.stop()
    for proc in masters:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_cached_functions_ride_through_a_master_restart(restartable, tmp_path):
    cluster, restart = restartable
    flag, pids = str(tmp_path / "flag"), str(tmp_path / "pids")
    waiter = lambda: wait_for_flag(flag, pids)  # noqa: E731
    square = lambda x: x * x  # noqa: E731
    with cluster.executor() as ex:
        assert ex.submit(square, 3).result(timeout=60) == 9
        pending = ex.submit(waiter)
        wait_until(lambda: os.path.exists(pids), what="the job to start")
        restart()
        open(flag, "w").close()
        pending.result(timeout=60)
        # The new master learnt the functions from the resubmission: jobs naming them run.
        assert [ex.submit(square, i).result(timeout=60) for i in range(5)] == [0, 1, 4, 9, 16]
        assert ex.status()["functions"]["held"] >= 2
