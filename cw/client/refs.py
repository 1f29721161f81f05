"""Refs and futures as job arguments: the client's side (issue 14).

``executor.put(obj)`` pickles ``obj`` once, sends the bytes once to the
master (PUT, answered by PUT_ACK) and returns a ``Ref``.  A Ref, or a
``ClusterFuture`` of the same executor, passed to a job (``submit``,
``submit_with``, ``map``; at the top level of the arguments or nested in
lists, dicts, tuples, or held by a lambda or closure the job calls) reaches
the job as its value: it pickles as a stand-in that the worker resolves
(cw.wire.kept.resolve, cw.worker.refs), and the job's SUBMIT follows a DEPS
frame naming what it uses, so the master holds it until the values are there.

A future already done when the job is submitted travels as its result
(a failed one fails the job at once with DependencyFailed, a cancelled one
cancels it).  A pending one names its job's outcome, which the master keeps
for it.  When the master no longer has that outcome (the job ended before
the dependent came, or a new master took over) it asks (MISSING), and the
reader thread PUTs the future's outcome, pickled again from the value here.

Lifetimes: a Ref's value is released by ``ref.release()`` or when the Ref is
garbage-collected; a future's kept outcome when the future is collected.
The master keeps either while a job that names it is unfinished.  The PUT
frames of live Refs are kept (they view the object's buffers rather than
copy them) and sent again to a new master with the unfinished jobs.
"""
from __future__ import annotations

import collections
import concurrent.futures
import os
import threading
import weakref

from cw.errors import DependencyFailed, KeptValueError
from cw.wire import frames
from cw.wire import kept as wire
from cw.wire.frames import Frame, Status

__all__ = ["Ref"]

_local = threading.local()


class _Uses:
    """What pickling one job's call met: kept keys, pending futures, finished failures."""

    __slots__ = ("cancelled", "deps", "failed", "foreign", "futures", "released")

    def __init__(self):
        self.deps: dict[int, int] = {}     # key -> job id (0 for a put)
        self.futures: dict[int, object] = {}
        self.failed: list = []
        self.cancelled: list = []
        self.foreign: list = []
        self.released: list = []


def _uses() -> _Uses:
    uses = getattr(_local, "uses", None)
    if uses is None:
        uses = _local.uses = _Uses()
    return uses


def take_uses() -> _Uses | None:
    """What the call just pickled on this thread uses (None: nothing); cleared."""
    uses = getattr(_local, "uses", None)
    if uses is not None:
        _local.uses = None
    return uses


def seen() -> int:
    """How many Refs and futures were pickled on this thread since the last take (see cw.client.functions)."""
    uses = getattr(_local, "uses", None)
    return 0 if uses is None else len(uses.deps) + len(uses.failed) + len(uses.cancelled) + len(uses.foreign)


class Ref:
    """A value kept by the master (``executor.put``): pass it to jobs in
    place of the value.  ``release()`` lets the master drop it once the jobs
    using it are done (so does garbage collection of the Ref)."""

    __slots__ = ("__weakref__", "_book", "_finalizer", "key", "size")

    def __init__(self, book: KeptBook, key: int, size: int):
        self._book = book
        self.key = key
        self.size = size                 # bytes of its pickle
        self._finalizer = weakref.finalize(self, book.release_key, key)

    @property
    def released(self) -> bool:
        return not self._finalizer.alive

    def release(self) -> None:
        """Jobs submitted from now on may not use it; the master drops it once those before are done."""
        self._finalizer()
        self._book.flush_releases()

    def __reduce__(self):
        book = _book_of_thread()
        if book is None:
            raise TypeError(_ONLY_AS_ARGUMENT.format(what="a cw.Ref"))
        uses = _uses()
        if self._book is not book:
            uses.foreign.append(self)
        elif self.released:
            uses.released.append(self)
        else:
            uses.deps[self.key] = 0
        return wire.resolve, (self.key,)

    def __repr__(self) -> str:
        return f"<cw.Ref {self.key:#018x}, {self.size} bytes{', released' if self.released else ''}>"


def _book_of_thread():
    return getattr(_local, "book", None)


_ONLY_AS_ARGUMENT = ("{what} can only be pickled as an argument of a job (submit, submit_with, map) of a "
                     "ClusterExecutor; elsewhere, pass its value")


