"""The master's kept values, and the jobs held back until theirs are there.

A kept value is a pickled value held once, as bytes the master never
unpickles, under a key its client chose (cw.wire.kept): a ``put``, or the
outcome of a job whose future another job of its client takes as an
argument.  Rules kept here:

- A job whose SUBMIT follows a DEPS frame is *held* (state "waiting") until
  every key it names is here; then it is submitted like any job, so
  priorities, resources, tags and fair share apply to it as to others.
- A key named with a job id is that job's outcome: kept when the job ends
  (``finished``).  A key whose job this master does not know (it ended
  before the dependent came, or the master restarted) is asked of the client
  (MISSING), which PUTs the future's outcome.  A put's key not here (the
  client released it) fails the job with KEPT_ERROR.
- A dependency that failed fails the job (DEPENDENCY, carrying the failed
  job's id and outcome); one cancelled cancels it (DEPENDENCY_CANCELLED);
  so on down a chain.
- Every job held or submitted pins the keys it names.  A key leaves when
  its client released it (RELEASE_KEY: the Ref or the future was collected
  or released) and no job pins it, or when its client leaves.  Workers that
  fetched it are then told to drop it (DROP).
- The bytes kept are bounded (``limit``, the master's ``--kept-bytes``).
  A put beyond it is refused (PUT_ACK says why; ``put`` raises).  A job
  outcome beyond it is not kept: its dependents fail with KEPT_ERROR.
  Failing rather than waiting: a waiting put could wait for ever on values
  that only its own client can release.
- Values of at most ``PUSH_MAX`` bytes go to a worker with the job that uses
  them (KEPT before JOB); bigger ones the worker fetches (FETCH), once per
  machine (the worker processes of a machine share a cache, cw.worker.refs).
  A broadcast put goes to one worker of every machine at once, and of every
  machine that joins later.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from cw import settings
from cw.wire import frames
from cw.wire import kept as wire
from cw.wire.frames import Frame, Status

if TYPE_CHECKING:
    from cw.master.dispatch import Dispatcher

#: Values at most this big travel with the jobs that use them.
PUSH_MAX = 64 * 1024
#: Keys remembered as pushed to one worker (a hint: it fetches what it lacks).
MAX_KNOWN_PER_WORKER = 4096
_MASTER_LABEL = b"master:0"


class Entry:
    __slots__ = ("data", "jobid", "nodes", "owner", "status")

    def __init__(self, owner: int, status: int, data: bytes, jobid: int):
        self.owner = owner            # the client whose key it is
        self.status = status          # Status.OK, or how the job it stands for ended
        self.data = data
        self.jobid = jobid            # the job whose outcome it is (0: a put, or not known)
        self.nodes: set = set()       # machines (placement node keys) it was sent to whole


class Held:
    """A job waiting for kept values: its SUBMIT's fields, and the keys not here yet."""

    __slots__ = ("args", "deps", "missing")

    def __init__(self, args: tuple, deps: list):
        self.args = args              # (jobid, retries, timeout, payload[, priority, options])
        self.deps = deps              # [(key, dependency's job id or 0)]
        self.missing: set = set()


