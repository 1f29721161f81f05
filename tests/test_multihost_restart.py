"""A master that dies and comes back, across hosts (issue 13, item 6).

The master runs with ``--address-file`` in a directory every host sees (the
test's tmp dir stands for a shared home): ``<CW_STATE_DIR>/clusters/<name>/master``,
where SLURM discovery looks for it.  Workers are pointed at ``slurm:<name>``,
which reads that file (outside SLURM too: a record with no job id is taken as
it is).  The scenarios:

- the master killed with SIGKILL and restarted on the same host and port:
  clients ride through (reconnect_timeout), workers come back through the
  address file, every job's result arrives exactly once;
- the master killed and restarted on another host: workers (``slurm:NAME``)
  and clients (``file:PATH``) follow the address file to it (a connection
  attempt lasts at most 5 s, then the file is read again);
- the master's host cut off beyond the peer timeout while a ``ClientThread``
  (the callback API) waits on its jobs.

The helpers (the user's client script, the status probe, ``check_results``)
are test_multihost's.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time

from netns import network, read_line  # noqa: F401  (network is a fixture)
from test_multihost import (
    CLIENT,
    DEADLINE,
    HEARTBEAT,
    MASTER_READY,
    PEER_TIMEOUT,
    PROBE,
    Client,
    ProbedCluster,
    check_results,
    serial,
)

#: Each host has a port space of its own: a fixed port is free on every one.
PORT = 5494
CLUSTER = "mh"


class RestartableCluster(ProbedCluster):
    """A master that can be killed and started again on any host, publishing
    its address in the shared address file; a status probe beside it; workers
    that find it through that file; user scripts as clients."""

    def __init__(self, tmp_path):
        self.tmp = tmp_path
        self.runs = tmp_path / "runs"
        self.runs.mkdir()
        (tmp_path / "client.py").write_text(CLIENT)
        (tmp_path / "probe.py").write_text(PROBE)
        self.state = tmp_path / "state"
        self.address_file = self.state / "clusters" / CLUSTER / "master"
        # What a process on a node of this "cluster" has in its environment;
        # nothing of SLURM's, so discovery cannot ask a real SLURM.
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_") and k != "CW_MASTER"}
        self.env.update(CW_STATE_DIR=str(self.state), CW_CLUSTER=CLUSTER)
        self.master = self.probe = self.host = None
        self.starts = 0

    def start_master(self, host, port: int = PORT) -> None:
        """Starts the master on ``host`` (every interface, advertising the
        host's address), waits for its readiness line, checks the address
        file names it, and starts a status probe beside it."""
        self.master = host.popen(
            [sys.executable, "-m", "cw.master", "--bind", "0.0.0.0", "--advertise", host.address,
             "--port", str(port), "--address-file", str(self.address_file), "--heartbeat", str(HEARTBEAT),
             "--peer-timeout", str(PEER_TIMEOUT), "--log-level", "WARNING"],
            stdout=subprocess.PIPE, env=self.env)
        line = read_line(self.master, DEADLINE)
        assert line.startswith(MASTER_READY), f"the master printed {line!r}"
        self.host, self.address = host, f"{host.address}:{port}"
        self.starts += 1
        record = json.loads(self.address_file.read_text())
        assert (record["host"], record["port"], record["pid"]) == (host.address, port, self.master.pid), record
        if self.probe is None:
            self.probe = host.popen([sys.executable, str(self.tmp / "probe.py"), self.address],
                                    stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=self.env)
            assert json.loads(read_line(self.probe, DEADLINE)) == {"ready": True}

    def kill_master(self) -> None:
        """SIGKILL, as the OOM killer or a failing node does: the address file stays behind."""
        self.master.kill()
        self.master.wait(DEADLINE)

    def drop_probe(self) -> None:
        """The probe follows a master restarted at the same address (it rides
        through); one restarted elsewhere needs a new probe."""
        self.probe.kill()
        self.probe.wait(DEADLINE)
        self.probe = None

    def add_workers(self, host, n: int, master: str | None = None):
        """Workers on ``host`` that find the master through the address file
        (``slurm:NAME``), or at ``master`` (HOST:PORT) when given."""
        return host.popen([sys.executable, "-m", "cw.worker", master or f"slurm:{CLUSTER}", "-n", str(n),
                           "--connect-timeout", str(DEADLINE), "--log-level", "WARNING"], env=self.env)

    def start_client(self, host, seconds: float, address: str | None = None) -> Client:
        """The user's script with reconnect_timeout=60, at ``address`` (the
        master's now, by default; ``file:PATH`` follows the address file)."""
        address = self.address if address is None else address
        proc = host.popen([sys.executable, str(self.tmp / "client.py"), address, str(self.runs), str(seconds),
                           "reconnect"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=self.env)
        return Client(proc)

    def wait_for_runs(self, n: int) -> None:
        deadline = time.monotonic() + DEADLINE
        while len(self.run_markers()) < n:
            assert time.monotonic() < deadline, f"fewer than {n} jobs started within {DEADLINE} s"
            time.sleep(0.01)


def test_master_killed_and_restarted_in_place(network, tmp_path):  # noqa: F811
    """The master killed with SIGKILL mid-batch and started again on its host
    and port: the workers (which follow the address file) and the client
    (reconnect_timeout=60) come back to it, the client resubmits what it has
    no result for, and every job's result arrives exactly once."""
    m, w1, w2, c = (network.add_host(n) for n in ("m", "w1", "w2", "c"))
    cluster = RestartableCluster(tmp_path)
    cluster.start_master(m)
    cluster.add_workers(w1, 2)
    cluster.add_workers(w2, 2)
    cluster.wait_status(lambda s: cluster.workers_on(s) == {"w1": 2, "w2": 2}, "2 workers on each of w1, w2")
    client = cluster.start_client(c, seconds=0.5)

    client.submit(range(16))
    cluster.wait_for_runs(4)      # some jobs run, some wait in the master's queue
    started = time.monotonic()
    before = len(cluster.run_markers())
    cluster.kill_master()
    cluster.start_master(m)
    cluster.wait_status(lambda s: cluster.workers_on(s) == {"w1": 2, "w2": 2}, "the workers to come back")
    back = time.monotonic() - started
    lines = client.results()
    done = time.monotonic() - started
    runs = cluster.run_markers()
    check_results(lines, range(16), runs)
    # Jobs never started before the kill died with the master's queue: only
    # the client's resubmission can have brought their results.
    assert before < 16, "every job had started before the kill: the restart tested nothing"
    client.finish()
    reruns = sum(len(r) - 1 for r in runs.values())
    print(f"\nmaster restarted in place: workers back {back:.1f} s after the kill, last result after "
          f"{done:.1f} s; {reruns} runs repeated")


def test_workers_follow_the_address_file_to_a_master_on_another_host(network, tmp_path):  # noqa: F811
    """The master killed with SIGKILL and started on another host, which
    rewrites the address file: the workers, pointed at the cluster's name,
    find it there within a few peer timeouts (not after their whole connect
    timeout), and run a new client's jobs exactly once."""
    m1, m2, w1, c = (network.add_host(n) for n in ("m1", "m2", "w1", "c"))
    cluster = RestartableCluster(tmp_path)
    cluster.start_master(m1)
    cluster.add_workers(w1, 2)
    cluster.wait_status(lambda s: cluster.workers_on(s) == {"w1": 2}, "2 workers on w1")

    started = time.monotonic()
    cluster.drop_probe()
    cluster.kill_master()
    cluster.start_master(m2)
    cluster.wait_status(lambda s: cluster.workers_on(s) == {"w1": 2}, "w1's workers at the master on m2",
                        timeout=5 * PEER_TIMEOUT)
    print(f"\nworkers found the master on m2 {time.monotonic() - started:.1f} s after the kill")
    client = cluster.start_client(c, seconds=0.1)
    client.submit(range(8))
    lines = client.results()
    runs = cluster.run_markers()
    check_results(lines, range(8), runs)
    assert all(len(r) == 1 for r in runs.values()), runs
    client.finish()


def test_client_follows_the_address_file_to_a_master_on_another_host(network, tmp_path):  # noqa: F811
    """A client given ``file:PATH`` (the address file the master publishes)
    rides through the master's SIGKILL and its restart on another host,
    resubmits there, and gets every result exactly once.  (The workers are
    pointed at each master's address, so that only the client's discovery
    is tested.)"""
    m1, m2, w1, w2, c = (network.add_host(n) for n in ("m1", "m2", "w1", "w2", "c"))
    cluster = RestartableCluster(tmp_path)
    cluster.start_master(m1)
    cluster.add_workers(w1, 2, master=cluster.address)
    cluster.wait_status(lambda s: cluster.workers_on(s) == {"w1": 2}, "2 workers on w1")
    client = cluster.start_client(c, seconds=0.5, address=f"file:{cluster.address_file}")

    client.submit(range(8))
    cluster.wait_for_runs(2)
    cluster.drop_probe()
    cluster.kill_master()
    m1.cut()                      # the old master's node is gone, with its workers
    cluster.start_master(m2)
    cluster.add_workers(w2, 2, master=cluster.address)
    lines = client.results()
    check_results(lines, range(8), cluster.run_markers())
    client.finish()


# The callback API's user: a ClientThread whose callback prints each result.
# argv: master address, marker directory, seconds a job takes, number of jobs.
CALLBACK_CLIENT = textwrap.dedent('''
    import json
    import os
    import socket
    import sys
    import time
    import uuid

    from cw.client import ClientThread

    address, runs, seconds, n = sys.argv[1:5]
    host, port = address.rsplit(":", 1)

    def sum_of_squares(i):
        run = f"run.{i}.{socket.gethostname()}.{os.getpid()}.{uuid.uuid4().hex}"
        open(os.path.join(runs, run), "x").close()
        time.sleep(float(seconds))
        return sum(k * k for k in range(i)), run

    def callback(jobid, result):
        value, run = result
        print(json.dumps({"i": jobid, "value": value, "run": run}), flush=True)

    client = ClientThread(callback, host, int(port), reconnect_timeout=60)
    client.start()
    print(json.dumps({"ready": True}), flush=True)
    sys.stdin.readline()          # the test says when to submit
    for i in range(int(n)):
        client.submit(i, lambda i: sum_of_squares(i), i)
    try:
        client.wait()
    except Exception as exc:
        print(json.dumps({"i": -1, "error": type(exc).__name__, "message": str(exc)}), flush=True)
    print(json.dumps({"batch": 1}), flush=True)
    client.stop()
''')


def test_master_host_cut_beyond_peer_timeout_with_a_client_thread(network, tmp_path):  # noqa: F811
    """The master's host cut off for longer than the peer timeout while a
    ClientThread (callback API, reconnect_timeout=60) waits on its jobs: it
    rides through as the executor does, and each callback runs exactly once
    with the serial answer."""
    m, w1, c = (network.add_host(n) for n in ("m", "w1", "c"))
    cluster = RestartableCluster(tmp_path)
    cluster.start_master(m)
    cluster.add_workers(w1, 2)
    cluster.wait_status(lambda s: cluster.workers_on(s) == {"w1": 2}, "2 workers on w1")
    (tmp_path / "callback.py").write_text(CALLBACK_CLIENT)
    proc = c.popen([sys.executable, str(tmp_path / "callback.py"), cluster.address, str(cluster.runs), "0.5",
                    "8"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=cluster.env)
    client = Client(proc)
    client.submit([])             # any line: submit now

    cluster.wait_for_runs(1)
    m.cut()
    started = time.monotonic()
    before = len(cluster.run_markers())
    cluster.wait_status(lambda s: not s["workers"], "the master to drop the workers")
    # The peers count the master lost on their own clocks: the cut outlasts their timeout too.
    time.sleep(max(0.0, started + PEER_TIMEOUT * 1.5 - time.monotonic()))
    m.heal()
    lines = client.results()
    print(f"\nmaster cut with a ClientThread: {time.monotonic() - started:.1f} s from the cut to the last "
          "callback")
    check_results(lines, range(8), cluster.run_markers())
    assert all(line["value"] == serial(line["i"]) for line in lines)
    assert before < 8, "every job had started before the cut: the ride-through tested nothing"
    client.finish()
