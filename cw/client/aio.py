"""cw from asyncio programs.

``await future`` works on every ``ClusterFuture`` (``ClusterFuture.__await__``):
the job's completion reaches the event loop as a callback the client's
reader thread schedules on it, so a thousand awaits cost no thread, and the
jobs that finish while the loop is busy reach it in one wake-up (_LoopRelay).
Cancelling the awaiting task cancels the job (as ``future.cancel()``
does: a queued job is dropped, a running one aborted).

Which calls may block the loop: the constructor (it connects), ``submit``
(when the connection's send backlog is full, or while an argument that
views writable memory, such as a numpy array, is being sent), iterating
``map``'s results, ``status``, ``workers``, ``run_on_all``, ``install``
and ``shutdown(wait=True)``.  ``AsyncSubmit`` gives the async forms of
``submit`` and of leaving an ``async with`` block; any other blocking call
goes through ``asyncio.to_thread``.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import threading
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from cw.client.future import ClusterFuture


class AsyncSubmit:
    """Mixed into ClusterExecutor: ``submit_async`` and ``async with``."""

    _async_pool: concurrent.futures.ThreadPoolExecutor | None = None
    _async_pool_lock = threading.Lock()

    if TYPE_CHECKING:       # what the executor gives this mixin
        def submit(self, fn: Callable, /, *args: Any, **kwargs: Any) -> ClusterFuture: ...
        def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None: ...

    async def submit_async(self, fn: Callable, /, *args: Any, **kwargs: Any) -> ClusterFuture:
        """``submit`` without blocking the event loop: returns the job's
        ``ClusterFuture`` (await it for the result).  Jobs keep the order in
        which ``submit_async`` was called: one thread per executor submits
        them in turn, and only while a ``submit`` would block does the loop
        wait for it."""
        pool = self._submitter()
        return await asyncio.get_running_loop().run_in_executor(pool, lambda: self.submit(fn, *args, **kwargs))

    def _submitter(self) -> concurrent.futures.ThreadPoolExecutor:
        with self._async_pool_lock:
            if self._async_pool is None:
                self._async_pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="cw-submit")
            return self._async_pool

    def _stop_submitter(self) -> None:
        with self._async_pool_lock:
            pool, self._async_pool = self._async_pool, None
        if pool is not None:
            pool.shutdown(wait=True)

    async def __aenter__(self):
        return self

    async def __aexit__(self, exc_type, exc, tb) -> None:
        # shutdown(wait=True) waits for every job: in a thread, not on the loop.
        await asyncio.to_thread(self.shutdown, True)


class _LoopRelay:
    """Hands finished jobs to one event loop, all that finished since its last
    wake-up at once.  (``asyncio.wrap_future`` wakes the loop through its
    self-pipe for each one: a system call and a wake-up per job, which an
    ``await``ed stream of small jobs pays with its throughput.)"""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = weakref.ref(loop)    # (a strong one would keep the loop's entry in _relays for ever)
        self.lock = threading.Lock()
        self.ready: list = []            # (job's future, the loop's future), finished
        self.scheduled = False           # a drain is on its way to the loop

    def finished(self, job, waiter) -> None:
        """The job's done callback, on whichever thread finished it."""
        with self.lock:
            self.ready.append((job, waiter))
            if self.scheduled:
                return
            self.scheduled = True
        loop = self.loop()
        try:
            if loop is not None:
                loop.call_soon_threadsafe(self.drain)
        except RuntimeError:             # the loop is closed: nobody awaits any more
            pass

    def drain(self) -> None:
        with self.lock:
            ready, self.ready, self.scheduled = self.ready, [], False
        for job, waiter in ready:
            if waiter.done():            # the awaiting task was cancelled meanwhile
                continue
            if job.cancelled():
                waiter.cancel()
            elif (exc := job.exception()) is not None:
                waiter.set_exception(exc)
            else:
                waiter.set_result(job.result())


_relays: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def await_future(future):
    """``ClusterFuture.__await__``: the job's outcome, awaited on the running loop."""
    loop = asyncio.get_running_loop()
    relay = _relays.get(loop)
    if relay is None:
        relay = _relays[loop] = _LoopRelay(loop)
    waiter = loop.create_future()
    # Cancelling the awaiting task cancels the job (dropped if queued, aborted if running).
    waiter.add_done_callback(lambda w: future.cancel() if w.cancelled() else None)
    future.add_done_callback(lambda job: relay.finished(job, waiter))
    return waiter.__await__()
