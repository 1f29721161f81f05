"""A worker's functions sent once (FUNC frames): digest -> FunctionEntry,
the least recently used dropped beyond a bound.  Kept across connections
(a new master sends what it thinks is missing; the worker asks, NEED, for
what it lacks).  Nothing here unpickles: a job's runner unpickles an
entry's bytes the first time a job calls it (cw.wire.payload.load_function),
and later jobs share that function object.  So, as with a function
imported from a module, its globals persist from one job to the next on a
worker: a job that changes a global of its function's module (``__main__``
of the client, recreated on the worker) changes it for the next job there.
"""
from __future__ import annotations

import os
from collections import OrderedDict

from cw import settings


class FunctionEntry:
    """A function's pickled bytes, and the function once unpickled."""

    __slots__ = ("data", "func")

    def __init__(self, data: bytes):
        self.data = data
        self.func = None


class FunctionLRU:
    def __init__(self, max_entries: int | None = None):
        if max_entries is None:
            max_entries = int(os.environ.get("CW_WORKER_FUNCTIONS", settings.WORKER_FUNCTIONS))
        self.max_entries = max(1, max_entries)
        self.entries: OrderedDict[bytes, FunctionEntry] = OrderedDict()

    def get(self, digest: bytes) -> FunctionEntry | None:
        entry = self.entries.get(digest)
        if entry is not None:
            self.entries.move_to_end(digest)
        return entry

    def put(self, digest: bytes, data: bytes) -> FunctionEntry:
        entry = self.entries.get(digest)
        if entry is None:
            entry = self.entries[digest] = FunctionEntry(data)
            while len(self.entries) > self.max_entries:
                self.entries.popitem(last=False)
        else:
            self.entries.move_to_end(digest)
        return entry
