"""TLS over a plain socket that one thread reads while others write.

A blocking Link reads on its reader thread and writes from others (its
writer thread, a job's thread).  An ``ssl.SSLSocket`` cannot be shared that
way: OpenSSL forbids SSL_read and SSL_write on one SSL object from two
threads at once (openssl/openssl#20446), and CPython has seen crashes from
exactly that (python/cpython#151508).  So the TLS state machine here is an
``ssl.SSLObject`` between two memory BIOs, and the raw TCP socket is read
and written by the link's threads themselves:

- every call into the SSL object (feeding ciphertext in, decrypting,
  encrypting, taking ciphertext out) happens under ``_tls_lock``, which is
  never held across socket I/O, so a reader waiting for bytes never holds
  up a writer, nor a writer blocked on a full socket the reader;
- writers take ``_send_lock`` first and keep it while their ciphertext goes
  out, so the records of two writers never interleave on the wire.

``TlsStream`` offers what Link uses of a socket (recv_into, sendall,
pending, fileno for select, settimeout, shutdown, close); plain links keep
their socket and pay nothing for this.
"""
from __future__ import annotations

import socket
import ssl
import threading

#: Ciphertext read from the socket per system call (many TLS records).
_RAW_READ = 256 * 1024
#: Plaintext encrypted per turn of the TLS lock: a big frame goes out in
#: pieces, so the reader gets the lock between them and the frame is never
#: held twice (plain and encrypted) in memory.
_WRITE_PIECE = 256 * 1024


