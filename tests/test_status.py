"""``python -m cw.status``: the formatting on hand-written dicts, then the program
against a real master (two workers), an absent master, and ``--watch``."""
from __future__ import annotations

import json
import os
import queue
import re
import select
import signal
import socket
import subprocess
import sys
import threading

import pytest

from cw.ops.status import CLEAR_SCREEN, _parse_args, format_bytes, format_duration, format_resources, format_status

HANG = 60  # seconds: only ever reached when something hangs

FULL = {
    "master": {"host": "head01", "pid": 4242, "uptime_s": 7385.2, "rss_bytes": 48 * 2**20, "version": "0.4.0",
               "event_loop": "uvloop"},
    "workers": [
        {"id": 1, "host": "node07", "pid": 31337, "node": "node07", "resources": {"cpu": 2, "mem": 8 << 30, "gpu": 1},
         "state": "busy", "current": [101, 102], "held": 1, "jobs_done": 1234, "failures": 2, "connected_s": 3600.0},
        {"id": 12, "host": "node08.cluster", "pid": 7, "node": "node08", "resources": {"cpu": 16, "mem": 3 << 29},
         "state": "idle", "current": [], "held": 0, "jobs_done": 5, "failures": 0, "connected_s": 12.5},
        {"id": 13, "host": "node09", "pid": 8, "node": "node09", "resources": {}, "state": "draining",
         "current": [1, 2, 3, 4, 5], "held": 0, "jobs_done": 0, "failures": 0, "connected_s": 200000},
    ],
    "clients": [
        {"id": 3, "host": "laptop", "pid": 999, "submitted": 5000, "done": 4000, "failed": 3,
         "queued": 990, "running": 7, "paused": False, "weight": 1.5},
        {"id": 4, "host": "ws", "pid": 1000, "submitted": 10, "done": 10, "failed": 0,
         "queued": 0, "running": 0, "paused": True, "weight": 1.0},
    ],
    "queues": [{"client": 3, "priority": 0, "queued": 900}, {"client": 3, "priority": 5, "queued": 90}],
    "limits": {"db": {"limit": 5, "running": 2}},
    "waiting": [{"client": 3, "count": 40, "reason": "limit db reached", "since_s": 75.0}],
    "queued": 990, "running": 7,
    "throughput": {"window_s": 60, "jobs": 740, "per_s": 12.3333},
    "uptime_s": 7385.2,
}

# What masters sent before the schema grew (Dispatcher.status() at the time).
OLD = {
    "workers": [{"id": 1, "host": "vm", "pid": 501, "state": "idle", "held": 0, "jobs_done": 3, "connected_s": 4.5},
                {"id": 2, "host": "vm", "pid": 502, "state": "busy", "held": 1, "jobs_done": 9, "connected_s": 4.4}],
    "clients": [{"id": 7, "host": "vm", "pid": 600, "submitted": 12, "done": 10, "paused": False,
                 "queued": 1, "running": 1}],
    "queued": 1, "running": 1, "uptime_s": 65.0,
}


