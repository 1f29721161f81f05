"""A blocking, authenticated connection to the master, for workers and clients.

``open_link`` connects (retrying while the master is not up yet), runs the
handshake and says HELLO; ``Link.recv`` returns one frame at a time and
``Link.send`` writes frames from any thread.
"""
from __future__ import annotations

import errno
import itertools
import logging
import os
import select
import socket
import ssl
import struct
import threading
import time

from cw import settings
from cw.errors import BrokenCluster, HandshakeFailed, ProtocolError, TlsError
from cw.wire import frames, handshake, segments, tls
from cw.wire.address import parse_address  # noqa: F401 - the worker imports it from here
from cw.wire.decoder import FrameDecoder
from cw.wire.frames import Frame
from cw.wire.tlsstream import TlsStream
from cw.wire.writer import BURST_GAP, LinkWriter

log = logging.getLogger("cw.link")

HANDSHAKE_TIMEOUT = settings.HANDSHAKE_TIMEOUT
_RECV_SIZE = 256 * 1024
#: struct timeval, for SO_RCVTIMEO.
_TIMEVAL = struct.Struct("@ll")
#: Plain ints: looking up an IntEnum member costs more than comparing it (recv runs per frame).
_BY_SEGMENT, _RELEASE = int(Frame.BY_SEGMENT), int(Frame.RELEASE)


