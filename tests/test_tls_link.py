"""The blocking Link over TLS, read and written by several threads at once.

OpenSSL forbids SSL_read and SSL_write on one SSL object from two threads
at the same time; a Link's reader and its writers therefore never share
one (cw.wire.tlsstream: an SSLObject between memory BIOs, one short lock
around every call into it, the socket I/O outside).  These tests push many
frames both ways at once through one TLS connection: a Link pair on
loopback, and a real ``--tls`` master with workers and a client whose big
arguments and results go through the sockets (not by reference)."""
from __future__ import annotations

import os
import random
import socket
import ssl
import struct
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

pytest.importorskip("cryptography")

from cw.errors import HandshakeFailed, TlsError  # noqa: E402
from cw.launch.local import start_master  # noqa: E402
from cw.wire import frames, segments, tls  # noqa: E402
from cw.wire.decoder import FrameDecoder  # noqa: E402
from cw.wire.frames import Frame  # noqa: E402
from cw.wire.link import Link  # noqa: E402
from cw.wire.tlsstream import TlsStream  # noqa: E402
from tests.conftest import wait_until  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))

NO_SEGMENTS = "from cw.wire import segments\nsegments.probe = lambda: None\n"


@pytest.mark.parametrize("options", [[], ["--socket-timeout", "30"]], ids=["blocking", "socket-timeouts"])
def test_one_tls_link_pair_carries_frames_both_ways_from_many_threads(options):
    # In a process of its own: a crash inside OpenSSL must fail this test, not end pytest.
    # With socket timeouts (SSL calls then return "want read/write"), an SSLSocket
    # shared by a reader and writers failed here nearly every time (BAD_LENGTH,
    # SSLEOFError on a write, writes stalled); blocking, as a Link's socket is, it
    # never failed in 75 rounds: then this is a guard.
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [os.getcwd(), os.environ.get("PYTHONPATH")]))}
    done = subprocess.run([sys.executable, os.path.join(HERE, "tls_hammer.py"), "--rounds", "3", *options],
                          capture_output=True, text=True, timeout=900, env=env)
    assert done.returncode == 0, f"exit status {done.returncode}: {done.stdout}{done.stderr}"
    assert done.stdout.count("ok:") == 3, done.stdout


@pytest.mark.parametrize("end", ["close_notify", "tcp"])
def test_a_tls_stream_reads_what_another_thread_writes_and_sees_the_end(end):
    client, server = _stream_pair()
    received = bytearray()
    ended = []

    def read_all():
        buf = bytearray(100_000)
        try:
            while n := server.recv_into(buf):
                received.extend(buf[:n])
            ended.append("at the end")
        except OSError as exc:
            ended.append(exc)

    reader = threading.Thread(target=read_all)
    reader.start()
    sent = os.urandom(3_000_000)
    client.sendall(memoryview(sent)[:1_000_000])
    client.sendall(sent[1_000_000:])
    if end == "close_notify":
        # close_notify never waits for the socket (a peer that stopped reading
        # must not hold up a close): it is sent once the reader has caught up.
        wait_until(lambda: len(received) == len(sent), timeout=60, what="the reader to take every byte")
        client.close_notify()                # TLS says the end; the TCP connection stays open
    else:
        client.raw.shutdown(socket.SHUT_WR)  # TCP ends without close_notify: an end all the same
    reader.join(60)
    assert ended == ["at the end"] and bytes(received) == sent
    client.close()
    server.close()


