"""The functions clients sent once (FUNC), which their jobs name by digest.

The master keeps each function's frame, as bytes it never unpickles, while
a connected client holds it: from its FUNC until it says FORGET or leaves.
A client forgets a function only once none of its unfinished jobs names it
(cw.client.core), so every job at a worker whose client still wants it has
its function here: a worker that lacks one (it restarted, its cache evicted
it, it reconnected) asks for it (NEED) and gets it.  A client that sends
functions beyond its bounds is dropped with an error saying so: it hurts
only itself.  Two clients sending the same function share one copy.
"""
from __future__ import annotations

import hashlib

from cw.errors import ProtocolError
from cw.wire import frames

#: Functions one client may make the master hold, and their bytes (the client
#: keeps below these, see cw.client.core.ClientCore.MAX_FUNCTIONS).
MAX_PER_CLIENT = 1024
MAX_BYTES_PER_CLIENT = 512 * 1024 * 1024
#: Digests remembered as sent to one worker (only a hint: it asks for what it lacks).
MAX_KNOWN_PER_WORKER = 4096


class FunctionStore:
    def __init__(self, max_per_client: int = MAX_PER_CLIENT, max_bytes_per_client: int = MAX_BYTES_PER_CLIENT):
        self.max_per_client = max_per_client
        self.max_bytes_per_client = max_bytes_per_client
        self.frames: dict[bytes, bytes] = {}          # digest -> FUNC frame for workers
        self.holders: dict[bytes, int] = {}           # digest -> clients holding it
        self.by_client: dict[int, dict[bytes, int]] = {}   # cid -> {digest: bytes}
        self.sent = 0                                 # FUNC frames sent to workers
        self.needed = 0                               # NEEDs answered

    def add(self, cid: int, digest: bytes, data: bytes) -> None:
        """Client ``cid`` sent a function (again: nothing changes)."""
        held = self.by_client.setdefault(cid, {})
        if digest in held:
            return
        if hashlib.blake2b(data, digest_size=frames.DIGEST_SIZE).digest() != digest:
            raise ProtocolError("FUNC frame's digest does not match its function's bytes; the client's cw "
                                "differs from the master's: install the same version on both")
        size = len(data)
        if len(held) >= self.max_per_client or sum(held.values()) + size > self.max_bytes_per_client:
            raise ProtocolError(
                f"the client made the master hold more than {self.max_per_client} functions or "
                f"{self.max_bytes_per_client >> 20} MiB of them (FUNC without FORGET); a cw client keeps "
                "below these bounds: update the client's cw, or submit fewer distinct functions at once")
        held[digest] = size
        if digest not in self.frames:
            self.frames[digest] = frames.encode_function(digest, data)
            self.holders[digest] = 0
        self.holders[digest] += 1

    def forget(self, cid: int, digest: bytes) -> None:
        """Client ``cid`` names ``digest`` no more (unknown: nothing to do)."""
        held = self.by_client.get(cid)
        if held is not None and held.pop(digest, None) is not None:
            self._release(digest)

    def drop_client(self, cid: int) -> None:
        for digest in self.by_client.pop(cid, {}):
            self._release(digest)

    def _release(self, digest: bytes) -> None:
        holders = self.holders[digest] - 1
        if holders:
            self.holders[digest] = holders
        else:
            del self.holders[digest]
            del self.frames[digest]

    def for_worker(self, known: set, digest: bytes) -> bytes | None:
        """The FUNC frame to send a worker before a job naming ``digest``, or
        None when it had it (``known``: the digests it was sent, kept up to date)."""
        if digest in known:
            return None
        if len(known) >= MAX_KNOWN_PER_WORKER:
            known.clear()
        known.add(digest)
        self.sent += 1
        return self.frames[digest]      # (a job at a worker names a function its client holds)

    def needed_by(self, known: set, digest: bytes) -> bytes | None:
        """The FUNC frame answering a worker's NEED, or None when no client holds it any more."""
        frame = self.frames.get(digest)
        if frame is not None:
            self.needed += 1
            if len(known) >= MAX_KNOWN_PER_WORKER:
                known.clear()
            known.add(digest)
        return frame

    def held_by(self, cid: int) -> dict:
        """The digests client ``cid`` holds (a dict kept up to date, to keep at
        hand: a job naming a function is checked against it)."""
        return self.by_client.setdefault(cid, {})

    def report(self) -> dict:
        return {"held": len(self.frames), "bytes": sum(len(f) for f in self.frames.values()),
                "sent_to_workers": self.sent, "needs_answered": self.needed}
