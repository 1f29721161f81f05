"""The master: an asyncio server around the pure ``Dispatcher``.

Each TCP connection gets a ``PeerConnection``.  It authenticates the peer,
learns from HELLO whether it is a client or a worker, decodes its frames and
turns them into dispatcher events.  After each batch of received bytes the
master writes everything the dispatcher queued, one write per peer, so many
small frames share a system call.

Usage: ``python -m cw.master [--bind ADDR] [--port N]``; when it is ready it
prints ``cw master listening on HOST:PORT`` on stdout.
"""
from __future__ import annotations

import argparse
import asyncio
import collections
import errno
import ipaddress
import logging
import os
import signal
import socket
import sys

from cw import PORT, __version__, add_version_option, cliargs, settings
from cw.errors import AuthenticationError, CwError, ProtocolError
from cw.master import inbox, kept, sharing
from cw.master.dispatch import Dispatcher
from cw.wire import buffers, frames, handshake
from cw.wire.address import remove_address_file, write_address_file
from cw.wire.auth import load_secret
from cw.wire.decoder import FrameDecoder
from cw.wire.frames import Frame

log = logging.getLogger("cw.master")

HANDSHAKE_TIMEOUT = settings.HANDSHAKE_TIMEOUT
_READ_SIZE = 256 * 1024
#: A large payload goes to the transport this much at a time (see PeerConnection.write).
_SLICE = 1024 * 1024


class Master:
    def __init__(self, secret: bytes, dispatcher: Dispatcher | None = None,
                 handshake_timeout: float = HANDSHAKE_TIMEOUT,
                 heartbeat: float = settings.HEARTBEAT_INTERVAL, peer_timeout: float = settings.PEER_TIMEOUT):
        self.secret = secret
        self.handshake_timeout = handshake_timeout
        self.heartbeat = heartbeat
        self.peer_timeout = peer_timeout
        self.dispatcher = dispatcher or Dispatcher()
        self.peers: dict[int, PeerConnection] = {}
        self.connections: set[PeerConnection] = set()
        self._next_id = 1
        self._flush_scheduled = False

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
            asyncio.get_running_loop().call_soon(self.flush)

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
                            "by_reference": dict(sharing.COUNTS)}
        return status

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


