"""Two blocking Links over one TLS connection on loopback, each hammering it
both ways at once: several threads send frames (small ones, and big ones of
1-4 MB that go out uncopied), some directly and some through the link's
writer thread, a PING thread squeezes tiny frames in (try_send), and one
reader per side checks every frame (digest, each sender's order) while it
answers PINGs as a worker does.  Run by tests/test_tls_link.py in a process
of its own, so that a crash inside OpenSSL shows as an exit status there.

    python tests/tls_hammer.py [--writers N] [--frames N] [--big-every N] [--rounds N]
                               [--socket-timeout S] [--tickets N]

Prints one line per round; exits 0 when every frame arrived intact.
"""
from __future__ import annotations

import argparse
import hashlib
import os
import random
import socket
import struct
import sys
import threading
import time

from cw.wire import tls
from cw.wire.decoder import FrameDecoder
from cw.wire.frames import HEADER, Frame
from cw.wire.link import Link
from cw.wire.tlsstream import TlsStream

DATA = Frame.OUTPUT            # any kind the link passes on as it is
FIELDS = struct.Struct("!HIQ16s")   # sender, its sequence number, payload size, payload digest
POOL = os.urandom(5 * 1024 * 1024)


def tls_link_pair(socket_timeout: float | None = None, tickets: int = 0) -> tuple[Link, Link]:
    """A client Link (through tls.start_client, as a worker connects) and a server Link on loopback.
    ``socket_timeout``: both sockets get one (a Link's has none); ``tickets``: session
    tickets the server sends after the handshake (a cw master sends none)."""
    files = tls.ensure_cluster_files()
    server_context, client_context = tls.server_context(files), tls.client_context(files)
    server_context.num_tickets = tickets
    with socket.create_server(("127.0.0.1", 0)) as listener:
        client_sock = socket.create_connection(listener.getsockname())
        server_sock, _ = listener.accept()
    for s in (client_sock, server_sock):
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    served = {}

    def serve():
        server_sock.sendall(tls.BANNER)
        stream = TlsStream(server_sock, server_context, server_side=True)
        stream.handshake()
        served["stream"] = stream

    thread = threading.Thread(target=serve)
    thread.start()
    client = tls.start_client(client_sock, client_context, "hammer")
    thread.join()
    client.settimeout(socket_timeout)
    served["stream"].settimeout(socket_timeout)
    return Link(client, FrameDecoder(), "server"), Link(served["stream"], FrameDecoder(), "client")


def data_frame(sender: int, seq: int, rng: random.Random, big_every: int) -> tuple:
    size = rng.randint(1 << 20, 4 << 20) if seq % big_every == big_every - 1 else rng.randint(0, 3000)
    start = rng.randint(0, len(POOL) - size)
    payload = memoryview(POOL)[start:start + size]
    fields = FIELDS.pack(sender, seq, size, hashlib.blake2b(payload, digest_size=16).digest())
    return HEADER.pack(len(fields) + size, DATA) + fields, payload


class Side:
    """One end: its senders, its PING thread and its reader."""

    def __init__(self, name: str, link: Link, writers: int, frames: int, big_every: int):
        self.name, self.link = name, link
        self.writers, self.frames, self.big_every = writers, frames, big_every
        self.errors: list[str] = []
        self.received = 0
        self.pings = 0
        self.done = threading.Event()
        link.start_writer()

    def start(self, expected: int) -> list[threading.Thread]:
        threads = [threading.Thread(target=self._guard, args=(self._send, w), daemon=True)
                   for w in range(self.writers)]
        threads.append(threading.Thread(target=self._guard, args=(self._ping,), daemon=True))
        threads.append(threading.Thread(target=self._guard, args=(self._read, expected), daemon=True))
        for t in threads:
            t.start()
        return threads

    def _guard(self, work, *args) -> None:
        try:
            work(*args)
        except BaseException as exc:
            self.errors.append(f"{self.name} {work.__name__}: {type(exc).__name__}: {exc}")
            self.done.set()

    def _send(self, sender: int) -> None:
        rng = random.Random(sender)
        for seq in range(self.frames):
            frame = data_frame(sender, seq, rng, self.big_every)
            if sender % 2:
                self.link.post(frame)        # the writer thread, or this one when the link is idle
            else:
                self.link.send(frame)        # straight from this thread
        self.link.flush(60)

    def _ping(self) -> None:
        ping = HEADER.pack(0, Frame.PING)
        while not self.done.is_set():
            self.link.try_send(ping)
            time.sleep(0.0005)

    def _read(self, expected: int) -> None:
        next_seq = [0] * self.writers
        pong = HEADER.pack(0, Frame.PONG)
        while self.received < expected:
            item = self.link.recv(timeout=60)
            if item is None:
                raise ConnectionError("the other side closed the connection")
            kind, body = item
            if kind == Frame.PING:
                self.pings += 1
                self.link.post_nowait(pong)   # as a worker's reader answers the master
                continue
            if kind == Frame.PONG:
                continue
            if kind != DATA:
                raise AssertionError(f"frame of kind {kind} never sent")
            sender, seq, size, digest = FIELDS.unpack_from(body)
            payload = memoryview(body)[FIELDS.size:]
            if seq != next_seq[sender] or len(payload) != size:
                raise AssertionError(f"sender {sender}: frame {seq} ({len(payload)} bytes) where frame "
                                     f"{next_seq[sender]} ({size} bytes) was due")
            if hashlib.blake2b(payload, digest_size=16).digest() != digest:
                raise AssertionError(f"sender {sender}: frame {seq} arrived changed")
            next_seq[sender] += 1
            self.received += 1
        self.done.set()


def one_round(writers: int, frames: int, big_every: int, socket_timeout: float | None, tickets: int) -> str:
    a_link, b_link = tls_link_pair(socket_timeout, tickets)
    a = Side("client", a_link, writers, frames, big_every)
    b = Side("server", b_link, writers, frames, big_every)
    threads = a.start(writers * frames) + b.start(writers * frames)
    a.done.wait(300)
    b.done.wait(300)
    errors = a.errors + b.errors
    if not errors and not (a.done.is_set() and b.done.is_set()):
        errors.append(f"no progress for 300 s (client got {a.received}, server {b.received} frames)")
    for side in (a, b):
        side.done.set()
    for t in threads:
        t.join(10)
    a_link.close(2)
    b_link.close(2)
    if errors:
        raise SystemExit("FAILED: " + "; ".join(errors))
    return (f"ok: {a.received} + {b.received} frames, {a.pings} + {b.pings} pings "
            f"across one TLS connection")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--writers", type=int, default=4)
    parser.add_argument("--frames", type=int, default=400, help="frames per sender")
    parser.add_argument("--big-every", type=int, default=25, help="one big frame (1-4 MB) in this many")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--socket-timeout", type=float, default=None,
                        help="seconds: sockets with a timeout, whose SSL calls may return 'want read/write'")
    parser.add_argument("--tickets", type=int, default=0, help="session tickets the server sends (default 0)")
    args = parser.parse_args(argv)
    for _ in range(args.rounds):
        print(one_round(args.writers, args.frames, args.big_every, args.socket_timeout, args.tickets), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
