"""Unauthenticated connections are bounded (issue 17).

Tried with the master's descriptor limit at 512: 1,500 idle connections
that never sent a byte made a real client fail, and the master logged
nothing.  Here the master runs under ``prlimit --nofile=256`` while a flood
of idle and half-open connections (half a frame header, then nothing)
comes from another loopback address, and a real client keeps running jobs
and asking for the status."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading

import pytest

from cw.launch.local import READY_PREFIX, LocalCluster, read_line
from cw.master.admission import Admission
from cw.wire.address import parse_address

sys.path.insert(0, os.path.dirname(__file__))
import jobs  # noqa: E402
from conftest import wait_until  # noqa: E402

LIMIT = 256
FLOOD_SOURCE = "127.0.0.2"      # all of 127/8 is loopback: the flood has an address of its own


@pytest.fixture
def limited_master(tmp_path):
    """A master started under prlimit (by its own pid: prlimit execs it) with LIMIT descriptors."""
    log = open(tmp_path / "master.log", "w+")
    proc = subprocess.Popen(["prlimit", f"--nofile={LIMIT}:{LIMIT}", sys.executable, "-m", "cw.master", "--port",
                             "0", "--log-level", "INFO", "--handshake-timeout", "60"],
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=log, text=True)
    line = read_line(proc, 30)
    assert line.startswith(READY_PREFIX), line
    address = parse_address(line[len(READY_PREFIX):].strip())
    cluster = LocalCluster(proc, address.host, address.port)
    cluster.log = lambda: (tmp_path / "master.log").read_text()
    yield cluster
    cluster.stop()
    log.close()


def _flood(host: str, port: int, count: int, sockets: list) -> None:
    for i in range(count):
        s = socket.socket()
        s.bind((FLOOD_SOURCE, 0))
        try:
            s.connect((host, port))
            if i % 2:
                s.send(b"\x00\x00")        # half a frame header, then silence
        except OSError:
            s.close()
            continue
        sockets.append(s)


def test_a_flood_of_strangers_does_not_starve_a_real_client(limited_master):
    cluster = limited_master
    cluster.add_workers(1)
    cluster.wait_for_workers(1)
    held: list[socket.socket] = []
    try:
        _flood(cluster.host, cluster.port, 3 * LIMIT, held)        # more than every descriptor it has
        more = threading.Thread(target=_flood, args=(cluster.host, cluster.port, 2 * LIMIT, held))
        more.start()                                                 # and more while the client works
        with cluster.executor(connect_timeout=30) as ex:
            assert list(ex.map(jobs.square, range(50))) == [x * x for x in range(50)]
            status = ex.status()
            assert status["master"]["unauthenticated"] <= LIMIT // 4
        more.join()
        proc = subprocess.run([sys.executable, "-m", "cw.status", cluster.address, "--json", "--timeout", "30"],
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
        assert len(json.loads(proc.stdout)["workers"]) == 1
        wait_until(lambda: "closing unauthenticated connections" in cluster.log(), what="the master's log line")
    finally:
        for s in held:
            s.close()


class _Conn:
    def __init__(self, name):
        self.name = name
        self.evicted = None

    def evict(self, reason):
        self.evicted = reason


def test_past_the_caps_the_busiest_address_loses_its_oldest():
    gate = Admission(total=4, per_source=3)
    lone = _Conn("lone")
    gate.admit(lone, "10.0.0.9")
    flood = [_Conn(f"f{i}") for i in range(5)]
    for conn in flood:
        gate.admit(conn, "10.0.0.1")
    assert [c.name for c in flood if c.evicted] == ["f0", "f1"]      # per address: at most 3
    assert lone.evicted is None
    other = _Conn("other")
    gate.admit(other, "10.0.0.2")                                    # total 5 > 4: the flood pays
    assert flood[2].evicted and lone.evicted is None and other.evicted is None
    assert len(gate) == 4
    gate.done(lone)
    gate.done(lone)                                                  # idempotent
    assert len(gate) == 3


def test_running_out_of_descriptors_is_logged_once_a_minute_with_the_numbers(caplog):
    import asyncio
    import errno

    from cw.master.admission import Listener

    class Starved(socket.socket):
        def accept(self):
            raise OSError(errno.EMFILE, "Too many open files")

    async def starve():
        sock = Starved(socket.AF_INET, socket.SOCK_STREAM)
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        listener = Listener(sock, lambda *a: None, lambda: "3 connections open")
        for _ in range(5):
            listener._ready()
            listener._resume()
        listener.close()

    with caplog.at_level("ERROR", logger="cw.master"):
        asyncio.run(starve())
    lines = [r.getMessage() for r in caplog.records if "cannot accept" in r.getMessage()]
    assert len(lines) == 1, lines
    assert "EMFILE" in lines[0] and "3 connections open" in lines[0] and "descriptor limit" in lines[0]
