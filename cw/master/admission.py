"""Letting connections in: the master's accept loop and its bounds on strangers (issue 17).

An attacker needs no secret to open sockets.  Tried with a descriptor limit
of 512, 1,500 idle connections that never sent a byte took every descriptor:
a real client then failed, and the master logged nothing.  So:

- ``raise_descriptor_limit``: the master lifts its soft RLIMIT_NOFILE to
  the hard limit when it starts.
- ``Admission`` bounds the connections that have not authenticated yet, in
  total and per source address.  Past a bound it closes the oldest pending
  connection of the address holding the most, so one flooding address
  (or a few) loses its own connections, not a lone real peer in its
  handshake.  The total is at most a quarter of the descriptor limit: the
  rest stays for authenticated peers, and for a status query (a client).
- ``Listener`` accepts by itself instead of asyncio's server, on either
  loop: when accepting fails for want of descriptors (EMFILE, ENFILE) it
  pauses accepting briefly, and logs it at most once a minute, with the
  numbers, rather than spinning or staying silent.
"""
from __future__ import annotations

import asyncio
import collections
import errno
import logging
import resource
import socket
import time

from cw import settings

log = logging.getLogger("cw.master")

#: Seconds between two log lines about the same kind of trouble.
LOG_EVERY = 60.0
#: Seconds accepting pauses after the descriptors ran out.
STARVED_PAUSE = 0.2
_OUT_OF_RESOURCES = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)


def raise_descriptor_limit() -> int:
    """Lifts this process's soft descriptor limit to the hard one; returns the limit now."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError) as exc:
            log.warning("could not raise the descriptor limit from %d to %d: %s", soft, target, exc)
    return soft


def descriptor_limit() -> int:
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


class _Throttled:
    """Counts events, and says so at most once every LOG_EVERY seconds."""

    def __init__(self):
        self.count = 0
        self.logged_at = None

    def due(self) -> bool:
        self.count += 1
        now = time.monotonic()
        if self.logged_at is None or now - self.logged_at >= LOG_EVERY:
            self.logged_at = now
            return True
        return False

    def take(self) -> int:
        count, self.count = self.count, 0
        return count


class Admission:
    """The connections not yet authenticated, oldest first, by source address.
    A connection is anything with ``evict(reason)``."""

    def __init__(self, total: int | None = None, per_source: int | None = None):
        limit = descriptor_limit()
        self.total = total or min(settings.MAX_UNAUTHENTICATED, max(8, limit // 4))
        self.per_source = min(per_source or settings.MAX_UNAUTHENTICATED_PER_SOURCE, self.total)
        self.by_source: dict[str, collections.OrderedDict] = {}
        self.source_of: dict = {}
        self._evictions = _Throttled()

    def __len__(self) -> int:
        return len(self.source_of)

    def admit(self, conn, source: str) -> None:
        """Counts a new connection from ``source``; evicts others past the bounds."""
        pending = self.by_source.setdefault(source, collections.OrderedDict())
        pending[conn] = None
        self.source_of[conn] = source
        if len(pending) > self.per_source:
            self._evict(source, f"more than {self.per_source} connections from {source} waiting to authenticate")
        while len(self.source_of) > self.total:
            busiest = max(self.by_source, key=lambda s: len(self.by_source[s]))
            self._evict(busiest, f"more than {self.total} connections waiting to authenticate; {busiest} holds "
                                 f"the most ({len(self.by_source[busiest])})")

    def done(self, conn) -> None:
        """The connection authenticated, or is gone (either way no longer pending); idempotent."""
        source = self.source_of.pop(conn, None)
        if source is None:
            return
        pending = self.by_source[source]
        pending.pop(conn, None)
        if not pending:
            del self.by_source[source]

    def _evict(self, source: str, reason: str) -> None:
        oldest = next(iter(self.by_source[source]))
        self.done(oldest)
        if self._evictions.due():
            log.warning("closing unauthenticated connections: %s (%d closed since the last such line; at most "
                        "one line a minute)", reason, self._evictions.take())
        oldest.evict(f"closed: {reason}")


class Listener:
    """Accepts connections on a listening socket and hands each to ``on_socket(sock, address)``."""

    def __init__(self, sock: socket.socket, on_socket, describe_load):
        self.sock = sock
        self.on_socket = on_socket
        self.describe_load = describe_load     # () -> str: the connections open now, for the log
        self.loop = asyncio.get_running_loop()
        self._starved = _Throttled()
        self._paused = False
        sock.setblocking(False)
        self.loop.add_reader(sock.fileno(), self._ready)

    def _ready(self) -> None:
        # A few at a time, then the loop runs: connections evicted meanwhile
        # give their descriptors back before more are taken.
        for _ in range(32):
            try:
                conn, address = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in _OUT_OF_RESOURCES:
                    self._pause(exc)
                elif exc.errno not in (errno.ECONNABORTED, errno.EPROTO, errno.EPERM):
                    log.warning("accepting a connection failed: %s", exc)
                return
            conn.setblocking(False)
            # Small frames go out at once (the loops set this on their own
            # transports; said here too, for TLS, which writes records in pieces).
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self.on_socket(conn, address)

    def _pause(self, exc: OSError) -> None:
        if self._starved.due():
            log.error("cannot accept connections: %s (%s); %s; descriptor limit %d; %d such failures since the "
                      "last such line (at most one a minute); raise `ulimit -n`, or look for a flood of "
                      "connections", errno.errorcode.get(exc.errno, exc.errno), exc.strerror, self.describe_load(),
                      descriptor_limit(), self._starved.take())
        if not self._paused:
            self._paused = True
            self.loop.remove_reader(self.sock.fileno())
            self.loop.call_later(STARVED_PAUSE, self._resume)

    def _resume(self) -> None:
        if self._paused and self.sock.fileno() >= 0:
            self._paused = False
            self.loop.add_reader(self.sock.fileno(), self._ready)

    def close(self) -> None:
        if self.sock.fileno() >= 0:
            if not self._paused:
                self.loop.remove_reader(self.sock.fileno())
            self.sock.close()


def listening_socket(bind: str, port: int) -> socket.socket:
    """A socket listening on ``bind`` (an IP address or host name) and ``port``."""
    family = socket.AF_INET6 if ":" in bind else socket.AF_INET
    return socket.create_server((bind, port), family=family, backlog=settings.BACKLOG, reuse_port=False)
