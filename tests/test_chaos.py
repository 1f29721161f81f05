"""Chaos: workers are SIGKILLed at random while a thousand jobs run.

Every job must still give the right result, delivered exactly once, and the
supervisor must replace every killed worker.  Nothing here waits on a clock
to synchronise: the killer's pauses only pace it, and the run's first jobs
hold the workers (until a file appears, their release signal) until five
workers have been killed, so the run always loses running jobs and re-runs
them, however fast the machine.
"""
from __future__ import annotations

import collections
import os
import random
import signal
import threading

from cw.client import ClientThread

JOBS = 1000
WORKERS = 3
MIN_KILLS = 5
HELD = WORKERS          # the first jobs wait for the release signal, one per worker
TIMEOUT = 120           # seconds; only catches a hang


def expected(i: int) -> int:
    return sum(k * k for k in range(i % 500))


def parent_pid(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rpartition(")")[2].split()[1])
    except (OSError, ValueError, IndexError):
        return None


def make_job():
    # Made in a function so that cloudpickle sends it by value: a restarted
    # worker need not import this test module (and pytest) before its first job.
    def job(i, release_path, starts_path):
        import os
        import time
        fd = os.open(starts_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            os.write(fd, b"%d\n" % i)        # one short O_APPEND write: atomic
        finally:
            os.close(fd)
        if release_path is not None:
            while not os.path.exists(release_path):  # held until the test releases it
                time.sleep(0.005)
        time.sleep(0.005)
        return sum(k * k for k in range(i % 500))
    return job


def test_every_result_arrives_exactly_once_while_workers_are_killed(master, tmp_path):
    supervisor = master.add_workers(WORKERS)
    master.wait_for_workers(WORKERS)
    release = tmp_path / "release"
    starts = tmp_path / "starts"
    job = make_job()

    deliveries = collections.Counter()
    results = {}

    def callback(jobid, result):
        deliveries[jobid] += 1
        results[jobid] = result

    killed: list[int] = []
    errors: list[BaseException] = []
    stop = threading.Event()

    with master.executor() as observer:

        def kill_workers():
            rng = random.Random()
            try:
                while not stop.wait(rng.uniform(0.3, 1.0)):
                    pids = [w["pid"] for w in observer.status()["workers"]]
                    if os.path.exists("/proc"):  # only our supervisor's children, should a pid be reused
                        pids = [p for p in pids if parent_pid(p) == supervisor.pid]
                    if not pids:
                        continue
                    pid = rng.choice(pids)
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except ProcessLookupError:
                        continue
                    killed.append(pid)
                    if len(killed) >= MIN_KILLS:
                        release.touch()
            except BaseException as exc:  # noqa: BLE001 - reported by the test
                errors.append(exc)
            finally:
                release.touch()  # never leave jobs held if the killer fails

        client = ClientThread(callback, master.host, master.port, max_retries=50)

        def wait_for_all():
            try:
                client.wait()
            except BaseException as exc:  # noqa: BLE001 - reported by the test
                errors.append(exc)

        killer = threading.Thread(target=kill_workers, name="chaos-killer", daemon=True)
        waiter = threading.Thread(target=wait_for_all, name="chaos-waiter", daemon=True)
        client.start()
        try:
            for i in range(JOBS):
                client.submit(i, job, i, str(release) if i < HELD else None, str(starts))
            killer.start()
            waiter.start()
            waiter.join(TIMEOUT)
            assert not waiter.is_alive(), f"jobs still pending after {TIMEOUT} s; {len(killed)} workers killed"
            stop.set()
            killer.join(TIMEOUT)
            assert not errors, errors
            assert len(killed) >= MIN_KILLS, killed
            # While our client is still connected: the master sent it exactly one
            # result per job (a duplicate RESULT frame would be dropped by the
            # client unseen, but the master counts it here) and holds none of its jobs.
            ours = [c for c in observer.status()["clients"] if c["submitted"]]
            assert [(c["submitted"], c["done"], c["queued"], c["running"]) for c in ours] == [(JOBS, JOBS, 0, 0)]
        finally:
            stop.set()
            release.touch()
            client.stop()

        # Every result is right and reached the callback exactly once.
        assert sorted(deliveries) == list(range(JOBS))
        assert {jobid: n for jobid, n in deliveries.items() if n != 1} == {}
        assert {i: r for i, r in results.items() if r != expected(i)} == {}

        # Running jobs were really lost and re-run: each job ran, some more than once.
        runs = collections.Counter(int(line) for line in starts.read_text().split())
        assert sorted(runs) == list(range(JOBS))
        assert max(runs.values()) >= 2, "no job was ever re-run: the kills missed every running job"
        print(f"chaos: {len(killed)} workers killed, {sum(runs.values()) - JOBS} re-runs")

        # The supervisor replaced every killed worker.
        master.wait_for_workers(WORKERS)
        assert {w["pid"] for w in observer.status()["workers"]}.isdisjoint(killed)
