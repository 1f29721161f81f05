"""The incremental frame decoder every peer shares, with no I/O (in the manner
of h11's receive buffer): bytes in, whole frames out.  The frame layout and
what a frame's body means are cw.wire.frames'.
"""
from __future__ import annotations

from collections.abc import Callable

from cw.errors import ProtocolError
from cw.wire import buffers
from cw.wire.frames import DEFAULT_MAX_FRAME, HEADER, HEADER_SIZE, LARGE_FRAME


class FrameDecoder:
    """Incremental frame decoder shared by every peer.

    ``feed(data)`` buffers bytes; ``next_frame()`` returns ``(kind, body)``
    (the kind as a plain int: compare it with ``Frame`` members) or ``None``
    when more data is needed.  A length above ``max_frame`` raises
    ``ProtocolError`` as soon as the header is seen, before anything is
    allocated for it.  ``max_frame`` may be raised later (after the handshake).

    For a large frame whose header has arrived, ``direct_buffer()`` hands out
    the writable rest of a buffer of exactly the frame's size, for the socket
    to receive into (``recv_into``, asyncio's BufferedProtocol); the caller
    then reports the bytes it wrote with ``direct_filled(n)``.  The body is
    returned as a writable memoryview of that buffer, never copied.  The
    buffer comes from ``allocate(size)``: by default this process's pool of
    reused buffers (see ``cw.wire.buffers``).
    """

    def __init__(self, max_frame: int = DEFAULT_MAX_FRAME, allocate: Callable[[int], memoryview] | None = None):
        self.max_frame = max_frame
        self.allocate = allocate or buffers.POOL.get
        self._buf = bytearray()
        self._pos = 0
        #: The bytes buffered (read-only outside; emptied in place once every frame
        #: in it was returned): a reader that finds it empty, and no large frame
        #: under way, need not call next_frame before it reads more.
        self.data = self._buf
        # (kind, writable view of the body, bytes filled so far) of a large frame
        # under way; a reader that finds None needs no direct_buffer().
        self.large = None

    def feed(self, data) -> None:
        if self.large is not None:
            kind, body, filled = self.large
            take = min(len(data), len(body) - filled)
            body[filled:filled + take] = data[:take]
            self.large = (kind, body, filled + take)
            data = data[take:]
            if not data:
                return
        if self._pos and self._pos == len(self._buf):
            # Everything so far was consumed: start over instead of growing.
            self._buf.clear()
            self._pos = 0
        self._buf += data

    @property
    def buffered(self) -> int:
        """Bytes received but not yet returned as frames."""
        extra = self.large[2] + HEADER_SIZE if self.large is not None else 0
        return len(self._buf) - self._pos + extra

    def direct_buffer(self) -> memoryview | None:
        """A memoryview to receive the rest of a large frame into, or None."""
        if self.large is None:
            buf, pos = self._buf, self._pos
            if len(buf) - pos < HEADER_SIZE or self._large_pending_check(buf, pos) is None:
                return None
        kind, body, filled = self.large
        return body[filled:] if filled < len(body) else None

    def direct_filled(self, n: int) -> None:
        kind, body, filled = self.large
        self.large = (kind, body, filled + n)

    def _large_pending_check(self, buf, pos):
        length, kind = HEADER.unpack_from(buf, pos)
        if length < LARGE_FRAME or length > self.max_frame or len(buf) - pos - HEADER_SIZE >= length:
            return None
        body = self.allocate(length)
        have = len(buf) - pos - HEADER_SIZE
        body[:have] = buf[pos + HEADER_SIZE:]
        del buf[:]
        self._pos = 0
        self.large = (kind, body, have)
        return self.large

    def next_frame(self) -> tuple[int, bytes | memoryview] | None:
        if self.large is not None:
            kind, body, filled = self.large
            if filled < len(body):
                return None
            self.large = None
            return kind, body
        buf, pos = self._buf, self._pos
        if len(buf) - pos < HEADER_SIZE:
            self._compact()
            return None
        length, kind = HEADER.unpack_from(buf, pos)
        if length > self.max_frame:
            raise ProtocolError(
                f"frame of {length} bytes (type {kind}) exceeds the limit of {self.max_frame} bytes")
        end = pos + HEADER_SIZE + length
        if len(buf) < end:
            if length >= LARGE_FRAME:
                self._large_pending_check(buf, pos)
            else:
                self._compact()
            return None
        with memoryview(buf) as view:   # one copy (a bytearray slice would make two)
            body = bytes(view[pos + HEADER_SIZE:end])
        if end == len(buf):             # all taken: start over (see data)
            buf.clear()
            self._pos = 0
        else:
            self._pos = end
        return kind, body

    def _compact(self) -> None:
        # Drop consumed bytes once they are the larger part of the buffer, so
        # a long-lived connection's buffer stays proportional to what is pending.
        if self._pos and self._pos * 2 >= len(self._buf):
            del self._buf[:self._pos]
            self._pos = 0