class PeerConnection(asyncio.BufferedProtocol):
    """One peer.  Reads go straight into a buffer of ours (``get_buffer``); until
    the peer has authenticated that buffer is only PREAUTH_MAX_FRAME bytes, so
    an unknown peer can make us read no more than that at a time."""

    def __init__(self, master: Master):
        self.master = master
        self.dispatcher = master.dispatcher
        self.transport = None
        self.address = "?"
        self.role = None            # "client" or "worker" after HELLO
        self.peer_id = None
        self.name = "unauthenticated peer"
        self.decoder = FrameDecoder(frames.PREAUTH_MAX_FRAME)
        self.buffer = memoryview(bytearray(frames.PREAUTH_MAX_FRAME))
        self.handler = self._on_handshake
        self.timer = None
        self.nonce = b""
        self.last_heard = 0.0
        self.reading_paused = False
        self.direct = None
        self.backlog = collections.deque()   # what waits behind a large payload being written
        self.sharing = sharing.PeerSharing()

    # --- asyncio callbacks ------------------------------------------------

    def connection_made(self, transport) -> None:
        self.transport = transport
        peer = transport.get_extra_info("peername")
        self.address = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer)
        self.name = f"peer {self.address}"
        self.master.connections.add(self)
        transport.set_write_buffer_limits(settings.WRITE_HIGH_WATER, settings.WRITE_LOW_WATER)
        self.nonce, challenge = handshake.server_challenge()
        transport.write(challenge)
        self.loop = loop = asyncio.get_running_loop()   # kept: asking for it on every read costs a getpid()
        self.last_heard = loop.time()
        self.timer = loop.call_later(self.master.handshake_timeout, self._handshake_timeout)

    def get_buffer(self, sizehint: int):
        # The rest of a large frame goes straight into a buffer of its size.
        self.direct = self.decoder.direct_buffer()
        return self.buffer if self.direct is None else self.direct

    def buffer_updated(self, nbytes: int) -> None:
        self.last_heard = self.loop.time()
        try:
            if self.direct is not None:
                self.decoder.direct_filled(nbytes)
                self.direct = None
            else:
                self.decoder.feed(self.buffer[:nbytes])
            while self.handler is not None:
                item = self.decoder.next_frame()
                if item is None:
                    break
                self.handler(*item)
        except AuthenticationError as exc:
            self.drop(f"{handshake.AUTH_FAILED}: {exc}")
        except ProtocolError as exc:
            self.drop(str(exc))
        except Exception:  # a bug must cost one connection, never the master
            log.exception("internal error while handling %s; dropping it", self.name)
            self.drop("internal error in the master (see its log)")
        finally:
            self.master.flush_soon()

    def eof_received(self):
        return False  # close our side too

    def pause_writing(self) -> None:
        # The peer does not read as fast as we write.  Stop reading from it and
        # hold back its jobs, so its results cannot pile up here.
        if self.role == "client":
            self.dispatcher.pause_client(self.peer_id)
        if not self.reading_paused and not self.transport.is_closing():
            self.reading_paused = True
            self.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.reading_paused and not self.transport.is_closing():
            self.reading_paused = False
            self.transport.resume_reading()
        if self.role == "client":
            self.dispatcher.resume_client(self.peer_id)
            self.master.flush()
        if self.backlog:
            self._write_backlog()

    def connection_lost(self, exc) -> None:
        if self.timer is not None:
            self.timer.cancel()
        self.handler = None
        self.backlog.clear()
        self.sharing.lost()
        self.master.connections.discard(self)
        if self.peer_id is not None:
            self.master.peers.pop(self.peer_id, None)
            if self.role == "client":
                self.dispatcher.remove_client(self.peer_id)
            elif self.role == "worker":
                self.dispatcher.remove_worker(self.peer_id)
            log.info("%s disconnected", self.name)
            self.master.flush()

    # --- writing and dropping ----------------------------------------------

    def write(self, chunks) -> None:
        """Writes frames (a list of chunks), small ones joined into one write.

        A large payload is handed to the transport a slice at a time, each
        when the transport has sent everything before it.  Given all at once,
        asyncio (3.11) would copy what the socket does not take at once into
        its own buffer and move the rest of that buffer down after every send:
        for 100 MB, more time than the sending.  While a payload is on its
        way, the write buffer limits are zero, so the transport calls
        ``resume_writing`` as soon as it has sent a slice; later frames wait
        behind it in ``backlog``, in order."""
        if self.transport.is_closing():
            return
        if self.backlog:
            self.backlog.extend(chunks)
            return
        small = []
        for i, chunk in enumerate(chunks):
            if len(chunk) < frames.LARGE_FRAME:
                small.append(chunk)
                continue
            if small:
                self.transport.write(b"".join(small))
            self.backlog.extend(chunks[i:])
            self.transport.set_write_buffer_limits(0, 0)
            self._write_backlog()
            return
        if small:
            self.transport.write(small[0] if len(small) == 1 else b"".join(small))

    def _write_backlog(self) -> None:
        transport = self.transport
        backlog = self.backlog
        while backlog and not transport.get_write_buffer_size() and not transport.is_closing():
            chunk = backlog.popleft()
            if len(chunk) > _SLICE:
                backlog.appendleft(memoryview(chunk)[_SLICE:])
                chunk = memoryview(chunk)[:_SLICE]
            elif len(chunk) < frames.LARGE_FRAME:
                small = [chunk]
                while backlog and len(backlog[0]) < frames.LARGE_FRAME:
                    small.append(backlog.popleft())
                chunk = b"".join(small)
            transport.write(chunk)
        if not backlog:
            transport.set_write_buffer_limits(settings.WRITE_HIGH_WATER, settings.WRITE_LOW_WATER)

    def drop(self, reason: str) -> None:
        """Tells the peer why, then closes: a bad peer costs only itself."""
        if self.handler is None and self.transport.is_closing():
            return
        log.warning("dropping %s: %s", self.name, reason)
        self.handler = None
        if self.backlog:                # in the middle of a large frame: nothing more can be said
            self.backlog.clear()
            self.transport.abort()
            return
        if not self.transport.is_closing():
            self.transport.write(frames.encode_error(reason))
            self.transport.close()
        if self.reading_paused or self.transport.get_write_buffer_size() > settings.WRITE_HIGH_WATER:
            self.transport.abort()  # it does not read: do not wait to flush what it will never take

    def _handshake_timeout(self) -> None:
        self.drop(f"no handshake and HELLO within {self.master.handshake_timeout:g} s")

    # --- frame handlers, one per connection state ---------------------------

    def _on_handshake(self, ftype: int, body: bytes) -> None:
        proof = handshake.verify_response(self.master.secret, self.nonce, ftype, body)
        self.transport.write(proof)
        self.decoder.max_frame = settings.MAX_HELLO
        self.handler = self._on_hello

    def _on_hello(self, ftype: int, body: bytes) -> None:
        if ftype != Frame.HELLO:
            raise ProtocolError(f"expected HELLO after the handshake, got {frames.kind_name(ftype)}")
        info = frames.decode_json(body, "HELLO")
        role = info.get("role")
        if role not in ("client", "worker"):
            raise ProtocolError(f"HELLO names role {role!r}; expected 'client' or 'worker'")
        self.timer.cancel()
        self.timer = None
        self.role = role
        self.peer_id = self.master.new_peer_id()
        self.master.peers[self.peer_id] = self
        self.name = f"{role} {self.peer_id} ({info.get('host')} pid {info.get('pid')}, from {self.address})"
        self.decoder.max_frame = frames.DEFAULT_MAX_FRAME
        self.buffer = memoryview(bytearray(_READ_SIZE))
        self.transport.write(frames.encode_json(Frame.WELCOME, {
            "id": self.peer_id, "heartbeat": self.master.heartbeat, "timeout": self.master.peer_timeout,
            **self.sharing.welcome_fields(info)}))
        log.info("%s connected", self.name)
        if role == "client":
            self.dispatcher.add_client(self.peer_id, info)
            self.handler = self._on_client_frame
        else:
            self.dispatcher.add_worker(self.peer_id, info)
            self.handler = self._on_worker_frame

    def _on_client_frame(self, ftype: int, body: bytes) -> None:
        if Frame.BY_SEGMENT <= ftype <= Frame.SHARING:    # big frames by reference (master/sharing.py)
            named = self.sharing.frame(ftype, body, self.write)
            if named is None:
                return
            ftype, body = named
        if ftype == Frame.STATUS_REQ:
            reqid = frames.decode_status_request(body)
            self.transport.write(frames.encode_status(reqid, self.master.status()))
        elif ftype in inbox.CLIENT_FRAMES:
            inbox.client_frame(self.dispatcher, self.peer_id, ftype, body)
        elif ftype != Frame.PONG:
            self._unexpected(ftype, body)

    def _on_worker_frame(self, ftype: int, body: bytes) -> None:
        if Frame.BY_SEGMENT <= ftype <= Frame.SHARING:    # big frames by reference (master/sharing.py)
            named = self.sharing.frame(ftype, body, self.write)
            if named is None:
                return
            ftype, body = named
        if ftype in inbox.WORKER_FRAMES:
            if ftype == Frame.DRAIN:
                log.info("%s is draining: it finishes its job and takes no other", self.name)
            inbox.worker_frame(self.dispatcher, self.peer_id, ftype, body)
        elif ftype != Frame.PONG:
            self._unexpected(ftype, body)

    def _unexpected(self, ftype: int, body: bytes) -> None:
        if ftype == Frame.ERROR:
            raise ProtocolError(f"it reported an error: {frames.decode_error(body[:500])}")
        raise ProtocolError(f"a {self.role} may not send frame type {frames.kind_name(ftype)}")


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
    master = Master(secret, Dispatcher(slots=slots, unplaceable_timeout=unplaceable, revoke_timeout=revoke,
                                       kept_bytes=kept_bytes), **options)
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: PeerConnection(master), bind, port, backlog=settings.BACKLOG)
    keep_alive = asyncio.create_task(master.keep_alive())
    expire = asyncio.create_task(master.expire_unplaceable())
    host, real_port = server.sockets[0].getsockname()[:2]
    if ready is not None:
        ready(host, real_port)
    stop = stop or asyncio.Event()
    try:
        await stop.wait()
    finally:
        keep_alive.cancel()
        expire.cancel()
        server.close()
        master.close_all()
        await server.wait_closed()