def reduce_future(future):
    """How a ClusterFuture pickles: as its job's outcome (see the module's docstring)."""
    book = _book_of_thread()
    if book is None:
        raise TypeError(_ONLY_AS_ARGUMENT.format(what="a ClusterFuture"))
    uses = _uses()
    if future._executor is not book.executor:
        uses.foreign.append(future)
        return wire.value, (None,)
    if future.done():
        if future.cancelled():
            uses.cancelled.append(future)
        elif future.exception() is not None:
            uses.failed.append(future)
        else:
            return wire.value, (future.result(),)
        return wire.value, (None,)
    key = book.key_of(future)
    uses.deps[key] = future.jobid
    uses.futures[key] = future
    return wire.resolve, (key,)


class KeptBook:
    """An executor's kept values: its Refs' keys, its futures' keys, the
    answers it waits for."""

    def __init__(self, executor):
        self.executor = executor
        self.futures: weakref.WeakValueDictionary = weakref.WeakValueDictionary()   # key -> future
        self.acks: dict[int, concurrent.futures.Future] = {}
        # Keys of Refs and futures collected: a finalizer may run inside the garbage
        # collector, on any thread, holding any lock (the executor's too), so it only
        # notes the key; RELEASE_KEY goes out later (flush_releases: at the next put,
        # job that uses kept values, explicit release, or the master's next ping).
        self.to_release: collections.deque = collections.deque()

    def __enter__(self):
        """Pickling a call of this executor: Refs and futures met are this thread's."""
        _local.book = self
        _local.uses = None
        return self

    def __exit__(self, *exc):
        _local.book = None
        if exc[0] is not None:
            _local.uses = None

    @staticmethod
    def new_key() -> int:
        return int.from_bytes(os.urandom(8), "big") | 1

    def key_of(self, future) -> int:
        key = getattr(future, "_kept_key", None)
        if key is None:
            key = future._kept_key = self.new_key()
            self.futures[key] = future
            weakref.finalize(future, self.release_key, key)
        return key

    # --- put and release ---------------------------------------------------------

    def put(self, obj, broadcast: bool, timeout: float | None) -> Ref:
        from cw.wire import payload
        try:
            data = payload.dumps(obj)
        except (Exception, SystemExit) as exc:
            raise KeptValueError(f"cannot pickle the value given to put() ({type(exc).__name__}: {exc}); "
                                 "put values that pickle") from exc
        size = len(data) if type(data) is not tuple else sum(len(c) for c in data)
        key = self.new_key()
        frame = wire.encode_put(key, Status.OK, broadcast, data)
        ack: concurrent.futures.Future = concurrent.futures.Future()
        self.flush_releases()
        ex = self.executor
        with ex._lock:
            if ex._broken is not None or ex._shutdown:
                raise RuntimeError("cannot put values after shutdown" if ex._shutdown else ex._broken)
            self.acks[key] = ack
            ex._core.kept[key] = frame
            link = ex._link
        ex._post(link, frame, wait=payload.views_writable_memory(data))
        try:
            refused = ack.result(timeout)
        except concurrent.futures.TimeoutError:
            self._forget(key)
            raise KeptValueError(f"the master did not confirm a put of {size} bytes within {timeout:g} s") from None
        finally:
            self.acks.pop(key, None)
        if refused:
            self._forget(key)
            raise KeptValueError(f"put() of {size} bytes refused: {refused}")
        return Ref(self, key, size)

    def _forget(self, key: int) -> None:
        with self.executor._lock:
            self.executor._core.kept.pop(key, None)

    def release_key(self, key: int) -> None:
        """A Ref's or a future's finalizer (see ``to_release``)."""
        self.to_release.append(key)

    def flush_releases(self) -> None:
        """Tells the master the keys let go of since the last time."""
        ex = self.executor
        while self.to_release:
            key = self.to_release.popleft()
            with ex._lock:
                ex._core.kept.pop(key, None)
                link = None if ex._broken is not None or ex._closing else ex._link
            ex._post(link, wire.encode_key(Frame.RELEASE_KEY, key))

    # --- a job that uses kept values ------------------------------------------------

    def admit(self, future, uses: _Uses) -> bytes | None:
        """The DEPS frame of a job about to be sent, or None when the job ends
        here (a dependency failed or was cancelled: ``future`` is done)."""
        if uses.failed:
            dep = uses.failed[0]
            exc = dep.exception()
            err = DependencyFailed(f"job {future.jobid} did not run: job {dep.jobid}, whose future it takes as "
                                   f"an argument, failed with {type(exc).__name__}: {exc}", dep.jobid)
            err.__cause__ = exc
            self._end(future, err)
            return None
        if uses.cancelled:
            self._end(future, None)
            return None
        self.flush_releases()
        future._waits_for = tuple(uses.futures.values())
        if future._waits_for:
            future.add_done_callback(_let_go)
        return wire.encode_deps(future.jobid, uses.deps.items())

    def _end(self, future, exc) -> None:
        with self.executor._lock:
            self.executor._pending.pop(future.jobid, None)
        if exc is None:
            future.cancel()
        else:
            future.set_exception(exc)

    # --- the master's frames ------------------------------------------------------------

    def on_frame(self, ftype: int, body) -> None:
        """PUT_ACK or MISSING, on the reader thread."""
        key, text = wire.decode_key(body, frames.kind_name(ftype))
        if ftype == Frame.PUT_ACK:
            ack = self.acks.get(key)
            if ack is not None and not ack.done():
                ack.set_result(text)
        elif ftype == Frame.MISSING:
            self._answer(key)
        else:
            from cw.errors import ProtocolError
            raise ProtocolError(f"the master sent an unexpected {frames.kind_name(ftype)} frame")

    def _answer(self, key: int) -> None:
        """The master lacks a finished future's outcome: PUT it."""
        from cw.wire import payload
        future = self.futures.get(key)
        if future is None or not future.done():
            status, data = Status.KEPT_ERROR, (f"the future of kept value {key:#x} is gone from its "
                                               "client").encode()
        elif future.cancelled():
            status, data = Status.DEPENDENCY_CANCELLED, wire.cancelled_payload(future.jobid)
        elif future.exception() is not None:
            status, data = payload.error_outcome(future.exception())
            data = payload.joined(data)
        else:
            try:
                status, data = Status.OK, payload.dumps(future.result())
            except (Exception, SystemExit) as exc:
                status, data = payload.error_outcome(exc)
        ex = self.executor
        with ex._lock:
            link = ex._link
        ex._post(link, wire.encode_put(key, status, False, data), wait=payload.views_writable_memory(data))


