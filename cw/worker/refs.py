"""A worker's kept values (puts, futures passed as arguments): what a job's
stand-ins resolve to while its payload is unpickled (cw.wire.kept.resolve).

Where a value comes from, first found first:
- this process's memo of big values already unpickled (later jobs share
  the object: arrays come read-only, from the shared file below);
- small values the master sent just before the job (KEPT before JOB);
- the machine's cache: one file per value in a private directory
  (``$CW_KEPT_DIR``, else ``/dev/shm/cw-kept-UID``), mapped, not copied, so
  the worker processes of one machine share the memory;
- else the master: FETCH, under a lock on the value's file, so that of the
  processes of one machine one fetches and the others then read its file:
  the bytes reach each machine once.

The reader thread takes KEPT, KEPT_GONE and DROP frames (``on_frame``): it
writes a value's file itself (it never takes the lock: the runner that
holds it may be waiting for exactly that frame) and wakes the runner.  DROP
(the value was released) removes the file and forgets the memo.  Each
worker process that uses the cache holds a shared lock on its ``.users``
file; the last one to exit normally (it gets the lock alone) empties the
cache, so values a master had no time to drop (the cluster stopped right
after its client left) do not outlive the workers.  A worker killed
(SIGKILL) cannot: remove the directory when no worker runs.
"""
from __future__ import annotations

import atexit
import fcntl
import logging
import mmap
import os
import tempfile
import threading
from collections import OrderedDict

from cw.errors import KeptValueError
from cw.wire import kept as wire
from cw.wire.frames import Frame
from cw.wire.payload import loads

log = logging.getLogger("cw.worker")

#: Seconds a job waits for a value it fetched before it fails, and between its looks at the connection.
FETCH_TIMEOUT = 600.0
POLL = 1.0
#: Small values kept in memory (they come with jobs): bytes, and how many.
SMALL_BYTES = 64 * 1024 * 1024
SMALL_ENTRIES = 4096
#: Big values kept unpickled by a process for its next jobs.
MEMO_ENTRIES = 16
#: Values at most this big are not written to the machine's cache.
FILE_MIN = 64 * 1024

FRAMES = frozenset({Frame.KEPT, Frame.KEPT_GONE, Frame.DROP})


def cache_dir() -> str:
    path = os.environ.get("CW_KEPT_DIR")
    if not path:
        base = "/dev/shm" if os.access("/dev/shm", os.W_OK) else tempfile.gettempdir()
        path = os.path.join(base, f"cw-kept-{os.getuid()}")
    os.makedirs(path, mode=0o700, exist_ok=True)
    return path


class _Wait:
    __slots__ = ("error", "event")

    def __init__(self):
        self.event = threading.Event()
        self.error: str | None = None


