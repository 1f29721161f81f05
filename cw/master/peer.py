"""One peer of the master: ``PeerConnection``, the asyncio protocol of one connection.

It authenticates the peer (inside TLS when the master has a TLS context:
``accepted`` sends the plain BANNER of cw.wire.tls, then the transport is
made with TLS), learns from HELLO whether it is a client or a worker,
decodes its frames and turns them into dispatcher events (cw.master.inbox).
cw.master.admission counts it as a stranger until HELLO.  The master
(cw.master.server) owns the connections and writes what the dispatcher queued.
"""
from __future__ import annotations

import asyncio
import collections
import logging
import socket
import ssl
from typing import TYPE_CHECKING

from cw import settings
from cw.errors import AuthenticationError, ProtocolError
from cw.master import inbox, sharing
from cw.wire import frames, handshake, tls
from cw.wire.decoder import FrameDecoder
from cw.wire.frames import Frame

if TYPE_CHECKING:
    from cw.master.server import Master

log = logging.getLogger("cw.master")

_READ_SIZE = 256 * 1024
# Frame kinds met on every frame, as plain ints: comparing an int with a Frame
# member costs a class attribute lookup, several times the comparison itself.
_BY_REFERENCE_FIRST, _BY_REFERENCE_LAST, _DRAIN = int(Frame.BY_SEGMENT), int(Frame.SHARING), int(Frame.DRAIN)
#: A large payload goes to the transport this much at a time (see PeerConnection.write).
_SLICE = 1024 * 1024


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
        self.sock = None             # until connection_made: the accepted socket
        self.opening = None          # the task that makes its transport (and its TLS)

    # --- asyncio callbacks ------------------------------------------------

    def accepted(self, sock: socket.socket, address) -> None:
        """A new socket from cw.master.admission's Listener: counted as a
        stranger until it authenticates; with TLS, it first gets the plain
        BANNER and then its TLS handshake (connection_made follows that)."""
        self.address = f"{address[0]}:{address[1]}" if isinstance(address, tuple) else str(address)
        self.name = f"peer {self.address}"
        self.sock = sock
        self.master.admission.admit(self, address[0] if isinstance(address, tuple) else str(address))
        if self.handler is None:       # evicted at once (a flood from its address)
            return
        context = self.master.tls_context
        loop = asyncio.get_running_loop()
        if context is not None:
            try:
                sock.send(tls.BANNER)      # so that a plain peer learns at once why it gets no CHALLENGE
            except OSError:
                pass                       # gone already: the TLS handshake will say so
        self.opening = loop.create_task(self._open(loop, sock, context))

    async def _open(self, loop, sock, context) -> None:
        self.sock = None                   # the transport's from now on
        try:
            await loop.connect_accepted_socket(lambda: self, sock, ssl=context,
                                               ssl_handshake_timeout=self.master.handshake_timeout if context else None)
        except (ssl.SSLError, OSError, asyncio.TimeoutError) as exc:
            if self.handler is not None:
                if isinstance(exc, ssl.SSLError):
                    why = tls.describe_error(exc, other="peer")
                elif isinstance(exc, asyncio.TimeoutError):
                    why = f"not done within {self.master.handshake_timeout:g} s"
                else:
                    why = ("it closed the connection (a peer that does not speak TLS? it must connect to "
                           "tls://HOST:PORT)")
                log.warning("dropping %s: the TLS handshake failed: %s", self.name, why)
            self.handler = None
            self.master.admission.done(self)
        except asyncio.CancelledError:      # evicted, or the master stops
            self.master.admission.done(self)
        finally:
            self.opening = None

    def evict(self, reason: str) -> None:
        """Closes a connection that has not authenticated, at the admission's word (no log line: it counts them)."""
        self.handler = None
        if self.transport is not None:
            self.transport.abort()
            return
        if self.opening is not None:
            self.opening.cancel()      # (in its TLS handshake: the transport closes the socket)
        if self.sock is not None:
            self.sock.close()          # not handed over yet: its descriptor is free at once

    def connection_made(self, transport) -> None:
        self.transport = transport
        self.master.connections.add(self)
        self.loop = loop = asyncio.get_running_loop()   # kept: asking for it on every read costs a getpid()
        self.last_heard = loop.time()
        self.timer = loop.call_later(self.master.handshake_timeout, self._handshake_timeout)
        transport.set_write_buffer_limits(settings.WRITE_HIGH_WATER, settings.WRITE_LOW_WATER)
        self.nonce, challenge = handshake.server_challenge()
        transport.write(challenge)

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
            reason = str(exc)
            if self.role is None and self.master.tls_context is None and tls.looks_like_tls(bytes(self.buffer[:2])):
                reason = ("it speaks TLS, this master plain TCP: connect to HOST:PORT without tls://, or start the "
                          "master with --tls")
            self.drop(reason)
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
        self.master.admission.done(self)
        self.backlog.clear()
        self.sharing.lost()
        self.master.connections.discard(self)
        self.master.watchers.unsubscribe(self)
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
        if ftype == Frame.ERROR:
            raise ProtocolError(f"it gave up before authenticating: {frames.decode_error(body[:500])}")
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
        self.master.admission.done(self)
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
        if _BY_REFERENCE_FIRST <= ftype <= _BY_REFERENCE_LAST:    # big frames by reference (master/sharing.py)
            named = self.sharing.frame(ftype, body, self.write)
            if named is None:
                return
            ftype, body = named
        if ftype in inbox.CLIENT_FRAMES:     # first: a SUBMIT per job
            inbox.client_frame(self.dispatcher, self.peer_id, ftype, body)
        elif ftype == Frame.STATUS_REQ:
            reqid = frames.decode_status_request(body)
            self.transport.write(frames.encode_status(reqid, self.master.status()))
        elif ftype == Frame.SUBSCRIBE:
            self.master.watchers.subscribe(self)
        elif ftype == Frame.UNSUBSCRIBE:
            self.master.watchers.unsubscribe(self)
        elif ftype != Frame.PONG:
            self._unexpected(ftype, body)

    def _on_worker_frame(self, ftype: int, body: bytes) -> None:
        if _BY_REFERENCE_FIRST <= ftype <= _BY_REFERENCE_LAST:    # big frames by reference (master/sharing.py)
            named = self.sharing.frame(ftype, body, self.write)
            if named is None:
                return
            ftype, body = named
        if ftype in inbox.WORKER_FRAMES:
            if ftype == _DRAIN:
                log.info("%s is draining: it finishes its job and takes no other", self.name)
            inbox.worker_frame(self.dispatcher, self.peer_id, ftype, body)
        elif ftype != Frame.PONG:
            self._unexpected(ftype, body)

    def _unexpected(self, ftype: int, body: bytes) -> None:
        if ftype == Frame.ERROR:
            raise ProtocolError(f"it reported an error: {frames.decode_error(body[:500])}")
        raise ProtocolError(f"a {self.role} may not send frame type {frames.kind_name(ftype)}")
