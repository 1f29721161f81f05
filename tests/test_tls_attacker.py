"""An attacker on the path (issue 17): a forwarding proxy on loopback between
a worker and the master, which records every byte and can rewrite some.

Plain TCP: the proxy reads a job's argument, and a rewritten argument is
run (the limit of the plain mode, documented).  TLS: the proxy sees no
marker, and a rewritten byte ends the worker's connection: the job runs
again elsewhere and the client gets the right answer."""
from __future__ import annotations

import os
import re
import socket
import sys
import threading

import pytest

from cw.launch.local import start_master

sys.path.insert(0, os.path.dirname(__file__))
import jobs  # noqa: E402
from conftest import wait_until  # noqa: E402

MARKER = b"cw-marker-7f3a9e-secret-argument"
REWRITTEN = b"cw-marker-7f3a9e-EVIL-argument!!"
assert len(MARKER) == len(REWRITTEN)


class Proxy:
    """Forwards one listening port to the master; records what passes.  ``arm(rewrite)``:
    the next master->worker chunk goes through ``rewrite(bytes) -> bytes`` (once)."""

    def __init__(self, host: str, port: int):
        self.target = (host, port)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.seen = bytearray()
        self.lock = threading.Lock()
        self.rewrite = None
        self.rewrote = threading.Event()
        self.sockets: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def arm(self, rewrite) -> None:
        with self.lock:
            self.rewrite = rewrite

    def _accept(self) -> None:
        while True:
            try:
                worker, _ = self.listener.accept()
            except OSError:
                return
            master = socket.create_connection(self.target)
            self.sockets += [worker, master]
            threading.Thread(target=self._pump, args=(worker, master, False), daemon=True).start()
            threading.Thread(target=self._pump, args=(master, worker, True), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket, to_worker: bool) -> None:
        try:
            while True:
                data = source.recv(65536)
                if not data:
                    break
                with self.lock:
                    self.seen += data
                    rewrite = self.rewrite if to_worker else None
                    if rewrite is not None:
                        changed = rewrite(data)
                        if changed != data:
                            self.rewrite = None
                            self.rewrote.set()
                            data = changed
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for s in (source, sink):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self) -> None:
        self.listener.close()
        for s in self.sockets:
            s.close()


@pytest.fixture(params=["plain", "tls"])
def proxied(request, tmp_path):
    """A master (plain or --tls) and a proxy in front of it; ``.worker_address`` goes through the proxy."""
    if request.param == "tls":
        pytest.importorskip("cryptography")
    log = open(tmp_path / "master.log", "w+")
    args = ["--log-level", "INFO"] + (["--tls"] if request.param == "tls" else [])
    cluster = start_master(port=0, args=args, stderr=log)
    cluster.log = lambda: (tmp_path / "master.log").read_text()
    cluster.proxy = Proxy(cluster.host, cluster.port)
    cluster.worker_address = f"{'tls://' if cluster.tls else ''}127.0.0.1:{cluster.proxy.port}"
    yield cluster
    cluster.stop()
    cluster.proxy.close()
    log.close()


def _start_worker_through_proxy(cluster):
    import subprocess
    proc = subprocess.Popen([sys.executable, "-m", "cw.worker", cluster.worker_address, "-n", "1",
                             "--connect-timeout", "60", "--log-level", "WARNING"], stdin=subprocess.DEVNULL)
    cluster.workers.append(proc)
    cluster.wait_for_workers(1)


def test_the_path_reads_and_rewrites_a_plain_connection_but_not_a_tls_one(proxied):
    _start_worker_through_proxy(proxied)
    proxy = proxied.proxy
    proxy.arm(lambda data: data.replace(MARKER, REWRITTEN))
    with proxied.executor() as ex:
        future = ex.submit(jobs.identity, MARKER)
        if not proxied.tls:
            # The limit of plain TCP: the path reads the argument, and runs what it wrote instead.
            assert future.result(timeout=60) == REWRITTEN
            assert MARKER in proxy.seen
            return
        assert future.result(timeout=60) == MARKER
        assert MARKER not in proxy.seen and REWRITTEN not in proxy.seen   # never in the clear
        assert not proxy.rewrote.is_set()                                 # nothing it could find to change


@pytest.mark.parametrize("proxied", ["tls"], indirect=True)    # (plain TCP carries it silently: see above)
def test_a_rewritten_tls_byte_ends_the_connection_and_the_job_runs_again(proxied):
    _start_worker_through_proxy(proxied)
    proxy = proxied.proxy

    def flip_one_byte(data: bytes) -> bytes:
        if len(data) < 64:        # a PING's record; the JOB's is bigger
            return data
        middle = len(data) // 2
        return data[:middle] + bytes([data[middle] ^ 0x01]) + data[middle + 1:]

    with proxied.executor() as ex:
        proxy.arm(flip_one_byte)
        future = ex.submit(jobs.identity, MARKER * 8)
        wait_until(proxy.rewrote.is_set, what="the proxy to rewrite a byte of the JOB")
        proxied.add_workers(1)        # a worker the path cannot touch, to run the job again
        assert future.result(timeout=120) == MARKER * 8
    assert MARKER not in proxy.seen
    wait_until(lambda: re.search(r"worker \d+ \(.*\) disconnected", proxied.log()),
               what="the master to see the worker's connection end")
