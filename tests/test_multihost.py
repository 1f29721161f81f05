"""cw across hosts that lose the network and get it back (issue 13, item 6).

Each test builds a private network of hosts (tests/netns.py): the master's
host, worker hosts, a client host.  The client is a user's script run as
``__main__`` in its host; it prints every result as a JSON line, which names
the run that produced it.  Every run of a job leaves a marker file in a
shared directory, so a test counts how often each job ran, on which host.
``check_results`` then holds the guarantee: every job's result arrives
exactly once and equals the serial answer.

Timing: the master pings every 0.5 s and drops a silent peer after 3 s, so a
cut "beyond the peer timeout" takes seconds.  Waits on state (a readiness
line, the master's status, a marker file) have deadlines that only catch
hangs; the one deliberate wait is how long a cut lasts, which is what a test
is about.

A master that dies and comes back (in place, on another host, through the
address file) is test_multihost_restart.py's; the chaos run of thousands of
jobs under random faults is test_multihost_chaos.py's.  Both use the helpers
here.
"""
from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
import textwrap
import time

import pytest
from netns import network, read_line  # noqa: F401  (network is a fixture)

HEARTBEAT = 0.5
PEER_TIMEOUT = 3.0
#: Deadline for anything that should happen within a few peer timeouts.
DEADLINE = 60.0
MASTER_READY = "cw master listening on "

# The user's script.  argv: master address, marker directory, seconds a job
# takes, "reconnect" or "plain".  Each stdin line is a batch,
# {"jobs": [i, ...], "workers": [host, ...] or null}; it submits the batch,
# prints one JSON line per job as its future completes, then {"batch": n}.
CLIENT = textwrap.dedent('''
    import concurrent.futures
    import json
    import os
    import socket
    import sys
    import time
    import uuid

    from cw.client import ClusterExecutor

    address, runs, seconds, mode = sys.argv[1:5]
    # HOST:PORT, or an address that names where to find the master (file:PATH, slurm:NAME)
    host, port = (address, 5494) if address.startswith(("file:", "slurm:")) else address.rsplit(":", 1)

    def sum_of_squares(i):
        # One marker per run, made before the work: a run that is lost
        # half-way still counts.
        run = f"run.{i}.{socket.gethostname()}.{os.getpid()}.{uuid.uuid4().hex}"
        open(os.path.join(runs, run), "x").close()
        time.sleep(float(seconds))    # the job's work: long enough to be cut mid-way
        return sum(k * k for k in range(i)), run

    def say(**fields):
        print(json.dumps(fields), flush=True)

    # "plain": a client that gives up when its master is lost (reconnect_timeout=0).
    options = {"reconnect_timeout": 60 if mode == "reconnect" else 0}

    with ClusterExecutor(host, int(port), **options) as ex:
        say(ready=True)
        for n, line in enumerate(sys.stdin, 1):
            batch = json.loads(line)
            futures = {}
            for i in batch["jobs"]:
                if batch["workers"]:
                    futures[ex.submit(sum_of_squares, i, workers=batch["workers"])] = i
                else:
                    futures[ex.submit(lambda i: sum_of_squares(i), i)] = i
            for future in concurrent.futures.as_completed(futures):
                i = futures[future]
                try:
                    value, run = future.result()
                except Exception as exc:
                    say(i=i, error=type(exc).__name__, message=str(exc))
                else:
                    say(i=i, value=value, run=run)
            say(batch=n)
''')

# Answers status requests from inside the master's host, whose own address
# it reaches without the bridge: it sees the master's view even while the
# master's host is cut off.  Each stdin line asks once.
PROBE = textwrap.dedent('''
    import json
    import sys

    from cw.client import ClusterExecutor

    host, port = sys.argv[1].rsplit(":", 1)
    with ClusterExecutor(host, int(port)) as ex:
        print(json.dumps({"ready": True}), flush=True)
        for _ in sys.stdin:
            print(json.dumps(ex.status()), flush=True)
''')


