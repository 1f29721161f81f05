"""The master: an asyncio server around the pure ``Dispatcher``.

Each TCP connection gets a ``PeerConnection`` (cw.master.peer).  It authenticates the peer,
learns from HELLO whether it is a client or a worker, decodes its frames and
turns them into dispatcher events.  After each batch of received bytes the
master writes everything the dispatcher queued, one write per peer, so many
small frames share a system call.

With a TLS context (``--tls``) a connection first gets the plain BANNER of
cw.wire.tls, then TLS, then the usual handshake inside it.  Connections are
accepted, and strangers bounded, by cw.master.admission.  The command line
is cw.master.program's.
"""
from __future__ import annotations

import asyncio
import logging
import os
import socket
import ssl

from cw import PORT, __version__, settings
from cw.errors import CwError
from cw.master import admission, events, sharing
from cw.master.dispatch import Dispatcher
from cw.master.peer import PeerConnection
from cw.wire import buffers, frames
from cw.wire.auth import load_secret

log = logging.getLogger("cw.master")

HANDSHAKE_TIMEOUT = settings.HANDSHAKE_TIMEOUT


class Master:
    def __init__(self, secret: bytes, dispatcher: Dispatcher | None = None,
                 handshake_timeout: float = HANDSHAKE_TIMEOUT,
                 heartbeat: float = settings.HEARTBEAT_INTERVAL, peer_timeout: float = settings.PEER_TIMEOUT,
                 tls_context: ssl.SSLContext | None = None, admit: admission.Admission | None = None):
        self.secret = secret
        self.tls_context = tls_context
        self.admission = admit or admission.Admission()
        self.handshake_timeout = handshake_timeout
        self.heartbeat = heartbeat
        self.peer_timeout = peer_timeout
        self.dispatcher = dispatcher or Dispatcher()
        self.watchers = events.Watchers(self.dispatcher)   # clients subscribed to job events
        self.peers: dict[int, PeerConnection] = {}
        self.connections: set[PeerConnection] = set()
        self._next_id = 1
        self._flush_scheduled = False
        self._loop = None

    def new_peer_id(self) -> int:
        pid = self._next_id
        self._next_id += 1
        return pid

    def flush_soon(self) -> None:
        """Flushes once the event loop has run every callback that is ready now:
        results of several workers that arrived together go to their client in
        one write.  A send on loopback costs tens of microseconds, because the
        kernel delivers the data inside the call, so fewer sends is faster."""
        if not self._flush_scheduled:
            self._flush_scheduled = True
            if self._loop is None:
                self._loop = asyncio.get_running_loop()   # once: asking on every read costs a getpid()
            self._loop.call_soon(self.flush)

    def flush(self) -> None:
        """Writes what the dispatcher queued, gathered into one write per peer."""
        self._flush_scheduled = False
        outbox = self.dispatcher.outbox
        if not outbox:
            return
        self.dispatcher.outbox = []
        gathered: dict[int, list] = {}
        for peer_id, data in outbox:
            chunks = gathered.get(peer_id)
            if chunks is None:
                chunks = gathered[peer_id] = []
            if type(data) is tuple and len(data) == 2 and type(data[1]) is memoryview and peer_id in self.peers:
                data = self.peers[peer_id].sharing.outgoing(data)   # same machine: by reference
            if type(data) is tuple:
                chunks.extend(data)
            else:
                chunks.append(data)
        for peer_id, chunks in gathered.items():
            conn = self.peers.get(peer_id)
            if conn is not None:
                conn.write(chunks)

    async def keep_alive(self) -> None:
        """Pings every peer, so that they can tell a frozen master, and drops a
        peer silent for longer than peer_timeout (every peer answers a PING):
        a lost worker's jobs run elsewhere, a lost client's jobs are dropped
        instead of running for nobody until TCP gives up.  A peer we stopped
        reading from (flow control) is not silent by its own doing."""
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(self.heartbeat)
            now = loop.time()
            for conn in list(self.peers.values()):
                if conn.reading_paused:
                    conn.last_heard = now
                elif conn.role is not None and now - conn.last_heard > self.peer_timeout:
                    conn.drop(f"nothing heard for {now - conn.last_heard:.1f} s (peer timeout "
                              f"{self.peer_timeout:g} s); a frozen machine or a cut network?")
                else:
                    conn.write((frames.PING_FRAME,))
            self.flush()
            buffers.POOL.release_idle()

    async def expire_unplaceable(self) -> None:
        """Fails jobs that no worker could run for longer than the dispatcher
        allows, and takes held jobs from workers that leave a REVOKE unanswered:
        often enough that either comes at most a quarter late."""
        d = self.dispatcher
        while True:
            await asyncio.sleep(min(1.0, d.unplaceable.timeout / 4, d.slots.revoke_timeout / 4))
            self.dispatcher.expire()
            self.flush()

    def status(self) -> dict:
        status = self.dispatcher.status()
        status["master"] = {"host": socket.gethostname(), "pid": os.getpid(), "uptime_s": status["uptime_s"],
                            "rss_bytes": _rss_bytes(), "version": __version__, "event_loop": _loop_name(),
                            "by_reference": dict(sharing.COUNTS), "tls": self.tls_context is not None,
                            "unauthenticated": len(self.admission)}
        return status

    def load(self) -> str:
        """The connections open now, in words (for the log)."""
        return (f"{len(self.connections)} connections open ({len(self.admission)} not yet authenticated, cap "
                f"{self.admission.total}, {self.admission.per_source} per address)")

    def close_all(self) -> None:
        for conn in list(self.connections):
            conn.transport.close()


