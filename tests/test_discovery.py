"""Finding the master: the address file (cw.wire.address) and resolve_master's order.

Real files throughout.  Where SLURM's answers matter, a stand-in ``squeue``
on PATH answers from files the test writes (a job's state, the queue), so
the stale-file and order rules are checked without a SLURM controller;
tests/test_slurm.py runs the same code against a real one.
"""
from __future__ import annotations

import json
import logging
import os
import time

import pytest

from cw.client import ENV_MASTER, resolve_master
from cw.client.discovery import SlurmError, address_file, master_address, read_address
from cw.launch.local import start_master
from cw.wire.address import (
    AddressFileError,
    AddressRecord,
    parse_address,
    read_address_file,
    remove_address_file,
    write_address_file,
)

FAKE_SQUEUE = """#!/bin/sh
# Stands in for SLURM's squeue: `-j ID` prints the state in state-ID, else the queue file.
dir="$(dirname "$0")"
job=""
while [ $# -gt 0 ]; do
    [ "$1" = "-j" ] && job="$2"
    shift
done
if [ -n "$job" ]; then
    [ -f "$dir/state-$job" ] && cat "$dir/state-$job"
else
    [ -f "$dir/queue" ] && cat "$dir/queue"
fi
exit 0
"""


@pytest.fixture
def fake_slurm(tmp_path, monkeypatch):
    """A directory first on PATH whose squeue and sbatch answer from files in it."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "squeue").write_text(FAKE_SQUEUE)
    (bin_dir / "sbatch").write_text("#!/bin/sh\nexit 1\n")
    for tool in ("squeue", "sbatch"):
        (bin_dir / tool).chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    return bin_dir


@pytest.fixture(autouse=True)
def clean_env(tmp_path, monkeypatch):
    monkeypatch.setenv("CW_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.delenv(ENV_MASTER, raising=False)
    monkeypatch.delenv("CW_CLUSTER", raising=False)


# --- the address file ---------------------------------------------------------------

def test_address_file_round_trip(tmp_path):
    path = tmp_path / "clusters" / "exp" / "master"       # its directory is made
    assert read_address_file(path) is None                # no file: no master published
    write_address_file(path, "node7", 40123, job="1234")
    assert read_address_file(path) == AddressRecord("node7", 40123, os.getpid(), "1234")
    write_address_file(path, "node8", 40124)              # replaced whole
    assert read_address_file(path) == AddressRecord("node8", 40124, os.getpid(), None)
    assert os.listdir(path.parent) == ["master"]          # no temporary file left beside it


def test_only_the_master_that_wrote_the_file_removes_it(tmp_path):
    path = tmp_path / "master"
    path.write_text(json.dumps({"host": "n1", "port": 4000, "pid": os.getpid() + 1, "job": None}))
    remove_address_file(path)                             # a newer master's file: kept
    assert read_address_file(path).host == "n1"
    write_address_file(path, "n2", 4001)
    remove_address_file(path)
    assert not path.exists()
    remove_address_file(path)                             # already gone: nothing to do


@pytest.mark.parametrize("content", [
    b"",                                                  # cut short before anything was written
    b'{"host": "n1", "port": 40',                         # torn
    b"node7:4000\n",                                      # not JSON
    b"[1, 2]",
    b'{"host": "n1"}',                                    # no port
    b'{"host": "", "port": 4000}',
    b'{"host": "n1", "port": 70000}',
    b'{"host": "n1", "port": "x"}',
])
def test_a_file_that_is_no_address_record_is_refused(tmp_path, content):
    path = tmp_path / "master"
    path.write_bytes(content)
    with pytest.raises(AddressFileError, match=f"{path} is not a master's address record.*remove it"):
        read_address_file(path)


def test_a_real_master_publishes_its_address_and_removes_it_when_it_stops(tmp_path):
    path = tmp_path / "clusters" / "m" / "master"
    cluster = start_master(port=0, args=["--address-file", str(path)])
    try:
        record = read_address_file(path)
        assert (record.host, record.port, record.pid) == ("127.0.0.1", cluster.port, cluster.master.pid)
        assert record.job == os.environ.get("SLURM_JOB_ID")
    finally:
        cluster.stop()
    assert not path.exists()


@pytest.mark.parametrize(("text", "expected"), [
    (None, ("localhost", 5494)), ("node7", ("node7", 5494)), ("node7:4000", ("node7", 4000)),
    (":4000", ("localhost", 4000)), ("[::1]:4000", ("::1", 4000)), ("[fe80::1]", ("fe80::1", 5494)),
])
def test_parse_address(text, expected):
    assert parse_address(text, 5494) == expected


# --- a SLURM cluster's master ---------------------------------------------------------

def test_a_stale_address_file_of_an_ended_master_job_is_ignored(fake_slurm):
    write_address_file(address_file("exp"), "n1", 4000, job="77")
    (fake_slurm / "state-77").write_text("RUNNING\n")
    assert read_address("exp") == ("n1", 4000)
    assert master_address("exp", wait=False) == ("n1", 4000)
    (fake_slurm / "state-77").unlink()                    # the master job ended; its file stayed
    assert read_address("exp") is None
    with pytest.raises(LookupError, match="no cw cluster named 'exp'"):
        master_address("exp", wait=False)


def test_master_address_says_why_an_address_file_is_unreadable(fake_slurm):
    path = address_file("exp")
    path.parent.mkdir(parents=True)
    path.write_text('{"host": "n1", "po')
    (fake_slurm / "queue").write_text("12|cw-exp-master|PENDING||Resources\n")
    assert read_address("exp") is None
    with pytest.raises(SlurmError, match=r"job 12 of cluster 'exp' is PENDING \(Resources\).*"
                                         r"is not a master's address record"):
        master_address("exp", wait=False)


# --- resolve_master's order: the host given, $CW_MASTER, the SLURM cluster, this machine ---------

def test_resolve_master_order(fake_slurm, monkeypatch):
    monkeypatch.setenv("CW_CLUSTER", "exp")
    write_address_file(address_file("exp"), "slurm-node", 4000, job="77")
    (fake_slurm / "state-77").write_text("RUNNING\n")
    monkeypatch.setenv(ENV_MASTER, "env-host:3000")

    assert resolve_master("given:2000", 5494) == ("given", 2000)
    assert resolve_master("given", 5494) == ("given", 5494)
    assert resolve_master(None, 5494) == ("env-host", 3000)
    monkeypatch.delenv(ENV_MASTER)
    assert resolve_master(None, 5494) == ("slurm-node", 4000)
    monkeypatch.setenv("CW_CLUSTER", "other")             # that cluster published nothing
    assert resolve_master(None, 5494) == ("localhost", 5494)
    monkeypatch.setenv("CW_CLUSTER", "exp")
    (fake_slurm / "state-77").unlink()                    # its master job ended
    assert resolve_master(None, 5494) == ("localhost", 5494)


def test_resolve_master_ignores_address_files_where_slurm_is_not_installed(tmp_path, monkeypatch):
    write_address_file(address_file("default"), "slurm-node", 4000)
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))   # no squeue, no sbatch
    assert resolve_master(None, 5494) == ("localhost", 5494)


# --- layering --------------------------------------------------------------------------

def _imported_modules(path) -> set[str]:
    import ast
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
    return names


def test_the_client_never_imports_launch():
    # launch sits above the client (slurm.py start --wait uses ClusterExecutor);
    # an import back down would make the two a cycle again.
    from pathlib import Path

    import cw.client
    offenders = {f"{path.name}: {name}" for path in Path(cw.client.__file__).parent.glob("*.py")
                 for name in _imported_modules(path) if name == "cw.launch" or name.startswith("cw.launch.")}
    assert not offenders


def test_the_address_module_loads_nothing_above_the_wire():
    import subprocess
    import sys
    code = ("import sys, cw.wire.address; print(sorted(m for m in sys.modules if m.startswith("
            "('cw.client', 'cw.master', 'cw.launch', 'cw.worker', 'cloudpickle'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "[]"


# --- a cluster that starts, or whose master moved (issue 13 items 3 and 4) --------------

def test_a_file_written_before_a_requeue_names_a_node_the_job_left(fake_slurm, monkeypatch):
    monkeypatch.setenv("SLURMD_NODENAME", "node-a")       # the master job's first run
    write_address_file(address_file("exp"), "10.0.0.1", 4000, job="77")
    assert read_address_file(address_file("exp")).node == "node-a"
    (fake_slurm / "state-77").write_text("RUNNING|node-a\n")
    assert read_address("exp") == ("10.0.0.1", 4000)
    (fake_slurm / "state-77").write_text("PENDING|\n")    # node-a failed: SLURM requeued the job
    assert read_address("exp") is None
    (fake_slurm / "state-77").write_text("RUNNING|node-b\n")   # started elsewhere, no new master yet
    assert read_address("exp") is None


def test_a_client_waits_for_a_starting_master_and_says_so_once(fake_slurm, monkeypatch, caplog):
    import threading
    monkeypatch.setenv("CW_CLUSTER", "exp")
    (fake_slurm / "queue").write_text("77|cw-exp-master|PENDING||Priority\n")
    (fake_slurm / "state-77").write_text("RUNNING|node-a\n")

    def master_starts():
        # The master job publishes its address while the client waits for it.
        wait_until_logged()
        write_address_file(address_file("exp"), "node-a", 4000, job="77")
    logged = threading.Event()

    def wait_until_logged():
        assert logged.wait(30), "the client logged no line saying what it waits for"

    class Spy(logging.Handler):
        def emit(self, record):
            logged.set()
    spy = Spy()
    logging.getLogger("cw.client.discovery").addHandler(spy)
    thread = threading.Thread(target=master_starts)
    thread.start()
    try:
        with caplog.at_level(logging.INFO, logger="cw.client.discovery"):
            assert resolve_master(None, 5494, timeout=60) == ("node-a", 4000)
    finally:
        logging.getLogger("cw.client.discovery").removeHandler(spy)
        thread.join(30)
    lines = [r.getMessage() for r in caplog.records if r.name == "cw.client.discovery"]
    assert lines == ["waiting up to 60 s for the master of SLURM cluster 'exp': job 77 is PENDING (Priority)"]


def test_a_starting_master_that_never_comes_fails_with_its_job_and_state(fake_slurm, monkeypatch):
    monkeypatch.setenv("CW_CLUSTER", "exp")
    (fake_slurm / "queue").write_text("77|cw-exp-master|PENDING||Resources\n")
    with pytest.raises(SlurmError, match=r"job 77 of cluster 'exp' is PENDING \(Resources\)"):
        resolve_master(None, 5494, timeout=0.5)


def test_without_an_address_file_a_fixed_port_is_tried_on_the_job_node_after_a_short_grace(fake_slurm, monkeypatch):
    # A worker waits up to 600 s; a master job RUNNING with no file (home not
    # shared, or the file removed) must not cost it half of that.
    from cw.client import discovery
    monkeypatch.setattr(discovery, "FILE_GRACE", 0.3)
    (fake_slurm / "queue").write_text("77|cw-exp-master|RUNNING|node-a|None\n")
    started = time.monotonic()
    assert discovery.master_address("exp", port=4000, timeout=600) == ("node-a", 4000)
    assert time.monotonic() - started < 30
    with pytest.raises(SlurmError, match="job 77 of cluster 'exp' is RUNNING"):
        discovery.master_address("exp", port=0, timeout=1)    # no fixed port: nothing to try


# --- file:PATH and slurm:NAME: an address that says where to look -----------------

def test_file_address_waits_for_the_file_then_reads_it(tmp_path, caplog):
    path = tmp_path / "master"
    with caplog.at_level(logging.WARNING, logger="cw.client.discovery"), \
            pytest.raises(LookupError, match=f"within 0.2 s.*--address-file {path}"):
        resolve_master(f"file:{path}", 5494, timeout=0.2)
    assert sum(str(path) in r.getMessage() for r in caplog.records) == 1    # one line, not one per poll
    write_address_file(path, "node3", 4100)
    assert resolve_master(f"file:{path}", 5494, timeout=0.2) == ("node3", 4100)
    path.write_text("not a record")
    with pytest.raises(AddressFileError, match="not a master's address record"):
        resolve_master(f"file:{path}", 5494, timeout=5)


def test_slurm_address_reads_that_clusters_file(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))   # no squeue: the file is all there is
    write_address_file(address_file("exp"), "slurm-node", 4000)
    assert resolve_master("slurm:exp", 5494, timeout=0.2) == ("slurm-node", 4000)
    with pytest.raises(LookupError, match="no cw cluster named 'nope'"):
        resolve_master("slurm:nope", 5494, timeout=0.2)


def test_client_and_worker_started_before_the_master_find_it_through_its_address_file(tmp_path):
    """The way a cluster starts in practice: the worker and the user's script
    come up before the master has published its address (port 0: nobody
    could know it in advance); both wait for the file, then run a lambda."""
    import subprocess
    import sys
    import threading

    from cw.client import ClusterExecutor

    path = tmp_path / "master"
    worker = subprocess.Popen([sys.executable, "-m", "cw.worker", f"file:{path}", "--connect-timeout", "60",
                               "--log-level", "WARNING"])
    executors = []
    waiting = threading.Thread(target=lambda: executors.append(ClusterExecutor(f"file:{path}", connect_timeout=60)))
    waiting.start()
    cluster = None
    try:
        cluster = start_master(port=0, args=["--address-file", str(path)])
        waiting.join(60)
        assert executors, "the client did not reach the master within 60 s"
        with executors[0] as ex:
            offset = 7
            assert ex.submit(lambda x: x + offset, 35).result(timeout=60) == 42
            assert ex.status()["workers"][0]["pid"] != worker.pid      # a worker process of that supervisor
    finally:
        worker.terminate()
        worker.wait(30)
        if cluster is not None:
            cluster.stop()
        waiting.join(60)