class KeptValues:
    def __init__(self, d: Dispatcher, limit: int = settings.KEPT_BYTES):
        self.d = d
        self.limit = limit
        self.bytes = 0
        self.entries: dict[int, Entry] = {}
        self.deps: dict[tuple, list] = {}      # (cid, jobid) -> DEPS, until its SUBMIT comes
        self.held: dict[tuple, Held] = {}      # (cid, jobid) -> a job waiting for kept values
        self.waiters: dict[int, set] = {}      # key -> (cid, jobid) of held jobs waiting for it
        self.wanted: dict[tuple, int] = {}     # (cid, jobid) of a job -> key its outcome is kept under
        self.coming: set[int] = set()          # the keys of self.wanted
        self.uses: dict[tuple, list] = {}      # (cid, jobid) -> keys it pins (held or submitted)
        self.pins: dict[int, int] = {}         # key -> jobs pinning it
        self.released: set[int] = set()        # keys their client let go (they leave once unpinned)
        self.asked: set[int] = set()           # keys asked of their client (MISSING)
        self.broadcast: set[int] = set()
        self.known: dict[int, set] = {}        # wid -> keys pushed to it
        self.fetched = 0                       # FETCHes answered (for status and tests)

    # --- jobs that name kept values -------------------------------------------

    def hold(self, cid: int, args: tuple) -> bool:
        """A SUBMIT's fields: True when the job is held here (it followed a DEPS)."""
        deps = self.deps.pop((cid, args[0]), None) if self.deps else None
        if deps is None:
            return False
        jobid = args[0]
        me = (cid, jobid)
        held = self.held[me] = Held(args, deps)
        self.uses[me] = keys = list({key for key, _ in deps})
        for key in keys:
            self.pins[key] = self.pins.get(key, 0) + 1
        client = self.d.clients[cid]
        for key, dep in deps:
            if key in self.entries or key in held.missing:
                continue
            if not dep:
                self._conclude(cid, jobid, Status.KEPT_ERROR, (
                    f"job {jobid} uses a value put with put() that the master does not hold: it was released "
                    "(ref.release(), or its Ref was garbage-collected) or refused; keep the Ref while jobs "
                    "use it").encode())
                return True
            held.missing.add(key)
            self.waiters.setdefault(key, set()).add(me)
            if (cid, dep) in self.held or dep in client.jobs:
                self.wanted[(cid, dep)] = key
                self.coming.add(key)
            elif key not in self.asked:
                self.asked.add(key)
                self.d.outbox.append((cid, wire.encode_key(Frame.MISSING, key)))
        self._check(cid, jobid)
        return True

    def _check(self, cid: int, jobid: int) -> None:
        """A held job whose keys may all be here: fail, cancel or submit it."""
        held = self.held.get((cid, jobid))
        if held is None:
            return
        for key, dep in held.deps:
            entry = self.entries.get(key)
            if entry is None or entry.status == Status.OK:
                continue
            if entry.status == Status.DEPENDENCY_CANCELLED:
                self._conclude(cid, jobid, Status.DEPENDENCY_CANCELLED, wire.cancelled_payload(dep))
            elif entry.status == Status.KEPT_ERROR:
                self._conclude(cid, jobid, Status.KEPT_ERROR, entry.data)
            else:
                self._conclude(cid, jobid, Status.DEPENDENCY, wire.dependency_payload(dep, entry.status, entry.data))
            return
        if held.missing:
            return
        del self.held[(cid, jobid)]
        self.d.submit(cid, *held.args)

    def _conclude(self, cid: int, jobid: int, status: int, payload: bytes) -> None:
        """A held job ends without running."""
        self.held.pop((cid, jobid), None)
        self.d.outbox.append((cid, frames.encode_result(jobid, status, _MASTER_LABEL, payload)))
        self.finished(cid, jobid, status, payload)

    def finished(self, cid: int, jobid: int, status: int, payload) -> None:
        """Job ``jobid`` of client ``cid`` ended (its RESULT is on its way, or it was cancelled)."""
        me = (cid, jobid)
        keys = self.uses.pop(me, None)
        if keys is not None:
            for key in keys:
                pins = self.pins[key] - 1
                if pins:
                    self.pins[key] = pins
                else:
                    del self.pins[key]
                    self._maybe_drop(key)
        key = self.wanted.pop(me, None)
        if key is not None:
            self.coming.discard(key)
            self._store(cid, key, status, payload, jobid)

    def cancel(self, cid: int, jobid: int) -> bool:
        """The client cancels a job: True when it was held here (and is no more)."""
        if (cid, jobid) not in self.held:
            return False
        del self.held[(cid, jobid)]
        self.d.outbox.append((cid, frames.encode_cancelled(jobid, True)))
        self.finished(cid, jobid, Status.DEPENDENCY_CANCELLED, wire.cancelled_payload(jobid))
        return True

    # --- values ----------------------------------------------------------------

    def put(self, cid: int, put: wire.Put) -> None:
        """A client's PUT: a value of its ``put()`` (answered with PUT_ACK), or
        a finished future's outcome the master asked for (MISSING)."""
        key = put.key
        if key in self.asked:
            self.asked.discard(key)
            self._store(cid, key, put.status, put.payload, 0)
            return
        if key in self.entries:
            self.d.outbox.append((cid, wire.encode_key(Frame.PUT_ACK, key)))
            return
        if self.bytes + len(put.payload) > self.limit:
            self.d.outbox.append((cid, wire.encode_key(Frame.PUT_ACK, key, self._full(len(put.payload)))))
            return
        self._store(cid, key, put.status, put.payload, 0)
        self.d.outbox.append((cid, wire.encode_key(Frame.PUT_ACK, key)))
        if put.broadcast:
            self.broadcast.add(key)
            for worker in self.d.workers.values():
                self._send_whole(worker, key)

    def _full(self, size: int) -> str:
        return (f"the master's memory for kept values is full: {self.bytes} of {self.limit} bytes (--kept-bytes) "
                f"are held, and this value has {size}; release Refs you no longer need (ref.release()), or "
                "start the master with a larger --kept-bytes")

    def _store(self, cid: int, key: int, status: int, payload, jobid: int) -> None:
        if key in self.entries or cid not in self.d.clients:
            return
        data = payload if len(payload) >= frames.LARGE_FRAME else bytes(payload)   # (see wire.kept._kept_bytes)
        if self.bytes + len(data) > self.limit:
            status, data = Status.KEPT_ERROR, (
                f"the outcome of job {jobid} was not kept for the jobs that take its future: "
                + self._full(len(data))).encode()
        self.entries[key] = Entry(cid, status, data, jobid)
        self.bytes += len(data)
        for cid_jobid in self.waiters.pop(key, ()):
            held = self.held.get(cid_jobid)
            if held is not None:
                held.missing.discard(key)
                self._check(*cid_jobid)
        self._maybe_drop(key)

    def release(self, cid: int, key: int) -> None:
        """RELEASE_KEY: the client's Ref or future of ``key`` is gone."""
        entry = self.entries.get(key)
        if entry is not None and entry.owner != cid:
            return
        self.released.add(key)
        self.broadcast.discard(key)
        self._maybe_drop(key)

    def _maybe_drop(self, key: int) -> None:
        if key not in self.released or key in self.pins or key in self.waiters:
            return
        if key in self.coming:
            return            # (rare: a job still running whose outcome nothing will use; kept when it ends)
        self.released.discard(key)
        entry = self.entries.pop(key, None)
        if entry is not None:
            self._forget(key, entry)

    def _forget(self, key: int, entry: Entry) -> None:
        self.bytes -= len(entry.data)
        if entry.nodes:
            drop = wire.encode_key(Frame.DROP, key)
            self.d.outbox += [(wid, drop) for wid in self.d.workers]

    # --- workers -------------------------------------------------------------

    def before_job(self, worker, cid: int, jobid: int) -> None:
        """Small values a job uses go to its worker just before it."""
        keys = self.uses.get((cid, jobid))
        if not keys:
            return
        known = self.known.setdefault(worker.wid, set())
        for key in keys:
            entry = self.entries.get(key)
            if entry is None or len(entry.data) > PUSH_MAX or key in known:
                continue
            if len(known) >= MAX_KNOWN_PER_WORKER:
                known.clear()
            known.add(key)
            self.d.outbox.append((worker.wid, wire.encode_kept(key, entry.data)))

    def fetch(self, wid: int, key: int) -> None:
        """A worker's FETCH: the value, or why not."""
        worker = self.d.workers[wid]
        entry = self.entries.get(key)
        if entry is None or entry.status != Status.OK:
            self.d.outbox.append((wid, wire.encode_key(Frame.KEPT_GONE, key, (
                f"the master does not hold kept value {key:#x} any more (its client released it or left)"))))
            return
        self.fetched += 1
        entry.nodes.add(worker.node.key)
        self.d.outbox.append((wid, wire.encode_kept(key, entry.data)))

    def _send_whole(self, worker, key: int) -> None:
        entry = self.entries.get(key)
        if entry is not None and worker.node.key not in entry.nodes:
            entry.nodes.add(worker.node.key)
            self.d.outbox.append((worker.wid, wire.encode_kept(key, entry.data)))

    def worker_joined(self, worker) -> None:
        for key in self.broadcast:
            self._send_whole(worker, key)

    def worker_left(self, wid: int) -> None:
        self.known.pop(wid, None)

    def drop_client(self, cid: int) -> None:
        """The client left: its held jobs, its keys and its values go."""
        for me in [me for me in self.held if me[0] == cid]:
            del self.held[me]
        for me in [me for me in self.deps if me[0] == cid]:
            del self.deps[me]
        for me in [me for me in self.wanted if me[0] == cid]:
            self.coming.discard(self.wanted.pop(me))
        for me in [me for me in self.uses if me[0] == cid]:
            self.finished(*me, Status.DEPENDENCY_CANCELLED, b"")
        for key in [key for key, entry in self.entries.items() if entry.owner == cid]:
            self.released.discard(key)
            self.broadcast.discard(key)
            self._forget(key, self.entries.pop(key))
        for key in [key for key, waiting in self.waiters.items() if all(me[0] == cid for me in waiting)]:
            del self.waiters[key]
            self.asked.discard(key)

    # --- status ----------------------------------------------------------------

    def report(self, most: int = 100) -> dict:
        waiting = []
        for (cid, jobid), held in list(self.held.items())[:most]:
            waiting.append({"client": cid, "job": jobid,
                            "waits_for": sorted({dep for key, dep in held.deps if key in held.missing})})
        return {"values": len(self.entries), "bytes": self.bytes, "limit": self.limit, "held_jobs": len(self.held),
                "waiting": waiting, "fetched": self.fetched}


_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_size(text: str) -> int:
    """``--kept-bytes``: a number of bytes, with an optional K, M, G or T (powers of 1024)."""
    value = str(text).strip().upper().removesuffix("B").removesuffix("I")
    number, unit = (value[:-1], value[-1]) if value[-1:] in _UNITS else (value, "")
    try:
        size = int(float(number) * _UNITS[unit])
    except (ValueError, KeyError):
        raise ValueError(f"{text!r} is not a size: write bytes, or a number with K, M, G or T (as 512M)") from None
    if size < 0:
        raise ValueError(f"{text!r} is not a size: it must not be negative")
    return size