def _loop_name() -> str:
    return "uvloop" if type(asyncio.get_running_loop()).__module__.startswith("uvloop") else "asyncio"


def event_loop_runner(choice: str):
    """The function that runs the master's coroutine: uvloop's when asked
    for, or with "auto" when it is installed (pip install "cw[fast]"); it
    takes about 7% off a round trip here.  Raises CwError when "uvloop"
    is asked for and not installed."""
    if choice == "asyncio":
        return asyncio.run
    try:
        import uvloop
    except ImportError:
        if choice == "uvloop":
            raise CwError('--loop uvloop: uvloop is not installed here; install it with pip install "cw[fast]" '
                          "or use --loop asyncio") from None
        return asyncio.run
    return uvloop.run


def _rss_bytes() -> int:
    """This process's resident memory (Linux), or 0 where /proc is not there."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


async def serve(bind: str = "127.0.0.1", port: int = PORT, secret: bytes | None = None,
                ready=None, stop: asyncio.Event | None = None, **options) -> None:
    """Runs a master until ``stop`` is set (or SIGINT/SIGTERM when run as a program).
    ``options`` are Master's keyword arguments (timeouts)."""
    if secret is None:
        secret = load_secret(create=True)
    slots = options.pop("slots", settings.WORKER_SLOTS)
    unplaceable = options.pop("unplaceable_timeout", settings.UNPLACEABLE_TIMEOUT)
    revoke = options.pop("revoke_timeout", settings.REVOKE_TIMEOUT)
    kept_bytes = options.pop("kept_bytes", settings.KEPT_BYTES)
    limit = admission.raise_descriptor_limit()
    master = Master(secret, Dispatcher(slots=slots, unplaceable_timeout=unplaceable, revoke_timeout=revoke,
                                       kept_bytes=kept_bytes), **options)
    log.debug("descriptor limit %d; %s", limit, master.load())
    listener = admission.Listener(admission.listening_socket(bind, port),
                                  lambda sock, address: PeerConnection(master).accepted(sock, address), master.load)
    keep_alive = asyncio.create_task(master.keep_alive())
    expire = asyncio.create_task(master.expire_unplaceable())
    host, real_port = listener.sock.getsockname()[:2]
    if ready is not None:
        ready(host, real_port)
    stop = stop or asyncio.Event()
    try:
        await stop.wait()
    finally:
        keep_alive.cancel()
        expire.cancel()
        listener.close()
        master.close_all()


def main(argv=None, prog: str = "python -m cw.master") -> int:
    """The ``cw master`` program (cw.master.program)."""
    from cw.master.program import main as run
    return run(argv, prog)
