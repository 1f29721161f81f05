"""Reuse of the big buffers that large frames are received into.

Fresh memory is slow: the kernel hands it out a page (4 KiB) at a time, on
first touch, and on the machines we measure that costs more than copying the
same bytes into memory already touched (60 ms against 12 ms for 100 MB).  A
large frame is received into a buffer of its own (see
``decoder.FrameDecoder``); this pool hands out buffers that earlier frames
no longer use, so a stream of big arguments or results touches fresh memory
once instead of once per frame.

A buffer is free again when nothing refers to it but the pool: the frame's
payload was sent on, its job finished, and no unpickled object (a numpy array
reconstructed from an out-of-band buffer) views it.  Free buffers are given
back to the system once unused for ``idle`` seconds, and the pool holds on to
at most ``keep`` bytes of buffers (in use or free; a buffer beyond that is
not pooled), so a process does not stay big after one big transfer.
"""
from __future__ import annotations

import sys
import threading
import time

#: Most bytes of buffers (in use or free) the pool of a process holds on to.
KEEP = 512 * 1024 * 1024
#: Seconds a free buffer is kept without being reused.
IDLE = 20.0


class BufferPool:
    def __init__(self, keep: int = KEEP, idle: float = IDLE):
        self.keep = keep
        self.idle = idle
        self._lock = threading.Lock()   # a client's or worker's threads share the pool
        self._buffers: list[list] = []  # [bytearray, last handed out (monotonic)]

    def get(self, size: int) -> memoryview:
        """A writable view of ``size`` bytes, from a free buffer of at most
        twice that size (a big buffer is not tied up by a small frame), or new."""
        now = time.monotonic()
        with self._lock:
            self._release_idle(now)
            for entry in self._buffers:
                if size <= len(entry[0]) <= 2 * size and _is_free(entry):
                    entry[1] = now
                    return memoryview(entry[0])[:size]
            buf = bytearray(size)
            self._make_room(size)
            if self._tracked() + size <= self.keep:
                self._buffers.append([buf, now])
            return memoryview(buf)[:size]

    def release_idle(self) -> None:
        """Gives back buffers unused for ``idle`` seconds (call it now and then)."""
        with self._lock:
            self._release_idle(time.monotonic())

    @property
    def free_bytes(self) -> int:
        with self._lock:
            return sum(len(e[0]) for e in self._buffers if _is_free(e))

    def _tracked(self) -> int:
        return sum(len(e[0]) for e in self._buffers)

    def _release_idle(self, now: float) -> None:
        if self._buffers:
            self._buffers = [e for e in self._buffers if now - e[1] < self.idle or not _is_free(e)]

    def _make_room(self, size: int) -> None:
        # Forgets free buffers, the longest unused first, until ``size`` more
        # fits under ``keep``.  Buffers in use stay: they are free again soon.
        excess = self._tracked() + size - self.keep
        if excess <= 0:
            return
        for entry in sorted((e for e in self._buffers if _is_free(e)), key=lambda e: e[1]):
            self._buffers.remove(entry)
            excess -= len(entry[0])
            if excess <= 0:
                return


def _is_free(entry: list) -> bool:
    # The buffer is referred to only by its entry (and this call's argument):
    # every view of it (a memoryview holds its buffer) is gone.
    return sys.getrefcount(entry[0]) <= 2


#: The pool of this process.
POOL = BufferPool()