class WorkerRefs:
    def __init__(self):
        self.link = None
        self.core = None            # the session's WorkerCore: a job stops waiting once it lost the master
        self.lock = threading.Lock()
        self.waits: dict[int, _Wait] = {}
        self.small: OrderedDict[int, bytes] = OrderedDict()
        self.small_bytes = 0
        self.memo: OrderedDict[int, object] = OrderedDict()
        self.in_memory: dict[int, bytes] = {}      # big values whose file could not be written
        self._dir: str | None = None
        self.fetches = 0                           # FETCHes sent by this process (tests read it)

    @property
    def dir(self) -> str:
        if self._dir is None:
            path = cache_dir()
            users = os.open(os.path.join(path, ".users"), os.O_CREAT | os.O_RDWR, 0o600)
            fcntl.flock(users, fcntl.LOCK_SH)      # this process uses the cache (see the module's docstring)
            atexit.register(_empty_if_last, path, users)
            self._dir = path
        return self._dir

    def attach(self, link, core=None) -> None:
        """A new connection to a master: jobs waiting on the old one fail."""
        with self.lock:
            self.link = link
            self.core = core
            waits, self.waits = self.waits, {}
        for wait in waits.values():
            wait.error = "the connection to the master was lost while this job fetched it"
            wait.event.set()

    def _path(self, key: int) -> str:
        return os.path.join(self.dir, f"{key:016x}")

    # --- a job's stand-in ---------------------------------------------------------

    def resolve(self, key: int):
        value = self.memo.get(key, _NONE)
        if value is not _NONE:
            return value
        data = self.small.get(key)
        if data is None:
            data = self.in_memory.get(key)
        if data is not None:
            return loads(data)
        path = self._path(key)
        if not os.path.exists(path):
            self._fetch_for_machine(key, path)
            data = self.small.get(key)
            if data is None:
                data = self.in_memory.get(key)
            if data is not None:
                return loads(data)
        return self._load_file(key, path)

    def _fetch_for_machine(self, key: int, path: str) -> None:
        fd = os.open(path + ".lock", os.O_CREAT | os.O_RDWR, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)    # another process of this machine may be fetching it
            if not os.path.exists(path):
                self._fetch(key)
        finally:
            os.close(fd)

    def _fetch(self, key: int) -> None:
        wait = _Wait()
        with self.lock:
            link = self.link
            self.waits[key] = wait
        if link is None:
            raise KeptValueError(f"kept value {key:#x} is needed but this worker has no master")
        self.fetches += 1
        link.post(wire.encode_key(Frame.FETCH, key))
        core, waited = self.core, 0.0
        while not wait.event.wait(POLL):
            waited += POLL
            lost = core is not None and (core.lost or core.over)
            if lost or waited >= FETCH_TIMEOUT:
                with self.lock:
                    self.waits.pop(key, None)
                raise KeptValueError(f"kept value {key:#x} did not come: " + (
                    "the connection to the master was lost" if lost else f"not within {FETCH_TIMEOUT:g} s"))
        if wait.error is not None:
            raise KeptValueError(f"kept value {key:#x} cannot be had: {wait.error}")

    def _load_file(self, key: int, path: str):
        try:
            with open(path, "rb") as f:
                view = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        except FileNotFoundError:
            raise KeptValueError(f"kept value {key:#x} left this machine's cache ({path}) before the job "
                                 "read it: it was released") from None
        value = loads(view)
        self.memo[key] = value
        while len(self.memo) > MEMO_ENTRIES:
            self.memo.popitem(last=False)
        return value

    # --- frames from the master (the reader thread) ------------------------------------

    def on_frame(self, ftype: int, body) -> None:
        if ftype == Frame.KEPT:
            key, data = wire.decode_kept(body)
            self._keep(key, data)
            wait = self.waits.pop(key, None)
        elif ftype == Frame.KEPT_GONE:
            key, text = wire.decode_key(body, "KEPT_GONE")
            wait = self.waits.pop(key, None)
            if wait is not None:
                wait.error = text
        else:
            key, _ = wire.decode_key(body, "DROP")
            self._drop(key)
            return
        if wait is not None:
            wait.event.set()

    def _keep(self, key: int, data) -> None:
        if len(data) <= FILE_MIN:
            if key not in self.small:
                self.small[key] = bytes(data)
                self.small_bytes += len(data)
                while len(self.small) > SMALL_ENTRIES or self.small_bytes > SMALL_BYTES:
                    self.small_bytes -= len(self.small.popitem(last=False)[1])
            return
        path = self._path(key)
        if os.path.exists(path):
            return
        tmp = f"{path}.{os.getpid()}.{threading.get_ident()}"
        try:
            with open(tmp, "wb") as f:
                f.write(data)
            os.rename(tmp, path)          # whole or not there: readers never see a part
        except OSError as exc:
            log.warning("cannot write kept value %#x to %s (%s); it stays in this process's memory", key, path, exc)
            try:
                os.unlink(tmp)
            except OSError:
                pass
            self.in_memory[key] = bytes(data)

    def _drop(self, key: int) -> None:
        self.memo.pop(key, None)
        self.in_memory.pop(key, None)
        data = self.small.pop(key, None)
        if data is not None:
            self.small_bytes -= len(data)
        path = self._path(key)
        for name in (path, path + ".lock"):
            try:
                os.unlink(name)
            except FileNotFoundError:
                pass


_NONE = object()


def _empty_if_last(path: str, users: int) -> None:
    """At exit: the last process of this machine using the cache empties it."""
    try:
        fcntl.flock(users, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return                      # another worker process still uses it
    for name in os.listdir(path):
        if name != ".users":
            try:
                os.unlink(os.path.join(path, name))
            except OSError:
                pass

#: The process's kept values.
REFS = WorkerRefs()
wire.install(REFS.resolve)


def on_frame(core, ftype: int, body) -> list:
    """A kept-value frame as a WorkerCore event (see cw.worker.core.decode): no actions."""
    REFS.on_frame(ftype, body)
    return []