class Link:
    def __init__(self, sock: socket.socket, decoder: FrameDecoder, address: str):
        self.sock = sock
        self.decoder = decoder
        self.address = address
        self.welcome: dict = {}
        # Over TLS ``sock`` is a TlsStream (cw.wire.tlsstream: not an SSLSocket,
        # whose SSL object the reader and the writers must not share): it takes
        # sendall and recv_into, not sendmsg, so a writer that gathers buffers must join them.
        self.tls = isinstance(sock, TlsStream)
        self._raw = sock.raw if self.tls else sock    # the TCP socket, whose reads SO_RCVTIMEO limits
        self._recv_buf = bytearray(_RECV_SIZE)
        self._recv_view = memoryview(self._recv_buf)
        self._recv_timeout: float | None = None   # the timeout the socket's reads have now (see _wait_for)
        self._send_lock = threading.Lock()
        self._writer: LinkWriter | None = None
        # Big frames go by reference (cw.wire.segments) once both ends proved at HELLO that
        # they share a machine; ``_held``: token -> (descriptor, size) we keep until the master's RELEASE.
        self.sharing = False
        self._held: dict[int, tuple[int, int]] = {}
        self._held_bytes = 0
        self._tokens = itertools.count(1)
        self.sent_by_reference = 0
        self.received_by_reference = 0

    def start_writer(self, burst_gap: float = BURST_GAP) -> None:
        """From now on ``post`` hands frames to a writer thread (see LinkWriter);
        posts closer together than ``burst_gap`` seconds go through it."""
        self._writer = LinkWriter(self, burst_gap)

    def post(self, *chunks, direct: bool = True) -> None:
        """Sends frames, through the writer thread when there is one.  A reader
        thread passes ``direct=False``: it must never block on the socket."""
        if self.sharing:
            for chunk in chunks:        # (most frames are small: no call for them)
                if type(chunk) is tuple and sum(map(len, chunk)) >= segments.MIN_SIZE:
                    chunks = self._by_reference(chunks)
                    break
        if self._writer is None:
            self._send_now(chunks)
        else:
            self._writer.post(chunks, direct)

    def post_nowait(self, frame: bytes) -> None:
        """Posts a small frame unless a backlog is waiting (then the backlog
        going out shows the master we live); never blocks a reader thread."""
        if self._writer is None:
            self.try_send(frame)
        elif self._writer.pending_bytes < LinkWriter.MAX_PENDING:
            self._writer.post((frame,), direct=False)

    def flush(self, timeout: float = 10.0) -> None:
        """Waits until everything posted so far has been sent."""
        if self._writer is not None:
            self._writer.drain(timeout)

    def post_and_wait(self, *chunks, timeout: float = 10.0) -> None:
        """Posts frames after those already posted, and waits until all are sent."""
        self.post(*chunks)
        self.flush(timeout)

    def send(self, *chunks) -> None:
        """Sends whole frames; ``chunks`` may mix bytes and (head, payload) pairs."""
        if self.sharing:
            chunks = self._by_reference(chunks)
        self._send_now(chunks)

    def _send_now(self, chunks) -> None:
        """Sends frames as they are (big ones already by reference, see post)."""
        flat = []
        for chunk in chunks:
            if type(chunk) is tuple:
                flat.extend(chunk)
            else:
                flat.append(chunk)
        with self._send_lock:
            if sum(map(len, flat)) < 64 * 1024:
                self.sock.sendall(b"".join(flat))
                return
            small = []
            for c in flat:              # big payloads go out as they are, uncopied
                if len(c) < 64 * 1024:
                    small.append(c)
                    continue
                if small:
                    self.sock.sendall(b"".join(small))
                    small = []
                self.sock.sendall(c)
            if small:
                self.sock.sendall(b"".join(small))

    def _by_reference(self, chunks) -> tuple:
        """``chunks`` with each big frame written to a shared segment and
        replaced by a BY_SEGMENT frame naming it (see cw.wire.segments)."""
        out = None
        for i, chunk in enumerate(chunks):
            if type(chunk) is not tuple:
                continue
            size = sum(map(len, chunk))
            if size < segments.MIN_SIZE or not segments.may_hold(self._held_bytes, size):
                continue
            kind, fields, payload = segments.split_frame(chunk)
            fd, offset, length = segments.write_segment(len(fields), payload)
            token = next(self._tokens)
            self._held[token] = (fd, size)
            self._held_bytes += size
            if out is None:
                out = list(chunks)
            out[i] = segments.encode_ref(kind, fd, offset, length, token, fields)
            self.sent_by_reference += 1
        return chunks if out is None else tuple(out)

    def _segment_frame(self, ftype: int, body):
        """Handles RELEASE (returns None) and BY_SEGMENT (returns the frame it names)."""
        if ftype == frames.Frame.RELEASE:
            held = self._held.pop(segments.decode_release(body), None)
            if held is not None:
                self._held_bytes -= held[1]
                os.close(held[0])
            return None
        kind, body, token = segments.open_ref(body)
        self.received_by_reference += 1
        self.post(segments.encode_release(token), direct=False)
        return kind, body

    def _release_all(self) -> None:
        # The link is gone: big frames posted from now on must not make segments nobody releases.
        self.sharing = False
        while self._held:
            _, (fd, size) = self._held.popitem()
            self._held_bytes -= size
            os.close(fd)

    def try_send(self, frame: bytes) -> bool:
        """Sends a small frame unless another thread is sending right now (whose
        bytes show the master we are alive anyway).  Never blocks on the lock, so
        a reader thread cannot deadlock behind a writer the master is not reading."""
        if not self._send_lock.acquire(blocking=False):
            return False
        try:
            self.sock.sendall(frame)
        finally:
            self._send_lock.release()
        return True

    def recv(self, timeout: float | None = None):
        """The next frame as ``(type, body)``, or None when the master closed.
        Raises TimeoutError when nothing arrives for ``timeout`` seconds."""
        decoder = self.decoder
        while True:
            if decoder.data or decoder.large is not None:
                item = decoder.next_frame()
                if item is not None:
                    if _BY_SEGMENT <= item[0] <= _RELEASE:
                        item = self._segment_frame(*item)
                        if item is None:
                            continue
                    return item
            if timeout != self._recv_timeout:
                self._wait_for(timeout)
            if decoder.large is not None:
                direct = decoder.direct_buffer()
                if direct is not None:      # the rest of a large frame, straight into its own buffer
                    n = self._recv_into(direct)
                    if not n:
                        raise ProtocolError(f"the master at {self.address} closed the connection mid-frame")
                    decoder.direct_filled(n)
                    continue
            n = self._recv_into(self._recv_buf)   # one buffer for every read: no allocation per read
            if not n:
                self._release_all()
                if decoder.buffered:
                    raise ProtocolError(f"the master at {self.address} closed the connection mid-frame")
                return None
            decoder.feed(self._recv_view[:n])

    def _wait_for(self, timeout: float | None) -> None:
        """Arms ``timeout`` for the next read.  The kernel keeps it
        (SO_RCVTIMEO on the TCP socket, under TLS too: a read is one system
        call, no select() before it); for a timeout of 0, select() looks first."""
        if timeout is not None and timeout <= 0:
            if not self._tls_pending():
                try:
                    ready = select.select([self.sock], [], [], timeout)[0]
                except ValueError:      # closed by this process meanwhile (its descriptor is -1)
                    raise self._closed_here() from None
                if not ready:
                    raise TimeoutError(f"nothing heard from the master at {self.address} for {timeout:g} s")
            return
        seconds = 0.0 if timeout is None else timeout          # (0: no limit)
        try:
            self._raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO,
                                 _TIMEVAL.pack(int(seconds), int(seconds % 1 * 1e6)))
        except OSError as exc:
            if exc.errno == errno.EBADF:
                raise self._closed_here() from None
            raise
        self._recv_timeout = timeout

    def _recv_into(self, buffer) -> int:
        try:
            return self.sock.recv_into(buffer)
        except BlockingIOError:     # SO_RCVTIMEO ran out (see _wait_for)
            raise TimeoutError(f"nothing heard from the master at {self.address} for "
                               f"{self._recv_timeout:g} s") from None
        except OSError as exc:
            if exc.errno == errno.EBADF:
                raise self._closed_here() from None
            raise

    def _closed_here(self) -> OSError:
        return OSError(errno.EBADF, f"the connection to the master at {self.address} was closed here")

    def _tls_pending(self) -> bool:
        # TLS decrypts whole records: bytes already taken from the socket may
        # wait in the TlsStream while the socket has nothing more, and select() would not see them.
        return self.tls and self.sock.pending() > 0

    def close(self, flush_timeout: float = 10.0) -> None:
        """Closes the connection, after sending what was posted (a worker's last
        outcome must not be lost on the way out); a dead socket ends that wait."""
        if self._writer is not None:
            self._writer.drain(flush_timeout)
            self._writer.stop()
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()
        self._release_all()