def serial(i: int) -> int:
    return sum(k * k for k in range(i))


class ProbedCluster:
    """What every multi-host cluster of these tests has: a status probe
    (``self.probe``, the PROBE script beside the master) and the directory
    its jobs leave their run markers in (``self.runs``)."""

    probe: subprocess.Popen
    runs: pathlib.Path

    def status(self) -> dict:
        self.probe.stdin.write("status\n")
        self.probe.stdin.flush()
        return json.loads(read_line(self.probe, DEADLINE))

    def workers_on(self, status: dict) -> dict:
        """Host name -> connected workers there."""
        hosts: dict[str, int] = {}
        for w in status["workers"]:
            hosts[w["host"]] = hosts.get(w["host"], 0) + 1
        return hosts

    def wait_status(self, predicate, what: str, timeout: float = DEADLINE) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            status = self.status()
            if predicate(status):
                return status
            assert time.monotonic() < deadline, f"timed out after {timeout:g} s waiting for {what}: {status}"
            time.sleep(0.1)   # a poll interval, not a synchronisation: the predicate decides

    def run_markers(self) -> dict[int, list[tuple[str, str, float]]]:
        """Job -> its runs so far, as (run name, host, when it started: time.time())."""
        runs: dict[int, list[tuple[str, str, float]]] = {}
        for entry in os.scandir(self.runs):
            _, i, host, _pid, _ = entry.name.split(".")
            runs.setdefault(int(i), []).append((entry.name, host, entry.stat().st_mtime))
        return runs