def advertised_host(bound: str) -> str:
    """A name other machines can use to reach a master bound to ``bound``."""
    if bound in ("0.0.0.0", "::", ""):
        # The host name, which a cluster's nodes resolve; the fully qualified
        # name when there is a real one (getfqdn says "localhost" on machines
        # whose /etc/hosts maps the host name to 127.0.0.1 first).
        fqdn = socket.getfqdn()
        if "." in fqdn and not fqdn.startswith("localhost"):
            return fqdn
        return socket.gethostname()
    return bound


def _is_loopback(bind: str) -> bool:
    if bind == "localhost":
        return True
    try:
        return ipaddress.ip_address(bind).is_loopback
    except ValueError:
        return False


def main(argv=None, prog: str = "python -m cw.master") -> int:
    parser = argparse.ArgumentParser(prog=prog, description="Run a cw master.")
    add_version_option(parser)
    parser.add_argument("--bind", default="127.0.0.1", type=cliargs.bind_address,
                        help="address to listen on (default 127.0.0.1; 0.0.0.0 for every interface)")
    parser.add_argument("--port", type=cliargs.port, default=PORT,
                        help=f"TCP port (default {PORT}; 0 picks a free one)")
    parser.add_argument("--handshake-timeout", type=cliargs.seconds, default=HANDSHAKE_TIMEOUT,
                        help=f"seconds a new connection has to authenticate (default {HANDSHAKE_TIMEOUT:g})")
    parser.add_argument("--heartbeat", type=cliargs.seconds, default=settings.HEARTBEAT_INTERVAL,
                        help=f"seconds between pings to every peer (default {settings.HEARTBEAT_INTERVAL:g})")
    parser.add_argument("--peer-timeout", type=cliargs.seconds, default=settings.PEER_TIMEOUT,
                        help="seconds of silence after which a worker or client is declared lost "
                             f"(default {settings.PEER_TIMEOUT:g})")
    parser.add_argument("--slots", type=cliargs.count, default=settings.WORKER_SLOTS,
                        help="jobs a worker holds at once: the one it runs and the next ones, sent ahead "
                             f"(default {settings.WORKER_SLOTS}; 1 sends a job only to an idle worker)")
    parser.add_argument("--revoke-timeout", type=cliargs.seconds, default=settings.REVOKE_TIMEOUT,
                        help="seconds a worker has to give back a job sent ahead when asked (a more urgent job "
                             "wants its place, or an idle worker its job) before the job goes to another worker "
                             "anyway; a frozen worker's late start of it is dropped "
                             f"(default {settings.REVOKE_TIMEOUT:g})")
    parser.add_argument("--unplaceable-timeout", type=cliargs.seconds, default=settings.UNPLACEABLE_TIMEOUT,
                        help="seconds a job that no connected worker could run (it needs more than any has, or "
                             "names workers that are gone) waits for one to join before it fails "
                             f"(default {settings.UNPLACEABLE_TIMEOUT:g})")
    parser.add_argument("--kept-bytes", type=kept.parse_size, default=settings.KEPT_BYTES,
                        help="memory for kept values (executor.put, futures passed to jobs): beyond it a put "
                             f"fails, saying so (default {settings.KEPT_BYTES >> 30}G; suffixes K, M, G)")
    parser.add_argument("--address-file", default=None,
                        help="once listening, write the master's reachable address to this file as JSON "
                             "(the SLURM helpers use it to find the master)")
    parser.add_argument("--advertise", default=None,
                        help="host name to publish in --address-file (default: this machine's name when "
                             "bound to every interface, else the bind address)")
    parser.add_argument("--loop", choices=("auto", "uvloop", "asyncio"), default="auto",
                        help="event loop: uvloop (faster; pip install \"cw[fast]\"), asyncio (the standard "
                             "library's), or auto: uvloop when installed (default)")
    parser.add_argument("--log-level", default="INFO", type=cliargs.log_level,
                        help="DEBUG, INFO, WARNING, ERROR or CRITICAL (default INFO)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level, stream=sys.stderr,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        secret = load_secret(create=True)
        run_loop = event_loop_runner(args.loop)
    except CwError as exc:
        print(f"cw.master: {exc}", file=sys.stderr)
        return 2
    if not _is_loopback(args.bind):
        log.warning("listening on %s: any machine that can reach it and holds the secret file can run code "
                    "on your workers; keep the secret file private", args.bind)

    async def run() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)

        def ready(host, port):
            if args.address_file:
                write_address_file(args.address_file, args.advertise or advertised_host(host), port,
                                   job=os.environ.get("SLURM_JOB_ID"))
            log.info("listening on %s:%s with the %s event loop", host, port, _loop_name())
            print(f"cw master listening on {host}:{port}", flush=True)

        await serve(args.bind, args.port, secret, ready, stop, handshake_timeout=args.handshake_timeout,
                    heartbeat=args.heartbeat, peer_timeout=args.peer_timeout, slots=args.slots,
                    unplaceable_timeout=args.unplaceable_timeout, revoke_timeout=args.revoke_timeout,
                    kept_bytes=args.kept_bytes)

    try:
        run_loop(run())
    except OSError as exc:
        if args.address_file and str(exc.filename or "").startswith(args.address_file):
            print(f"cw.master: cannot write the address file {args.address_file}: {exc.strerror}", file=sys.stderr)
            return 1
        print(f"cw.master: cannot listen on {args.bind} port {args.port}: {_bind_advice(exc)}", file=sys.stderr)
        return 1
    finally:
        if args.address_file:
            remove_address_file(args.address_file)
    log.info("master stopped")
    return 0


def _bind_advice(exc: OSError) -> str:
    """Why a bind failed, in words that say what to change."""
    if exc.errno == errno.EADDRINUSE:
        return "the port is in use (another master?); choose another --port, or 0 for any free one"
    if exc.errno == errno.EADDRNOTAVAIL:
        return "no interface of this machine has that address; give one of its addresses, or 0.0.0.0 for all"
    if exc.errno == errno.EACCES:
        return "not allowed (ports below 1024 need privileges); choose a --port of 1024 or more"
    if isinstance(exc, socket.gaierror):
        return f"the host name does not resolve ({exc.strerror}); give an IP address of this machine"
    return exc.strerror or str(exc)


if __name__ == "__main__":
    sys.exit(main())