def open_link(host: str, port: int, secret: bytes, hello: dict, connect_timeout: float = 10.0,
              tls_context: ssl.SSLContext | None = None) -> Link:
    """Connects and authenticates, retrying refused connections with backoff
    for up to ``connect_timeout`` seconds; with ``tls_context`` (see
    cw.wire.tls.client_context) over TLS, to a master started with --tls.
    Raises BrokenCluster when the master cannot be reached, HandshakeFailed
    when it was reached but the handshake (TLS's or cw's) broke off,
    AuthenticationError when the secrets differ."""
    address = f"{host}:{port}"
    deadline = time.monotonic() + connect_timeout
    delay = 0.05
    while True:
        try:
            sock = socket.create_connection((host, port), timeout=HANDSHAKE_TIMEOUT)
            break
        except OSError as exc:
            if time.monotonic() + delay > deadline:
                raise BrokenCluster(
                    f"cannot reach a cw master at {address} ({exc.strerror or exc}) within "
                    f"{round(connect_timeout, 1):g} s: start one with `python -m cw.master`, or check the host "
                    "and port") from None
            time.sleep(delay)
            delay = min(delay * 2, 2.0)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    if tls_context is not None:
        try:
            sock = tls.start_client(sock, tls_context, address)
        except TimeoutError:
            sock.close()
            raise HandshakeFailed(f"the master at {address} did not start TLS within {HANDSHAKE_TIMEOUT:g} s; is "
                                  "that port a cw master?") from None
        except BaseException:
            sock.close()
            raise
    link = Link(sock, FrameDecoder(frames.PREAUTH_MAX_FRAME), address)
    try:
        _handshake(link, secret)
        link.decoder.max_frame = frames.DEFAULT_MAX_FRAME
        link.send(frames.encode_json(Frame.HELLO, {**hello, "probe": segments.probe()}))
        link.welcome = _welcome(link)
        if link.welcome.get("peer_opened") and segments.can_open(link.welcome.get("probe")):
            link.send(frames.frame(Frame.SHARING))
            link.sharing = True
    except TimeoutError:
        link.close()
        raise HandshakeFailed(f"the master at {address} did not finish the handshake within "
                              f"{HANDSHAKE_TIMEOUT:g} s; is that port a cw master?") from None
    except ssl.SSLError as exc:          # the master refused our certificate (TLS 1.3 says so after the handshake)
        link.close()
        raise TlsError(f"the master at {address} ended TLS: {tls.describe_error(exc)}") from None
    except (OSError, ProtocolError) as exc:
        link.close()
        raise HandshakeFailed(f"the handshake with the master at {address} failed: {exc}") from exc
    except BaseException:
        link.close()  # AuthenticationError, HandshakeFailed, or anything else: never leak the socket
        raise
    sock.settimeout(None)
    return link


def _welcome(link: Link) -> dict:
    item = link.recv()
    if item is None:
        raise HandshakeFailed(f"the master at {link.address} closed the connection after the handshake")
    ftype, body = item
    if ftype == Frame.ERROR:
        raise HandshakeFailed(f"the master at {link.address} refused us: {frames.decode_error(body)}")
    if ftype != Frame.WELCOME:
        raise ProtocolError(f"expected WELCOME from the master, got {frames.kind_name(ftype)}")
    welcome = frames.decode_json(body, "WELCOME")
    timeout = welcome.get("timeout")
    if not isinstance(timeout, (int, float)) or timeout <= 0:
        raise ProtocolError(f"the master's WELCOME has no valid peer timeout: {welcome!r}")
    return welcome


def master_timeout(link: Link) -> float:
    """Seconds without a frame (the master pings) after which the master counts as lost."""
    return float(link.welcome["timeout"])


def _handshake(link: Link, secret: bytes) -> None:
    item = link.recv()
    if item is None:
        if link.tls:        # (a TLS 1.3 master refuses a certificate after the client thinks TLS is set up)
            raise TlsError(f"the master at {link.address} ended the TLS connection before the cw handshake: it "
                           "refused this side's TLS certificate (another CA's, expired, or none?); its log says why")
        raise HandshakeFailed(f"the master at {link.address} closed the connection before the handshake")
    challenge_type, challenge = item
    if challenge_type == Frame.ERROR and bytes(challenge).decode("utf-8", "replace").startswith(tls.BANNER_START):
        raise TlsError(f"the master at {link.address} speaks TLS only: connect to tls://{link.address} (and have "
                       "the cluster's certificates: see the TLS page of the docs)")
    nonce, response = handshake.peer_response(secret, challenge_type, challenge)
    link.send(response)
    item = link.recv()
    if item is None:
        raise HandshakeFailed(f"the master at {link.address} closed the connection during the handshake")
    handshake.verify_proof(secret, challenge, nonce, *item)


def peer_info(role: str) -> dict:
    return {"role": role, "host": socket.gethostname(), "pid": os.getpid()}