class Cluster(ProbedCluster):
    """A master (and a status probe beside it) on one host, workers on others,
    user scripts as clients; the network fixture stops all of it."""

    def __init__(self, master_host, tmp_path):
        self.master_host = master_host
        self.tmp = tmp_path
        self.runs = tmp_path / "runs"
        self.runs.mkdir()
        (tmp_path / "client.py").write_text(CLIENT)
        (tmp_path / "probe.py").write_text(PROBE)
        self.master = master_host.popen(
            [sys.executable, "-m", "cw.master", "--bind", master_host.address, "--port", "0",
             "--heartbeat", str(HEARTBEAT), "--peer-timeout", str(PEER_TIMEOUT), "--log-level", "WARNING"],
            stdout=subprocess.PIPE)
        line = read_line(self.master, DEADLINE)
        assert line.startswith(MASTER_READY), f"the master printed {line!r}"
        self.address = line[len(MASTER_READY):].strip()
        self.probe = master_host.popen([sys.executable, str(tmp_path / "probe.py"), self.address],
                                       stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        assert json.loads(read_line(self.probe, DEADLINE)) == {"ready": True}

    def add_workers(self, host, n: int):
        return host.popen([sys.executable, "-m", "cw.worker", self.address, "-n", str(n),
                           "--connect-timeout", str(DEADLINE), "--log-level", "WARNING"])

    def start_client(self, host, seconds: float, reconnect: bool = False) -> Client:
        proc = host.popen([sys.executable, str(self.tmp / "client.py"), self.address, str(self.runs),
                           str(seconds), "reconnect" if reconnect else "plain"],
                          stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        return Client(proc)

    def wait_for_run_on(self, hostname: str) -> None:
        deadline = time.monotonic() + DEADLINE
        while not any(run[1] == hostname for runs in self.run_markers().values() for run in runs):
            assert time.monotonic() < deadline, f"no job started on {hostname} within {DEADLINE} s"
            time.sleep(0.01)


class Client:
    def __init__(self, proc):
        self.proc = proc
        self.notes = []
        ready = self.read()
        assert ready == {"ready": True}, ready

    def read(self, timeout: float = DEADLINE) -> dict:
        while True:
            item = json.loads(read_line(self.proc, timeout))
            if "note" not in item:
                return item
            self.notes.append(item["note"])

    def submit(self, jobs, workers=None) -> None:
        self.proc.stdin.write(json.dumps({"jobs": list(jobs), "workers": workers}) + "\n")
        self.proc.stdin.flush()

    def results(self, timeout: float = DEADLINE) -> list[dict]:
        """The lines of one batch, up to its end."""
        deadline = time.monotonic() + timeout
        lines = []
        while True:
            item = self.read(max(0.1, deadline - time.monotonic()))
            if "batch" in item:
                return lines
            lines.append(item)

    def finish(self) -> None:
        self.proc.stdin.close()
        assert self.proc.wait(DEADLINE) == 0, f"the client script exited with status {self.proc.returncode}"


def check_results(lines: list[dict], jobs, runs: dict) -> dict[int, str]:
    """Every job of ``jobs`` has exactly one result line, equal to the serial
    answer and produced by one of its recorded runs; returns job -> the run
    whose result arrived."""
    errors = [line for line in lines if "error" in line]
    assert not errors, f"jobs failed: {errors}"
    seen: dict[int, list[dict]] = {}
    for line in lines:
        seen.setdefault(line["i"], []).append(line)
    jobs = list(jobs)
    assert sorted(seen) == sorted(jobs), f"results for {sorted(seen)}, submitted {jobs}"
    twice = {i: got for i, got in seen.items() if len(got) != 1}
    assert not twice, f"results delivered more than once: {twice}"
    wrong = {i: got[0]["value"] for i, got in seen.items() if got[0]["value"] != serial(i)}
    assert not wrong, f"wrong results (job: value): {wrong}"
    for i, got in seen.items():
        assert got[0]["run"] in {run[0] for run in runs.get(i, [])}, f"job {i}'s result names no run of it"
    return {i: got[0]["run"] for i, got in seen.items()}


def test_check_results_sees_a_duplicate_a_loss_and_a_wrong_answer():
    """The checker the scenarios rely on can fail."""
    runs = {0: [("r0", "w", 0.0)], 1: [("r1", "w", 0.0)]}
    good = [{"i": 0, "value": 0, "run": "r0"}, {"i": 1, "value": 0, "run": "r1"}]
    check_results(good, [0, 1], runs)
    for bad in (good + good[:1], good[:1], [good[0], {**good[1], "value": 5}],
                [good[0], {**good[1], "run": "r0"}], [good[0], {"i": 1, "error": "BrokenCluster"}]):
        with pytest.raises(AssertionError):
            check_results(bad, [0, 1], runs)


def test_hosts_have_their_names_and_a_cut_partitions(network):  # noqa: F811
    """The harness itself: each host has its own hostname; a cut host reaches
    no one and no one reaches it, and its processes live on; a heal undoes it."""
    a, b = network.add_host("ha"), network.add_host("hb")
    assert a.run(["hostname"]).stdout.strip() == "ha"
    assert b.run(["hostname"]).stdout.strip() == "hb"
    server = b.popen([sys.executable, "-c", textwrap.dedent(f'''
        import socket
        s = socket.create_server(("{b.address}", 0))
        print(s.getsockname()[1], flush=True)
        while True:
            c, _ = s.accept()
            c.sendall(socket.gethostname().encode())
            c.close()
    ''')], stdout=subprocess.PIPE)
    port = int(read_line(server, DEADLINE))
    probe = [sys.executable, "-c",
             f"import socket; print(socket.create_connection(('{b.address}', {port}), timeout=1).recv(9).decode())"]
    assert a.run(probe).stdout.strip() == "hb"
    for cut in (a, b):
        cut.cut()
        assert a.run(probe).returncode != 0, f"{a.name} reached {b.name} while {cut.name} was cut"
        cut.heal()
        assert a.run(probe).stdout.strip() == "hb"
    assert server.poll() is None


def test_worker_host_cut_beyond_peer_timeout_then_healed(network, tmp_path):  # noqa: F811
    """A worker host cut off mid-job for longer than the peer timeout: the
    master drops its workers and re-runs their jobs, each exactly once, on
    live workers (w2's, or w1's once they have rejoined); after the heal the
    host's workers rejoin and run jobs again."""
    m, w1, w2, c = (network.add_host(n) for n in ("m", "w1", "w2", "c"))
    cluster = Cluster(m, tmp_path)
    cluster.add_workers(w1, 2)
    cluster.add_workers(w2, 2)
    cluster.wait_status(lambda s: cluster.workers_on(s) == {"w1": 2, "w2": 2}, "2 workers on each of w1, w2")
    client = cluster.start_client(c, seconds=0.5)

    # 8 jobs fill the 4 workers' 8 slots: w1 holds 4 when it is cut.
    client.submit(range(8))
    cluster.wait_for_run_on("w1")
    w1.cut()
    started = time.monotonic()
    cluster.wait_status(lambda s: "w1" not in cluster.workers_on(s), "the master to drop w1's workers")
    dropped = time.monotonic() - started
    healed_at = time.time()
    w1.heal()
    lines = client.results()
    cluster.wait_status(lambda s: cluster.workers_on(s) == {"w1": 2, "w2": 2}, "w1's workers to rejoin")
    rejoined = time.monotonic() - started

    runs = cluster.run_markers()
    delivered = check_results(lines, range(8), runs)
    lost = {i: [run for run in job_runs if run[0] != delivered[i]] for i, job_runs in runs.items()}
    lost = {i: job_runs for i, job_runs in lost.items() if job_runs}
    assert lost, "no job was lost with w1: the cut came too late to test anything"
    assert all(run[1] == "w1" and run[2] < healed_at for job_runs in lost.values() for run in job_runs), \
        f"a run was lost that was not on w1 during the cut: {lost}"
    assert all(len(job_runs) == 1 for job_runs in lost.values()), f"jobs lost more than once: {lost}"
    by_name = {run[0]: run for job_runs in runs.values() for run in job_runs}
    reruns = {i: by_name[delivered[i]] for i in lost}
    # (An idle worker takes over jobs another holds but has not started, so
    # w1's rejoined workers may take some re-runs from w2.)
    assert all(host == "w2" or (host == "w1" and when >= healed_at) for _, host, when in reruns.values()), \
        f"a lost job was re-run on w1's lost connection: {reruns}"

    # The rejoined workers take jobs again: a batch that may run only on w1.
    client.submit(range(8, 12), workers=["w1"])
    more = client.results()
    runs = cluster.run_markers()
    check_results(more, range(8, 12), runs)
    assert {run[1] for i in range(8, 12) for run in runs[i]} == {"w1"}
    assert all(len(runs[i]) == 1 for i in range(8, 12))
    client.finish()
    on_w1 = sum(run[1] == "w1" for run in reruns.values())
    print(f"\nworker cut: {len(lost)} jobs lost with w1 ({on_w1} re-run on w1 after it rejoined); "
          f"w1 dropped {dropped:.1f} s after the cut, rejoined after {rejoined:.1f} s")
    # The master counts from the last frame it had, up to a heartbeat before the cut.
    assert dropped >= PEER_TIMEOUT - 2 * HEARTBEAT, f"w1 was dropped {dropped:.1f} s after the cut"


def test_client_host_cut_shorter_than_peer_timeout(network, tmp_path):  # noqa: F811
    """A client host cut off for a third of the peer timeout while its jobs
    run and finish: nothing is lost, nothing re-run, and the master still
    counts it as the same client."""
    m, w1, c = (network.add_host(n) for n in ("m", "w1", "c"))
    cluster = Cluster(m, tmp_path)
    cluster.add_workers(w1, 2)
    cluster.wait_status(lambda s: cluster.workers_on(s) == {"w1": 2}, "2 workers on w1")
    client = cluster.start_client(c, seconds=0.2)
    before = [cl["id"] for cl in cluster.status()["clients"] if cl["host"] == "c"]

    client.submit(range(12))
    cluster.wait_for_run_on("w1")
    c.cut()
    started_before = len(cluster.run_markers())
    # The cut's length is the point of this test: shorter than the peer
    # timeout, long enough that jobs finish while the client is away.
    time.sleep(PEER_TIMEOUT / 3)
    started_during = len(cluster.run_markers()) - started_before
    c.heal()
    started = time.monotonic()
    lines = client.results()
    caught_up = time.monotonic() - started

    runs = cluster.run_markers()
    check_results(lines, range(12), runs)
    assert {i: len(r) for i, r in runs.items() if len(r) != 1} == {}, "jobs ran more than once"
    after = [cl["id"] for cl in cluster.status()["clients"] if cl["host"] == "c"]
    assert after == before, f"the master saw clients {before} from c before the cut and {after} after"
    # (Each started job follows a finished one: the workers' first two did not.)
    assert started_during >= 2, "no job finished during the cut: it tested nothing"
    client.finish()
    print(f"\nclient cut: {started_during} jobs started during the cut; results caught up "
          f"{caught_up:.1f} s after the heal")


def test_master_host_cut_beyond_peer_timeout_then_back(network, tmp_path):  # noqa: F811
    """The master's host cut off for longer than the peer timeout, then back:
    a client made with ClusterExecutor(reconnect_timeout=60) rides through,
    and every job completes exactly once after the heal."""
    m, w1, c = (network.add_host(n) for n in ("m", "w1", "c"))
    cluster = Cluster(m, tmp_path)
    cluster.add_workers(w1, 2)
    cluster.wait_status(lambda s: cluster.workers_on(s) == {"w1": 2}, "2 workers on w1")
    client = cluster.start_client(c, seconds=0.5, reconnect=True)

    client.submit(range(8))
    cluster.wait_for_run_on("w1")
    m.cut()
    started = time.monotonic()
    # The master drops silent peers; the workers and the client count the
    # master lost on their own clocks, so the cut lasts past their timeout too.
    cluster.wait_status(lambda s: not s["workers"], "the master to drop the workers")
    time.sleep(max(0.0, started + PEER_TIMEOUT * 1.5 - time.monotonic()))
    m.heal()
    lines = client.results()
    print(f"\nmaster cut: {time.monotonic() - started:.1f} s from the cut to the last result; "
          f"client notes: {client.notes}")
    check_results(lines, range(8), cluster.run_markers())
    client.finish()


def test_client_host_cut_for_good_frees_the_cluster(network, tmp_path):  # noqa: F811
    """A client host cut off for good: the client fails with BrokenCluster
    after the peer timeout (as documented), and the master, which can no
    more reach it than it can reach the master, drops it with its jobs, as it
    does for a client that disconnects, instead of running them for no one."""
    m, w1, c = (network.add_host(n) for n in ("m", "w1", "c"))
    cluster = Cluster(m, tmp_path)
    cluster.add_workers(w1, 1)
    cluster.wait_status(lambda s: cluster.workers_on(s) == {"w1": 1}, "a worker on w1")
    client = cluster.start_client(c, seconds=1.0)

    client.submit(range(20))
    cluster.wait_for_run_on("w1")
    c.cut()
    lines = client.results()
    assert {line.get("error") for line in lines} == {"BrokenCluster"}, lines
    # Two more peer timeouts than the client needed to give up.
    deadline = time.monotonic() + 2 * PEER_TIMEOUT
    while True:
        status = cluster.status()
        if not any(cl["host"] == "c" for cl in status["clients"]) and status["queued"] == 0:
            break
        assert time.monotonic() < deadline, f"the master still holds the lost client's jobs: {status}"
        time.sleep(0.1)   # a poll interval
