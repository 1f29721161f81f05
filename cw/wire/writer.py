"""The writer thread of a blocking link (cw.wire.link): frames posted by
many threads leave in few system calls."""
from __future__ import annotations

import threading
import time

#: Posts closer together than this (seconds) are a burst, sent by the writer thread.
BURST_GAP = 50e-6


class LinkWriter:
    """A thread that sends what other threads post, many frames per system call.

    A small send on loopback costs tens of microseconds, because the kernel
    delivers it to the receiver inside the call.  A client that submits
    thousands of jobs would pay that for each; with this thread the
    submitting thread only pickles and queues, and every send carries all the
    frames queued while the previous one was going out.  ``post`` blocks once
    MAX_PENDING bytes wait, so a master that stops reading still slows the
    submitter down (backpressure) instead of the client's memory growing.
    """

    MAX_PENDING = 16 * 1024 * 1024

    def __init__(self, link, burst_gap: float = BURST_GAP):
        # ``link``: the cw.wire.link.Link whose _send_now does the writing (under its send lock).
        self.link = link
        self.burst_gap = burst_gap
        self.lock = threading.Lock()       # (taken as it is where no wait is needed: a post is hot)
        self.cond = threading.Condition(self.lock)
        self.pending: list = []
        self.pending_bytes = 0
        self.error: OSError | None = None
        self.stopped = False
        self.sending = False
        self.last_post = 0.0
        self.waiters = 0            # threads waiting for room (post) or for all to be sent (drain)
        self.thread = threading.Thread(target=self._run, name="cw-writer", daemon=True)
        self.thread.start()

    def post(self, chunks, direct: bool = True) -> None:
        with self.lock:
            while self.pending_bytes > self.MAX_PENDING and self.error is None and not self.stopped:
                self.waiters += 1
                self.cond.wait()
                self.waiters -= 1
            if self.error is not None:
                raise self.error
            if self.stopped:
                raise OSError(f"the connection to {self.link.address} is closed")
            # Nothing queued or going out, and no post just before (a burst
            # is sent by the writer, many frames per send): send from this
            # thread, with no hand-over to the writer (a lone round trip stays fast).
            direct = direct and not self.pending and not self.sending
            if self.burst_gap:          # (a worker's writer has none: no clock read per post)
                now = time.perf_counter()
                direct = direct and now - self.last_post > self.burst_gap
                self.last_post = now
            if direct:
                self.sending = True
        if direct:
            try:
                self.link._send_now(chunks)
            except OSError as exc:
                with self.lock:
                    self.error = exc
                raise
            finally:
                with self.lock:
                    self.sending = False
                    if self.burst_gap:
                        # The gap to the next post counts from here: a send that takes
                        # longer than the gap (TLS, a slow socket) must not make every
                        # post of a burst look lone, and go out alone.
                        self.last_post = time.perf_counter()
                    if self.pending or self.waiters:   # (a wake-up per job costs as much as the job)
                        self.cond.notify_all()
            return
        with self.lock:
            wake = not self.pending
            for chunk in chunks:
                if type(chunk) is tuple:
                    self.pending.extend(chunk)
                    for part in chunk:
                        self.pending_bytes += len(part)
                else:
                    self.pending.append(chunk)
                    self.pending_bytes += len(chunk)
            if wake:
                self.cond.notify_all()

    def _run(self) -> None:
        while True:
            with self.cond:
                while (not self.pending or self.sending) and not self.stopped:
                    self.cond.wait()   # (while a post sends directly, the order is kept by waiting)
                if self.stopped:
                    return
                batch, self.pending, self.pending_bytes = self.pending, [], 0
                self.sending = True
                if self.waiters:
                    self.cond.notify_all()
            try:
                self.link._send_now(batch)
            except OSError as exc:
                with self.cond:
                    self.error = exc
                    self.sending = False
                    self.cond.notify_all()
                return
            with self.cond:
                self.sending = False
                if self.waiters:
                    self.cond.notify_all()

    def drain(self, timeout: float) -> None:
        """Waits until everything posted so far has been sent (or failed)."""
        with self.cond:
            self.waiters += 1
            try:
                self.cond.wait_for(lambda: not (self.pending or self.sending) or self.error or self.stopped, timeout)
            finally:
                self.waiters -= 1

    def stop(self) -> None:
        with self.cond:
            self.stopped = True
            self.cond.notify_all()