def section(text: str, title: str) -> list[str]:
    """The lines of one table: from its title to the next blank line."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(title))
    end = next((i for i in range(start, len(lines)) if not lines[i].strip()), len(lines))
    return lines[start + 1:end]


# --- formatting, no sockets ---------------------------------------------------------

def test_full_schema_shows_the_key_figures():
    text = format_status(FULL)
    header = text.splitlines()[0]
    for part in ("head01", "4242", "0.4.0", "up 2h03m", "48 MiB", "uvloop loop", "12.3 jobs/s over the last 60 s",
                 "990 queued", "7 running"):
        assert part in header
    for part in ("31337", "node08.cluster", "cpu=2 mem=8G gpu=1", "cpu=16 mem=1.5G", "101,102", "1,2,3+2",
                 "draining", "1234", "laptop", "5000", "limit db reached", "1m15s"):
        assert part in text
    assert [line.split()[:3] for line in section(text, "QUEUES")[1:]] == [["3", "5", "90"], ["3", "0", "900"]]
    assert section(text, "LIMITS")[1].split() == ["db", "2", "5"]
    paused = {line.split()[0]: line.split()[-2] for line in section(text, "CLIENTS")[1:]}
    assert paused == {"3": "no", "4": "yes"}


def test_columns_are_aligned():
    table = section(format_status(FULL), "WORKERS")[:4]
    # numbers are right-aligned: every PID ends where the title PID ends
    end = table[0].index("PID") + len("PID")
    assert [line[end - 5:end].strip() for line in table[1:]] == ["31337", "7", "8"]
    # text is left-aligned: every STATE starts where the title STATE starts
    start = table[0].index("STATE")
    assert [line[start:].split()[0] for line in table[1:]] == ["busy", "idle", "draining"]


def test_old_minimal_schema():
    text = format_status(OLD, address="10.0.0.1:5494")
    assert text.splitlines()[0] == "cw master 10.0.0.1:5494, up 1m05s; 1 queued, 1 running"
    for part in ("501", "502", "600", "busy", "idle"):
        assert part in text
    # keys this master did not send are left out, not shown empty
    for absent in ("RESOURCES", "FAILURES", "FAILED", "WEIGHT", "QUEUES", "LIMITS", "WAITING", "MiB", "jobs/s"):
        assert absent not in text


def test_an_empty_cluster_says_so():
    text = format_status({"workers": [], "clients": [], "queues": [], "limits": {}, "waiting": [],
                          "queued": 0, "running": 0, "uptime_s": 1.0})
    for line in ("WORKERS: no workers connected", "CLIENTS: no clients connected", "QUEUES: no jobs queued",
                 "LIMITS: none set", "WAITING: no job is held back"):
        assert line in text.splitlines()
    assert "ID" not in text


@pytest.mark.parametrize("status", [
    {},
    {"workers": None, "clients": "?", "queues": [None, 3], "limits": {"db": 4}, "waiting": {}},
    {"master": None, "throughput": {"jobs": 30, "window_s": 60}, "uptime_s": "soon"},
    {"workers": [{"id": None, "resources": {"cpu": None, "mem": "lots"}, "current": 5, "connected_s": -1}]},
])
def test_odd_dicts_do_not_crash(status):
    assert format_status(status).startswith("cw master")


def test_small_formatters():
    assert [format_duration(s) for s in (3.25, 42, 307, 7385, 273600)] == ["3.2s", "42s", "5m07s", "2h03m", "3d04h"]
    assert [format_bytes(n) for n in (512, 2048, 3 << 29, 8 << 30)] == ["512B", "2K", "1.5G", "8G"]
    resources = {"cpu": 0.5, "scratch_bytes": 1 << 40, "fpga": "xilinx"}
    assert format_resources(resources) == "cpu=0.5 scratch_bytes=1T fpga=xilinx"
    assert format_status({"throughput": {"jobs": 30, "window_s": 60}}).endswith("0.5 jobs/s over the last 60 s")


def test_watch_takes_an_address_that_argparse_gave_it():
    assert (_parse_args(["--watch"]).watch, _parse_args(["--watch"]).address) == (2.0, None)
    args = _parse_args(["--watch", "head01:7000"])
    assert (args.watch, args.address) == (2.0, "head01:7000")
    args = _parse_args(["--watch", "0.5", "head01"])
    assert (args.watch, args.address) == (0.5, "head01")
    with pytest.raises(SystemExit):
        _parse_args(["--watch", "0"])


# --- the program against real processes ---------------------------------------------------

def run_status(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cw.status", *args], capture_output=True, text=True,
                          timeout=HANG, stdin=subprocess.DEVNULL)


def worker_pids(cluster) -> list[int]:
    with cluster.executor() as ex:
        return sorted(w["pid"] for w in ex.status()["workers"])


def test_json_from_a_real_master(cluster):
    proc = run_status(cluster.address, "--json")
    assert proc.returncode == 0, proc.stderr
    status = json.loads(proc.stdout)  # the whole of stdout is one JSON object
    assert len(status["workers"]) == 2
    assert all(isinstance(w["host"], str) and isinstance(w["pid"], int) for w in status["workers"])
    assert isinstance(status["clients"], list) and len(status["clients"]) >= 1  # cw.status itself
    assert isinstance(status["queued"], int)


def test_human_output_names_the_workers_and_clients(cluster):
    with cluster.executor():   # a second client, which the report must list
        proc = run_status(cluster.host, "--port", str(cluster.port))
    assert proc.returncode == 0, proc.stderr
    print(proc.stdout)  # the sample in `pytest -s` output
    workers = "\n".join(section(proc.stdout, "WORKERS"))
    for pid in worker_pids(cluster):
        assert re.search(rf"\b{pid}\b", workers)
    assert re.search(rf"\b{os.getpid()}\b", "\n".join(section(proc.stdout, "CLIENTS")))
    assert "\x1b" not in proc.stdout


def unused_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("json_flag", [[], ["--json"]])
def test_no_master_is_one_line_and_exit_1(json_flag):
    port = unused_port()
    proc = run_status(f"127.0.0.1:{port}", "--timeout", "0.5", *json_flag)
    assert proc.returncode == 1
    assert proc.stdout == ""
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    assert f"127.0.0.1:{port}" in lines[0] and "python -m cw.master" in lines[0] and "HOST:PORT" in lines[0]


def test_no_master_found_from_the_environment_says_where_it_looked():
    port = unused_port()
    env = dict(os.environ, CW_MASTER=f"127.0.0.1:{port}")
    proc = subprocess.run([sys.executable, "-m", "cw.status", "--timeout", "0.5"], capture_output=True,
                          text=True, timeout=HANG, stdin=subprocess.DEVNULL, env=env)
    assert proc.returncode == 1
    assert f"127.0.0.1:{port}" in proc.stderr and "$CW_MASTER" in proc.stderr
    assert len(proc.stderr.splitlines()) == 1 and "Traceback" not in proc.stderr


def read_lines(stream, into: queue.Queue) -> None:
    for line in stream:
        into.put(line)
    into.put(None)


@pytest.mark.parametrize("json_flag", [[], ["--json"]])
def test_watch_prints_reports_until_ctrl_c(cluster, json_flag):
    proc = subprocess.Popen([sys.executable, "-m", "cw.status", cluster.address, "--watch", "0.2", *json_flag],
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=read_lines, args=(proc.stdout, lines), daemon=True).start()
    seen = []
    try:
        is_report = (lambda line: line.startswith("{")) if json_flag else (lambda line: line.startswith("cw master"))
        while sum(map(is_report, seen)) < 2:
            line = lines.get(timeout=HANG)
            assert line is not None, f"cw.status exited early: {proc.wait(HANG)} {proc.stderr.read()}"
            seen.append(line)
        proc.send_signal(signal.SIGINT)  # Ctrl-C, to exactly this process
        assert proc.wait(HANG) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(HANG)
    stderr = proc.stderr.read()
    proc.stdout.close()
    proc.stderr.close()
    assert "Traceback" not in stderr, stderr
    assert not any("\x1b" in line for line in seen)  # stdout is a pipe: no screen clearing
    if json_flag:
        reports = [json.loads(line) for line in seen]
        assert all(len(r["workers"]) == 2 for r in reports)
    else:
        second = next(i for i, line in enumerate(seen) if i > 0 and line.startswith("cw master"))
        assert seen[second - 1] == "\n"  # reports are separated by a blank line


def test_watch_on_a_terminal_clears_the_screen(cluster):
    pty = pytest.importorskip("pty")
    parent, child = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "cw.status", cluster.address, "--watch", "0.2"],
                            stdin=subprocess.DEVNULL, stdout=child, stderr=subprocess.PIPE)
    os.close(child)
    output = b""
    try:
        while output.count(CLEAR_SCREEN.encode()) < 2:
            assert select.select([parent], [], [], HANG)[0], f"no report within {HANG} s: {output!r}"
            chunk = os.read(parent, 65536)
            assert chunk, f"cw.status exited early: {output!r}"
            output += chunk
        proc.send_signal(signal.SIGINT)
        assert proc.wait(HANG) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(HANG)
        os.close(parent)
        stderr = proc.stderr.read()
        proc.stderr.close()
    assert b"Traceback" not in stderr, stderr
    assert output.startswith(CLEAR_SCREEN.encode() + b"cw master")
    assert b"Ctrl-C to stop" in output
