"""A chaos run across hosts (issue 13, item 6): thousands of short jobs from
two clients on three worker hosts, while the test cuts and heals worker
hosts, kills worker processes, and kills and restarts the master.

Every fault is drawn from one seeded random generator, and the seed is
printed: ``CW_CHAOS_SEED=N`` replays a run's choices (not its timing, which
the machine decides).  ``CW_CHAOS_JOBS`` sets the number of jobs (default
2,000, about 35 s here); a larger number makes a longer run with more
faults, e.g. ``CW_CHAOS_JOBS=20000`` for a soak.

The checker is test_multihost's: every job's result arrives exactly once,
equals the serial answer, and names a run that happened.  The master and
worker hosts find each other through the address file (as on SLURM); the
master comes back on its host and port, where clients and its status probe
reconnect to it (reconnect_timeout).
"""
from __future__ import annotations

import json
import os
import queue
import random
import signal
import subprocess
import sys
import textwrap
import time

import pytest
from netns import network  # noqa: F401  (a fixture)
from test_multihost import DEADLINE, PEER_TIMEOUT, check_results
from test_multihost_restart import RestartableCluster

JOBS = int(os.environ.get("CW_CHAOS_JOBS", "2000"))
#: Seconds each job sleeps: short, so that a fault finds many jobs in flight.
JOB_SECONDS = 0.05
WORKER_HOSTS = ("w1", "w2", "w3")
WORKERS_PER_HOST = 2
#: Results between two faults, drawn uniformly: counted in results, not
#: seconds, so that a run on a loaded machine gets the same number of faults
#: (about one per 60 jobs), not more of them for being slower.
FAULT_GAP = (20, 100)
#: How long a cut lasts: some shorter than the peer timeout (the master keeps
#: the host's workers), most beyond it (it drops them and re-runs their jobs).
CUT_LENGTH = (0.3 * PEER_TIMEOUT, 2.5 * PEER_TIMEOUT)
#: How long the master stays dead before its restart: up to beyond the peer
#: timeout, so that workers and clients count it lost on their own clocks.
MASTER_DOWN = (0.0, 1.5 * PEER_TIMEOUT)
#: Master kills: two, and one more per 1,000 jobs beyond 2,000 in a longer run.
MASTER_KILLS = max(2, JOBS // 1000)
#: Seconds the run may take before the test calls it hung: the work itself
#: (JOBS * JOB_SECONDS / 6 s on six workers) a few times over, and the
#: faults' outages; measured: 30-66 s for 2,000 jobs on a loaded machine.
LIMIT = 50.0 + JOBS * JOB_SECONDS

# A user's script: submits jobs FIRST..FIRST+N-1 at once when told (a line on
# stdin), prints each result as a JSON line as it comes, then {"batch": 1}.
# A job may be lost with its worker many times in a run like this one: it may
# be re-run up to 50 times.
# argv: master address, marker directory, seconds a job takes, FIRST, N.
CHAOS_CLIENT = textwrap.dedent('''
    import concurrent.futures
    import json
    import os
    import socket
    import sys
    import time
    import uuid

    from cw.client import ClusterExecutor

    address, runs, seconds, first, n = sys.argv[1:6]
    host, port = address.rsplit(":", 1)

    def sum_of_squares(i):
        run = f"run.{i}.{socket.gethostname()}.{os.getpid()}.{uuid.uuid4().hex}"
        open(os.path.join(runs, run), "x").close()
        time.sleep(float(seconds))
        return sum(k * k for k in range(i)), run

    def say(**fields):
        print(json.dumps(fields), flush=True)

    with ClusterExecutor(host, int(port), reconnect_timeout=60, max_retries=50) as ex:
        say(ready=True)
        sys.stdin.readline()
        futures = {ex.submit(lambda i: sum_of_squares(i), i): i for i in range(int(first), int(first) + int(n))}
        for future in concurrent.futures.as_completed(futures):
            i = futures[future]
            try:
                value, run = future.result()
            except Exception as exc:
                say(i=i, error=type(exc).__name__, message=str(exc))
            else:
                say(i=i, value=value, run=run)
        say(batch=1)
''')


class ChaosClient:
    """One client script; its result lines are collected without blocking."""

    def __init__(self, cluster, host, first: int, n: int):
        self.jobs = range(first, first + n)
        self.lines: list[dict] = []
        self.done = False
        self.proc = host.popen([sys.executable, str(cluster.tmp / "chaos_client.py"), cluster.address,
                                str(cluster.runs), str(JOB_SECONDS), str(first), str(n)],
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=cluster.env)
        assert json.loads(self.proc.lines.get(timeout=DEADLINE)) == {"ready": True}

    def go(self) -> None:
        self.proc.stdin.write("go\n")
        self.proc.stdin.flush()

    def collect(self) -> None:
        """Takes every line printed so far."""
        while not self.done:
            try:
                line = self.proc.lines.get_nowait()
            except queue.Empty:
                return
            assert line, f"the client script for jobs {self.jobs} ended early (status {self.proc.wait()})"
            item = json.loads(line)
            if "batch" in item:
                self.done = True
            else:
                self.lines.append(item)

    def finish(self) -> None:
        self.proc.stdin.close()
        assert self.proc.wait(DEADLINE) == 0, f"the client script exited with status {self.proc.returncode}"


# pytest-timeout's limit (a thread dump) only behind the test's own, which names the seed.
@pytest.mark.timeout(LIMIT + 60)
def test_chaos_run(network, tmp_path):  # noqa: F811
    """JOBS jobs from two clients on three worker hosts, under random cuts and
    heals of worker hosts, SIGKILLs of worker processes, and (at least) two
    SIGKILLs and restarts of the master: every result arrives exactly once and is right,
    and afterwards every worker host's workers are back."""
    seed = int(os.environ.get("CW_CHAOS_SEED") or random.SystemRandom().randrange(1 << 32))
    print(f"\nchaos: seed {seed} (CW_CHAOS_SEED={seed} replays its choices), {JOBS} jobs")
    rng = random.Random(seed)
    m = network.add_host("m")
    workers = {name: network.add_host(name) for name in WORKER_HOSTS}
    c1, c2 = network.add_host("c1"), network.add_host("c2")
    cluster = RestartableCluster(tmp_path)
    (tmp_path / "chaos_client.py").write_text(CHAOS_CLIENT)
    cluster.start_master(m)
    full = {name: WORKERS_PER_HOST for name in WORKER_HOSTS}
    for host in workers.values():
        cluster.add_workers(host, WORKERS_PER_HOST)
    cluster.wait_status(lambda s: cluster.workers_on(s) == full, f"{WORKERS_PER_HOST} workers on each worker host")
    half = JOBS // 2
    clients = [ChaosClient(cluster, c1, 0, half), ChaosClient(cluster, c2, half, JOBS - half)]

    # After how many results the master dies: one draw in each of MASTER_KILLS
    # equal stretches of the first 90 % of the run, so that the kills spread out
    # and the last comes well before the end.
    kill_master_after = [int(0.9 * JOBS * rng.uniform(k + 0.2, k + 0.8) / MASTER_KILLS) for k in range(MASTER_KILLS)]
    faults: list[str] = []
    heal_at: dict[str, float] = {}
    started = time.monotonic()
    next_fault = rng.randint(*FAULT_GAP)
    master_kills = 0
    for client in clients:
        client.go()
    while not all(client.done for client in clients):
        for client in clients:
            client.collect()
        now = time.monotonic()
        got = sum(len(client.lines) for client in clients)
        assert now - started < LIMIT, (f"the chaos run did not end within {LIMIT:g} s: {got} of {JOBS} results; "
                                       f"seed {seed}; faults: {faults}")
        for name, when in list(heal_at.items()):
            if now >= when:
                workers[name].heal()
                del heal_at[name]
                faults.append(f"{now - started:.1f} heal {name}")
        if master_kills < len(kill_master_after) and got >= kill_master_after[master_kills]:
            down = rng.uniform(*MASTER_DOWN)
            faults.append(f"{now - started:.1f} kill the master ({got} results in), down {down:.1f} s")
            cluster.kill_master()
            master_kills += 1
            time.sleep(down)      # the outage's length is the fault itself
            cluster.start_master(m)
        if got >= next_fault:
            faults.append(f"{now - started:.1f} " + inject(rng, cluster, workers, heal_at, now))
            next_fault = got + rng.randint(*FAULT_GAP)
        time.sleep(0.05)          # a poll interval: the clients' lines decide when the run ends
    elapsed = time.monotonic() - started
    for name in list(heal_at):
        workers[name].heal()
        faults.append(f"{elapsed:.1f} heal {name} (end)")

    runs = cluster.run_markers()
    for client in clients:
        try:
            check_results(client.lines, client.jobs, runs)
        except AssertionError as exc:
            raise AssertionError(f"seed {seed}: {exc}\nfaults: {faults}") from None
    assert master_kills == len(kill_master_after), \
        f"the master was killed {master_kills} times, not {len(kill_master_after)}: the run ended first"
    back = cluster.wait_status(lambda s: cluster.workers_on(s) == full, "every worker host's workers to be back")
    for client in clients:
        client.finish()
    repeated = sum(len(r) - 1 for r in runs.values())
    kinds = {kind: sum(kind in f for f in faults) for kind in ("cut", "heal", "kill worker pid", "kill the master")}
    print(f"chaos: {JOBS} jobs in {elapsed:.1f} s, every result exactly once; {repeated} runs repeated; "
          f"faults {kinds}; {len(back['workers'])} workers at the end")
    print("chaos: faults (s since start):\n  " + "\n  ".join(faults))


def inject(rng: random.Random, cluster, workers: dict, heal_at: dict, now: float) -> str:
    """One fault, drawn: a cut of a worker host (never the last one standing,
    so that the run goes on), or a SIGKILL of a worker process chosen from
    the master's status (its supervisor starts another)."""
    standing = [name for name in workers if name not in heal_at]
    if len(standing) > 1 and rng.random() < 0.5:
        name = rng.choice(standing)
        length = rng.uniform(*CUT_LENGTH)
        workers[name].cut()
        heal_at[name] = now + length
        return f"cut {name} for {length:.1f} s"
    status = cluster.status()
    if not status["workers"]:
        return "kill worker: none connected"
    victim = rng.choice(sorted(status["workers"], key=lambda w: w["id"]))
    host = workers.get(victim["host"])
    # Only a process of this test: the pid must be in that host's namespace
    # (a worker that has just exited may have left its pid to another process).
    if host is None or victim["pid"] not in host.pids():
        return f"kill worker: pid {victim['pid']} on {victim['host']} is gone"
    try:
        os.kill(victim["pid"], signal.SIGKILL)
    except ProcessLookupError:
        return f"kill worker: pid {victim['pid']} ended first"
    return f"kill worker pid {victim['pid']} on {victim['host']}"
