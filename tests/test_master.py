"""The master and worker programs: readiness, signals, hostile peers, reconnects."""
from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys

import jobs
import pytest

from cw.launch.local import start_master
from cw.wire import frames, handshake
from cw.wire.auth import load_secret
from cw.wire.decoder import FrameDecoder
from cw.wire.frames import Frame


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def raw_connect(cluster) -> tuple[socket.socket, FrameDecoder, bytes]:
    """A TCP connection that has read the master's challenge and nothing more."""
    sock = socket.create_connection((cluster.host, cluster.port), timeout=10)
    decoder = FrameDecoder(frames.PREAUTH_MAX_FRAME)
    ftype, body = read_frame(sock, decoder)
    assert ftype == Frame.CHALLENGE
    return sock, decoder, body


def read_frame(sock, decoder):
    while True:
        item = decoder.next_frame()
        if item is not None:
            return item
        data = sock.recv(65536)
        if not data:
            return None
        decoder.feed(data)


def assert_dropped(sock, decoder, reason_pattern):
    """The master answers with an ERROR frame saying why, then closes."""
    item = read_frame(sock, decoder)
    assert item is not None and item[0] == Frame.ERROR
    assert re.search(reason_pattern, item[1].decode())
    assert read_frame(sock, decoder) is None
    sock.close()


@pytest.fixture
def logged_master(tmp_path):
    log = open(tmp_path / "master.log", "w+")
    cluster = start_master(port=0, args=["--handshake-timeout", "0.5"], stderr=log)
    cluster.log = lambda: (tmp_path / "master.log").read_text()
    yield cluster
    cluster.stop()
    log.close()


def still_serves(cluster):
    with cluster.executor() as ex:
        return ex.status()["workers"] == []


def test_readiness_line_and_clean_exit_on_signals(tmp_path):
    for sig in (signal.SIGTERM, signal.SIGINT):
        proc = subprocess.Popen([sys.executable, "-m", "cw.master", "--port", "0"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        line = proc.stdout.readline()
        assert re.fullmatch(r"cw master listening on 127\.0\.0\.1:\d+\n", line)
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=30)
        assert proc.returncode == 0, err
        assert out == ""  # exactly one line on stdout


def test_binding_beyond_loopback_warns(tmp_path):
    proc = subprocess.Popen([sys.executable, "-m", "cw.master", "--port", "0", "--bind", "0.0.0.0"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout.readline().startswith("cw master listening on 0.0.0.0:")
    proc.terminate()
    _, err = proc.communicate(timeout=30)
    assert "can run code" in err


def test_port_in_use_is_a_clear_error(master):
    proc = subprocess.run([sys.executable, "-m", "cw.master", "--port", str(master.port)],
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 1
    assert f"cannot listen on 127.0.0.1 port {master.port}: the port is in use" in proc.stderr
    assert "--port" in proc.stderr


def test_importing_the_master_does_not_load_pickle_machinery():
    code = "import sys, cw.master.server; print('cloudpickle' in sys.modules, 'cw.wire.payload' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]


def test_random_bytes_are_dropped_with_a_log_line(logged_master):
    sock, decoder, _ = raw_connect(logged_master)
    sock.sendall(os.urandom(2000))
    item = read_frame(sock, decoder)
    assert item is None or item[0] == Frame.ERROR
    assert still_serves(logged_master)
    assert "dropping peer" in logged_master.log()


def test_oversized_length_prefix_is_refused_before_allocating(logged_master):
    sock, decoder, _ = raw_connect(logged_master)
    sock.sendall(frames.HEADER.pack(2**31, Frame.RESPONSE))
    assert_dropped(sock, decoder, "exceeds the limit")
    assert still_serves(logged_master)


def test_silent_peer_is_dropped_after_the_handshake_timeout(logged_master):
    sock, decoder, _ = raw_connect(logged_master)
    assert_dropped(sock, decoder, "no handshake")


def test_replayed_handshake_is_refused(logged_master):
    secret = load_secret()
    sock, decoder, challenge = raw_connect(logged_master)
    nonce, response = handshake.peer_response(secret, Frame.CHALLENGE, challenge)
    sock.sendall(response)
    ftype, body = read_frame(sock, decoder)
    handshake.verify_proof(secret, challenge, nonce, ftype, body)  # the genuine exchange works
    sock.close()
    replay, replay_decoder, _ = raw_connect(logged_master)
    replay.sendall(response)
    assert_dropped(replay, replay_decoder, "does not match our secret")


def test_a_worker_waits_for_its_master_and_reconnects_after_a_restart():
    port = free_port()
    worker = subprocess.Popen([sys.executable, "-m", "cw.worker", f"127.0.0.1:{port}", "--log-level", "ERROR"])
    try:
        first = start_master(port=port)
        try:
            first.wait_for_workers(1)
            with first.executor() as ex:
                assert ex.submit(jobs.identity, "first").result(timeout=30) == "first"
        finally:
            first.stop()
        second = start_master(port=port)
        try:
            second.wait_for_workers(1)
            with second.executor() as ex:
                assert ex.submit(jobs.identity, "second").result(timeout=30) == "second"
        finally:
            second.stop()
    finally:
        worker.terminate()
        worker.wait(30)


def test_a_worker_gives_up_when_no_master_appears():
    proc = subprocess.run([sys.executable, "-m", "cw.worker", f"127.0.0.1:{free_port()}", "-n", "2",
                           "--connect-timeout", "0.5"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 3
    assert "cannot reach a cw master" in proc.stderr


def test_the_supervisor_stops_its_workers_on_sigterm(master):
    supervisor = master.add_workers(2)
    master.wait_for_workers(2)
    with master.executor() as ex:
        pids = {w["pid"] for w in ex.status()["workers"]}
    supervisor.terminate()
    assert supervisor.wait(30) == 0
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