def test_a_changed_record_ends_the_stream_with_an_ssl_error():
    client, server = _stream_pair()
    path, path_far_end = socket.socketpair()  # the wire from the server to the client, through this test
    server.raw, server_raw = path, server.raw
    server.sendall(b"x" * 1000)
    record = bytearray(path_far_end.recv(65536))
    record[len(record) // 2] ^= 0x01         # as an attacker on the path would
    server_raw.sendall(record)
    with pytest.raises(ssl.SSLError) as failure:
        client.recv_into(bytearray(4096))
    assert "changed on the way" in tls.describe_error(failure.value)
    for s in (path_far_end, server_raw, client, server):
        s.close()


class _CountingSslObject:
    """Stands in for a TlsStream's SSL object and counts the reads that found no whole record."""

    def __init__(self, real):
        self.real = real
        self.found_nothing = 0

    def read(self, *args):
        try:
            return self.real.read(*args)
        except ssl.SSLWantReadError:
            self.found_nothing += 1
            raise

    def __getattr__(self, name):
        return getattr(self.real, name)


def test_a_tls_stream_asks_its_ssl_object_for_plaintext_only_when_it_holds_some():
    # An SSL object with nothing to decrypt says so with SSLWantReadError, which
    # costs more than decrypting a small record: a reader that asked before every
    # socket read and once more after every record paid two per frame.
    client, server = _stream_pair()
    counting = server._c = _CountingSslObject(server._c)     # (the C object the stream calls)
    buf = bytearray(65536)
    for i in range(50):                      # one frame at a time, each a record of its own
        frame = b"%d" % i * 100
        client.sendall(frame)
        got = server.recv_into(buf)
        assert bytes(buf[:got]) == frame
    assert counting.found_nothing == 0
    client.close()
    server.close()


def test_a_tls_stream_hands_out_a_record_in_pieces_without_waiting_for_the_socket():
    client, server = _stream_pair()
    client.sendall(b"0123456789" * 100)      # one record of 1,000 bytes
    server.settimeout(5)                     # (a read that waited for the socket would fail the test in 5 s)
    pieces = []
    buf = bytearray(100)
    while sum(map(len, pieces)) < 1000:
        n = server.recv_into(buf, 64)
        pieces.append(bytes(buf[:n]))
        assert server.pending() == 1000 - sum(map(len, pieces))   # what select() cannot see
    assert b"".join(pieces) == b"0123456789" * 100
    client.close()
    server.close()


def test_a_master_that_hangs_up_during_the_tls_handshake_is_a_handshake_failure():
    a, b = socket.socketpair()
    b.sendall(tls.BANNER)
    b.close()                                # no TLS after the banner
    files = tls.ensure_cluster_files()
    with pytest.raises((HandshakeFailed, TlsError), match="master at here"):
        tls.start_client(a, tls.client_context(files), "here")
    a.close()


def test_many_big_jobs_at_once_through_a_tls_master_and_its_workers(tmp_path, monkeypatch):
    # Every process of this cluster sends its big frames through its TLS socket,
    # as between machines (on one machine they would go by reference).
    (tmp_path / "sitecustomize.py").write_text(NO_SEGMENTS)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(tmp_path), os.getcwd(),
                                                                     os.environ.get("PYTHONPATH")]))}
    monkeypatch.setattr(segments, "probe", lambda: None)
    cluster = start_master(port=0, args=["--tls", "--heartbeat", "0.02", "--slots", "3"])
    try:
        cluster.add_workers(2, env=env)
        cluster.add_workers(1, env=env)
        cluster.wait_for_workers(3)
        with cluster.executor() as ex:
            def reversed_bytes(data):
                from cw.wire import segments
                assert segments.probe() is None, "this worker would send big frames by reference"
                return data[::-1]

            rng = random.Random(17)
            arguments = [os.urandom(rng.randint(1 << 20, 4 << 20)) for _ in range(24)]

            def submit_all(offset):    # several submitting threads: the client's writers at once
                return [(data, ex.submit(reversed_bytes, data)) for data in arguments[offset::4]]

            with ThreadPoolExecutor(4) as pool:
                submitted = [pair for batch in pool.map(submit_all, range(4)) for pair in batch]
            for data, future in submitted:
                assert future.result(timeout=300) == data[::-1]
            assert ex._link.sent_by_reference == 0 and ex._link.received_by_reference == 0
    finally:
        cluster.stop()


def _stream_pair() -> tuple[TlsStream, TlsStream]:
    files = tls.ensure_cluster_files()
    a, b = socket.socketpair()
    server = TlsStream(b, tls.server_context(files), server_side=True)
    handshake = threading.Thread(target=server.handshake)
    handshake.start()
    client = TlsStream(a, tls.client_context(files))
    client.handshake()
    handshake.join()
    return client, server


def test_a_tls_links_read_is_timed_by_the_kernel_and_a_record_in_time_comes_whole():
    # Under TLS too a read with a timeout is one system call (SO_RCVTIMEO on the
    # TCP socket), not a select() and then a read.
    client, server = _stream_pair()
    client.settimeout(None)
    link = Link(client, FrameDecoder(), "peer")
    with pytest.raises(TimeoutError, match="nothing heard from the master at peer for 0.05 s"):
        link.recv(0.05)
    seconds, micros = struct.unpack("@ll", client.raw.getsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, 16))
    assert seconds == 0 and 40_000 <= micros <= 60_000      # (the kernel rounds it to its ticks)
    server.sendall(frames.frame(Frame.PING))
    assert link.recv(30.0) == (Frame.PING, b"")
    link.close()
    server.close()