def refuse(uses: _Uses, executor) -> None:
    """Refuses a call holding another executor's Refs or futures, or a released Ref."""
    if uses.foreign:
        raise ValueError(f"{uses.foreign[0]!r} belongs to another executor: a Ref or a future can only be "
                         f"passed to jobs of the executor that made it (this one talks to the master at "
                         f"{executor.host}:{executor.port}); pass the value itself instead")
    if uses.released:
        raise KeptValueError(f"{uses.released[0]!r} was released (ref.release()); jobs can no longer use it: "
                             "put() the value again")


def _let_go(future) -> None:
    future._waits_for = ()


def dependency_outcome(jobid: int, status: int, data):
    """(False, exception) of a RESULT the master made for a job that did not run."""
    if status == Status.KEPT_ERROR:
        return False, KeptValueError(f"job {jobid} did not run: {bytes(data).decode('utf-8', 'replace')}")
    if status == Status.DEPENDENCY_CANCELLED:
        dep = wire.decode_cancelled_payload(data)
        return False, concurrent.futures.CancelledError(f"job {jobid} was cancelled: job {dep}, whose future it "
                                                        "takes as an argument, was cancelled")
    dep, dep_status, dep_data = wire.decode_dependency(data)
    if dep_status >= Status.DEPENDENCY:
        _, exc = dependency_outcome(dep, dep_status, dep_data)
    else:
        from cw.client.future import WorkerInfo, job_outcome
        _, exc = job_outcome(dep, dep_status, WorkerInfo("?", -1), dep_data)
    err = DependencyFailed(f"job {jobid} did not run: job {dep}, whose future it takes as an argument, failed "
                           f"with {type(exc).__name__}: {exc}", dep)
    err.__cause__ = exc
    return False, err


def job_state(future) -> str:
    """"running", "waiting" (held by the master for futures or Refs it takes) or "queued"."""
    executor, jobid = future._executor, future.jobid
    link = executor._link
    me = link.welcome.get("id") if link is not None else None
    status = executor.status()
    if any(jobid in w.get("current_jobs", {}).get(str(me), []) for w in status["workers"]):
        return "running"
    held = status.get("kept", {}).get("waiting", [])   # (the first 100 held jobs)
    if any(h["client"] == me and h["job"] == jobid for h in held) or any(not f.done() for f in future.waits_for):
        return "waiting"
    return "queued"
