"""cw from asyncio programs.

``await future`` works on every ``ClusterFuture`` (``ClusterFuture.__await__``):
the job's completion reaches the event loop as a callback the client's
reader thread schedules on it, so a thousand awaits cost no thread.
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


def await_future(future):
    """``ClusterFuture.__await__``: the job's outcome, awaited on the running loop."""
    return asyncio.wrap_future(future).__await__()