class TlsStream:
    """A TLS connection on ``sock`` (a client's; a server's in tests); ``handshake()`` before use."""

    def __init__(self, sock: socket.socket, context: ssl.SSLContext, server_side: bool = False):
        self.raw = sock
        self._incoming = ssl.MemoryBIO()
        self._outgoing = ssl.MemoryBIO()
        self._tls = context.wrap_bio(self._incoming, self._outgoing, server_side=server_side)
        # ssl.SSLObject's read and write are Python methods around the C object's;
        # called directly, a small record is read or written without that extra call.
        self._c = getattr(self._tls, "_sslobj", self._tls)
        self._tls_lock = threading.Lock()     # every call into the SSL object; never across socket I/O
        self._send_lock = threading.Lock()    # one writer at a time, taken before _tls_lock
        self._raw_buf = bytearray(_RAW_READ)
        self._raw_view = memoryview(self._raw_buf)
        self._eof = False                     # the peer's close_notify, or the TCP end, was read
        self._leftover = 0                    # ciphertext and plaintext the SSL object holds, after the last read

    def handshake(self) -> None:
        """Runs the TLS handshake, blocking (within the socket's timeout).
        Raises ssl.SSLError when TLS fails, OSError when the connection does."""
        while True:
            try:
                self._tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                self._send_outgoing()
                n = self.raw.recv_into(self._raw_buf)
                if n:
                    self._incoming.write(self._raw_view[:n])
                else:
                    self._incoming.write_eof()    # the next do_handshake raises SSLEOFError
        self._send_outgoing()     # the client's last flight (its certificate and Finished)
        self._leftover = self._incoming.pending    # (records that came with the handshake's last flight)

    def _send_outgoing(self) -> None:
        # Only while no other thread uses the stream (the handshake).
        data = self._outgoing.read()
        if data:
            self.raw.sendall(data)

    # --- reading (one thread) ------------------------------------------------------

    def recv_into(self, buffer, nbytes: int = 0) -> int:
        """Decrypted bytes into ``buffer`` (at most ``nbytes`` if given), at
        least one, waiting for the socket if none are ready; 0 at the end of
        the connection (the peer's close_notify or TCP's end, as SSLSocket
        with suppress_ragged_eofs).  Raises ssl.SSLError for a corrupt record."""
        if self._eof:
            return 0
        # (A bytearray, a link's read buffer, is read into as it is: no view to make per read.)
        view = buffer if type(buffer) is bytearray else memoryview(buffer).cast("B")
        want = nbytes or len(view)
        if not want:
            return 0
        got = 0
        if self._leftover:            # (else the SSL object has nothing: asking it would only raise WantRead)
            with self._tls_lock:
                got = self._decrypt_into(view, want)
        while not got and not self._eof:
            n = self.raw.recv_into(self._raw_buf)
            with self._tls_lock:     # one turn of the lock per read: feed the ciphertext, decrypt it
                if n:
                    self._incoming.write(self._raw_view[:n])
                else:
                    self._incoming.write_eof()   # (the SSL object then says SSLEOFError)
                got = self._decrypt_into(view, want)
        return got

    def _decrypt_into(self, view: memoryview, want: int) -> int:
        # Under _tls_lock, when the SSL object holds something (ciphertext, or the
        # plaintext of a record read in part): as many records as the ciphertext
        # received so far holds, up to ``want`` bytes.  Its "nothing yet" is an
        # SSLWantReadError, which costs more than decrypting a small record, and
        # every call into it lets go of the GIL: so it is asked again only while
        # ciphertext waits (``pending`` of a memory BIO is neither).
        tls, incoming = self._c, self._incoming
        got = 0
        try:
            while True:
                n = tls.read(want - got, view if not got else memoryview(view)[got:])
                if not n:              # the peer's close_notify
                    self._eof = True
                    break
                got += n
                if got == want or not incoming.pending:
                    break
        except ssl.SSLWantReadError:
            pass                       # the rest of a record is still on its way
        except (ssl.SSLEOFError, ssl.SSLZeroReturnError):
            self._eof = True           # TCP ended without close_notify (an end all the same), or
                                       # close_notify after this side said its own
        # (Bytes the SSL object wants to send in answer, a TLS 1.3 KeyUpdate's,
        # wait in the outgoing BIO and leave with the next write: the reader never sends.)
        # A read that returned less than it was asked for emptied its record: plaintext
        # can be left only when ``want`` was reached.
        self._leftover = incoming.pending + (tls.pending() if got == want else 0)
        return got

    def recv(self, size: int) -> bytes:
        buf = bytearray(size)
        n = self.recv_into(buf)
        del buf[n:]
        return bytes(buf)

    def pending(self) -> int:
        """Bytes already taken from the socket but not read: select() cannot see
        them, so a reader with a timeout reads before it waits.  (Only the
        reader changes that number, so the reader may ask without the lock.)"""
        return self._leftover

    # --- writing (any thread) ------------------------------------------------------

    def sendall(self, data) -> None:
        """Encrypts and sends all of ``data``, in order with other threads' sendall."""
        if type(data) is bytes and len(data) <= _WRITE_PIECE:     # the usual: a few frames joined
            with self._send_lock:
                with self._tls_lock:
                    self._c.write(data)
                    cipher = self._outgoing.read()
                self.raw.sendall(cipher)
            return
        with memoryview(data) as view, view.cast("B") as plain, self._send_lock:
            for start in range(0, len(plain), _WRITE_PIECE):
                with self._tls_lock:
                    self._c.write(plain[start:start + _WRITE_PIECE])
                    cipher = self._outgoing.read()
                self.raw.sendall(cipher)

    # --- the socket's rest ---------------------------------------------------------

    def fileno(self) -> int:
        return self.raw.fileno()

    def settimeout(self, timeout: float | None) -> None:
        self.raw.settimeout(timeout)

    def close_notify(self) -> None:
        """Tells the peer that this side is done (TLS close_notify) when no
        write is under way, without waiting for the socket: a peer that
        stopped reading must not hold up a close."""
        if not self._send_lock.acquire(blocking=False):
            return
        try:
            with self._tls_lock:
                try:
                    self._tls.unwrap()
                except ssl.SSLError:         # SSLWantReadError: the peer's close_notify is not awaited
                    pass
                alert = self._outgoing.read()
            if alert:
                self.raw.send(alert, socket.MSG_DONTWAIT)
        except OSError:
            pass
        finally:
            self._send_lock.release()

    def shutdown(self, how: int) -> None:
        if how != socket.SHUT_RD:
            self.close_notify()
        self.raw.shutdown(how)

    def close(self) -> None:
        self.raw.close()
