"""``ClusterExecutor``: a concurrent.futures executor on a cw cluster.

It holds one authenticated connection to the master.  Calls are pickled in
the submitting thread and sent at once; a reader thread receives results,
unpickles them and completes the futures.  The books (which jobs are
unfinished, what the master learnt from this client) are a pure core,
cw.client.core.ClientCore.

If the connection breaks (the master died, was restarted, or the network
failed), the futures stay pending while the reader connects again, to the
master the executor's address names now (a SLURM cluster's address file may
name a new one), for up to ``reconnect_timeout`` seconds; then it gives
that master every unfinished job again.  Jobs submitted meanwhile wait in
the client and go with them.  Only when the window ends does every pending
future fail with ``BrokenCluster``.

``get_executor`` gives the executor a process shares (inside a job: one on
the job's own cluster, see ``set_executor_factory`` and ``JobHooks``).
"""
from __future__ import annotations

import collections
import concurrent.futures
import itertools
import logging
import os
import sys
import threading
import time

from cw import PORT, settings
from cw.client.aio import AsyncSubmit
from cw.client.connection import MasterConnection
from cw.client.core import ClientCore
from cw.client.discovery import resolve_master
from cw.client.everyworker import EveryWorker
from cw.client.future import ClusterFuture, JobHooks
from cw.client.refs import KeptBook, Ref, refuse, take_uses
from cw.errors import BrokenCluster, CwError
from cw.wire import frames, tls
from cw.wire import options as job_options
from cw.wire.auth import load_secret
from cw.wire.frames import Frame
from cw.wire.link import open_link, peer_info
from cw.wire.options import DEFAULT_RETRIES

log = logging.getLogger("cw.client")

DEFAULT_CONNECT_TIMEOUT = settings.CLIENT_CONNECT_TIMEOUT
DEFAULT_RECONNECT_TIMEOUT = settings.CLIENT_RECONNECT_TIMEOUT
DEFAULT_MAP_WINDOW = settings.MAP_WINDOW
STATUS_TIMEOUT = settings.STATUS_TIMEOUT


def _check_retries(max_retries: int | None) -> int:
    if max_retries is None:
        return DEFAULT_RETRIES
    if not 0 <= max_retries < DEFAULT_RETRIES:
        raise ValueError(f"max_retries must be between 0 and {DEFAULT_RETRIES - 1}, not {max_retries}")
    return max_retries


def _check_timeout(timeout: float | None) -> float:
    if timeout is None:
        return 0.0
    if not timeout > 0:
        raise ValueError(f"timeout must be a positive number of seconds, not {timeout!r}")
    return float(timeout)


def scheduling_options(priority=0, resources=None, tag=None, workers=None, threads=None) -> tuple[int, dict]:
    """Checks a job's scheduling options; returns (priority, SUBMIT_WITH options)."""
    return job_options.job_options(priority, resources, tag, workers, threads)


class ClusterExecutor(MasterConnection, EveryWorker, AsyncSubmit, concurrent.futures.Executor):
    """Runs calls on a cw cluster.

    ``host=None`` finds the master (see ``resolve_master``).  ``max_retries``
    is how often a job is re-run after its worker died under it (default:
    the master's, 2 re-runs); 0 for jobs that must never run twice.
    ``reconnect_timeout``: seconds to keep trying to reach a master after
    the connection broke, keeping unfinished futures (default 60; 0 fails
    them at once).  ``job_hooks``: see ``JobHooks`` (given by a worker
    process to the executors of its jobs).  ``tls_cert``, ``tls_key``,
    ``tls_ca``: a site's own TLS files for a ``tls://`` master (default: as
    cw.wire.tls finds them, the cluster's own beside the secret file).
    """

    def __init__(self, host: str | None = None, port: int = PORT, *,
                 connect_timeout: float = DEFAULT_CONNECT_TIMEOUT, max_retries: int | None = None,
                 timeout: float | None = None, weight: float = 1.0, echo: bool = False,
                 reconnect_timeout: float = DEFAULT_RECONNECT_TIMEOUT, job_hooks: JobHooks | None = None,
                 tls_cert: str | None = None, tls_key: str | None = None, tls_ca: str | None = None):
        self._hooks = job_hooks
        self._tls_files = tls.TlsFiles(tls_cert, tls_key, tls_ca)
        self._kept = KeptBook(self)        # put() values and futures passed to jobs (cw.client.refs)
        self._retries = _check_retries(max_retries)
        self._timeout = _check_timeout(timeout)
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not 0 < weight <= 1e6:
            raise ValueError(f"weight must be a number above 0 (a share relative to other clients), not {weight!r}")
        if (isinstance(reconnect_timeout, bool) or not isinstance(reconnect_timeout, (int, float))
                or not 0 <= reconnect_timeout < 1e9):
            raise ValueError("reconnect_timeout must be a number of seconds >= 0 (0: fail at once when the "
                             f"master is lost), not {reconnect_timeout!r}")
        self._echo = echo
        self._reconnect_timeout = float(reconnect_timeout)
        self._address = (host, port)          # resolved again at every reconnection
        # A SLURM cluster still starting (its master job pending) is waited for, as a master is.
        address = resolve_master(host, port, timeout=connect_timeout)
        self.host, self.port = address
        self.tls = address.tls
        self._hello = peer_info("client")
        self._hello["weight"] = weight
        self._core = ClientCore({"cwd": os.getcwd(), "path": sys.path})
        link = self._link = open_link(self.host, self.port, load_secret(), self._hello, connect_timeout,
                                      tls.context_for(address, self._tls_files))
        link.send(self._core.context_frame)
        link.start_writer()
        self._connected = threading.Event()   # set while there is a link to post on
        self._connected.set()
        self._lock = threading.Lock()
        self._function_lock = threading.Lock()
        self._pending: dict[int, ClusterFuture] = {}
        self._status_waiters: dict[int, concurrent.futures.Future] = {}
        self._ids = itertools.count(1)
        self._shutdown = False
        self._closing = False
        self._broken: str | None = None
        self._reader = threading.Thread(target=self._read_loop, name="cw-client-reader", daemon=True)
        self._reader.start()

    # --- submitting -----------------------------------------------------------

    # (cw's scheduling keywords make this wider than Executor.submit's typed signature: hence the ignore)
    def submit(self, fn, /, *args, priority: int = 0, resources: dict | None = None,  # type: ignore[override]
               tag: str | None = None, workers=None, **kwargs) -> ClusterFuture:
        """Runs ``fn(*args, **kwargs)`` on a worker.  The scheduling keywords
        are cw's, not ``fn``'s (use ``submit_with`` for a function that takes
        keywords of those names): ``priority`` (higher first within this
        client's share), ``resources`` ({"cpu": 4, "mem": "8G", "gpu": 1}),
        ``tag`` (see ``limit``), ``workers`` (ids, host names or entries of
        ``workers()`` the job may run on)."""
        if (priority or resources is not None or tag is not None or workers is not None
                or self._hooks is not None):
            return self.submit_with(fn, args, kwargs, priority=priority, resources=resources, tag=tag,
                                    workers=workers)
        try:
            with self._kept:
                payload, function = _pickle_call(fn, args, kwargs)
        except CwError as exc:
            return self._failed_future(exc)
        if function is not None:
            return self._send_named(fn, (args, kwargs), payload, function, self._retries, self._timeout)
        return self._send_job(payload, self._retries, self._timeout)

    def submit_with(self, fn, args=(), kwargs=None, *, timeout: float | None = None,
                    max_retries: int | None = None, priority: int = 0, resources: dict | None = None,
                    tag: str | None = None, workers=None, threads: int | None = None) -> ClusterFuture:
        """``submit`` with every per-job option as a keyword of its own, and
        ``fn``'s arguments passed as ``args`` and ``kwargs``.  ``timeout``:
        seconds the job may run before it is stopped and fails with
        JobTimeout (default: the executor's).  ``max_retries``: re-runs after
        a worker died under it.  ``threads``: its BLAS/OpenMP threads
        (default: as many as its CPUs).  The others: see ``submit``."""
        retries = self._retries if max_retries is None else _check_retries(max_retries)
        timeout = self._timeout if timeout is None else _check_timeout(timeout)
        priority, options = scheduling_options(priority, resources, tag, workers, threads)
        if self._hooks is not None:
            # (The wrapper carries fn as an argument: a job's children send it with each call.)
            fn, args, kwargs, priority = self._hooks.prepare(fn, tuple(args), kwargs or {}, priority)
        try:
            with self._kept:
                payload, function = _pickle_call(fn, args, kwargs or {})
        except CwError as exc:
            return self._failed_future(exc)
        if function is not None:
            return self._send_named(fn, (args, kwargs or {}), payload, function, retries, timeout, priority, options)
        return self._send_job(payload, retries, timeout, priority, options)

    def _new_future(self, register: bool = True) -> ClusterFuture:
        with self._lock:
            if self._broken is not None:
                raise BrokenCluster(self._broken)
            if self._shutdown:
                raise RuntimeError("cannot schedule new futures after shutdown")
            future = ClusterFuture(self, next(self._ids))
            if register:
                self._pending[future.jobid] = future
        if self._hooks is not None:
            self._hooks.adopt(future)
        return future

    def _failed_future(self, exc: BaseException) -> ClusterFuture:
        """A future that failed before it could be sent (its call did not pickle)."""
        future = self._new_future(register=False)
        future.set_exception(exc)
        return future

    def _send_named(self, fn, call, payload, function, retries: int, timeout: float, priority: int = 0,
                    options: dict | None = None) -> ClusterFuture:
        """Sends a job whose payload names ``function`` ((digest, bytes)), after
        the function's FUNC the first time.  ``call``: ``(args, kwargs)``, or
        ``(None, chunk)`` for a map chunk, to pickle the job with its function
        should the master hold too many of this client's functions already.
        Jobs that name functions go one at a time (``_function_lock``): a job
        must never overtake the FUNC of its function, posted by another thread."""
        with self._function_lock:
            with self._lock:
                before = self._core.announce(*function)
                link = self._link
            if before is None:
                from cw.wire.payload import dumps_batch, dumps_call
                args, kwargs = call
                take_uses()
                with self._kept:
                    payload = dumps_batch(fn, kwargs) if args is None else dumps_call(fn, args, kwargs)
                return self._send_job(payload, retries, timeout, priority, options)
            for frame in before:
                self._post(link, frame)
            return self._send_job(payload, retries, timeout, priority, options, function[0])

    def _send_job(self, payload, retries: int, timeout: float, priority: int = 0,
                  options: dict | None = None, digest: bytes | None = None) -> ClusterFuture:
        uses = take_uses()        # Refs and futures its call holds (cw.client.refs), if any
        if uses is not None:
            refuse(uses, self)
        future = self._new_future()
        deps = None
        if uses is not None:
            deps = self._kept.admit(future, uses)
            if deps is None:
                return future      # a dependency failed or was cancelled: so did this job
        if self._hooks is not None:
            context = self._hooks.context_change()
            if context is not None:
                with self._lock:
                    self._core.context_frame = frames.encode_json(Frame.CONTEXT, context)
                    link = self._link
                self._post(link, self._core.context_frame)
        with self._lock:
            frame = self._core.submit(future.jobid, retries, timeout, payload, priority, options, digest)
            link = self._link     # None while reconnecting: the job goes with the resubmission
            if deps is not None:
                self._core.deps[future.jobid] = deps
        if deps is not None:
            self._post(link, deps)     # (just before its SUBMIT: the master holds the job back)
        if type(payload) is tuple and _views_writable_memory(payload):
            self._post(link, frame, wait=True)   # the array as it is now, not as it will be
        else:
            self._post(link, frame)
        return future

    def _post_setup(self, frame) -> None:
        """A sticky setup job: kept, so that a new master learns it too."""
        with self._lock:
            self._core.setup(frame)
            link = self._link
        self._post(link, frame)

    def map(self, fn, *iterables, timeout: float | None = None, chunksize: int = 1,
            window: int = DEFAULT_MAP_WINDOW, priority: int = 0, resources: dict | None = None,
            tag: str | None = None, workers=None, progress: bool = False):
        """Like ``Executor.map``, but lazy: at most ``window`` chunks of
        ``chunksize`` calls are in flight, so an endless iterable runs in
        constant memory.  Results come in order.  The scheduling options are
        ``submit``'s, for every chunk; ``progress=True`` shows a progress
        display on a terminal (see ``cw.progress``)."""
        if chunksize < 1:
            raise ValueError("chunksize must be >= 1")
        if window < 1:
            raise ValueError("window must be >= 1")
        priority, options = scheduling_options(priority, resources, tag, workers)
        total = None
        if progress:
            lengths = [len(it) for it in iterables if hasattr(it, "__len__")]
            total = min(lengths) if len(lengths) == len(iterables) and lengths else None
        from cw.wire.payload import batch_items
        deadline = None if timeout is None else time.monotonic() + timeout
        calls = zip(*iterables, strict=False)
        inflight: collections.deque[ClusterFuture] = collections.deque()

        def submit_next() -> bool:
            chunk = list(itertools.islice(calls, chunksize))
            if not chunk:
                return False
            try:
                with self._kept:
                    payload, function = _pickle_batch(fn, chunk)
                if function is not None:
                    inflight.append(self._send_named(fn, (None, chunk), payload, function, self._retries,
                                                     self._timeout, priority, options))
                else:
                    inflight.append(self._send_job(payload, self._retries, self._timeout, priority, options))
            except CwError as exc:
                inflight.append(self._failed_future(exc))
            return True

        while len(inflight) < window and submit_next():
            pass

        def results():
            try:
                while inflight:
                    future = inflight[0]
                    remaining = None if deadline is None else deadline - time.monotonic()
                    outcomes = future.result(remaining)
                    inflight.popleft()
                    submit_next()
                    for ok, value in batch_items(outcomes):
                        if not ok:
                            raise value
                        yield value
            finally:
                for future in inflight:
                    future.cancel()

        if progress:
            from cw.client.progress import track
            return track(results(), total=total)
        return results()

    def put(self, obj, *, broadcast: bool = False, timeout: float = 600.0) -> Ref:
        """Sends ``obj`` to the master once and returns a ``Ref`` to pass to
        jobs in its place: each worker machine gets the bytes at most once,
        and its worker processes share them.  ``broadcast=True`` sends them
        to every worker machine now, and to those that join later.  Raises
        KeptValueError when the master refuses it (see its ``--kept-bytes``).
        Keep the Ref while jobs use it; ``ref.release()`` (or dropping it)
        lets the master forget the value.  Jobs should not change the value
        they get: a worker's jobs share one copy (arrays come read-only)."""
        return self._kept.put(obj, broadcast, timeout)

    def _withdraw(self, jobid: int) -> None:
        with self._lock:
            if self._pending.pop(jobid, None) is None or self._broken is not None:
                return
            # Out of the books too: a master reached again later must not get it back (its function
            # may be forgotten by then).
            frame = self._core.cancel(jobid)
            link = self._link       # None while reconnecting: nothing to tell
        if frame is not None:
            self._post(link, frame)
        self._maybe_close()

    # --- the master's answers ---------------------------------------------------

    # --- status and shutdown ------------------------------------------------------

    def status(self, timeout: float = STATUS_TIMEOUT) -> dict:
        """The master's view: connected workers, clients, queued and running jobs."""
        waiter: concurrent.futures.Future[dict] = concurrent.futures.Future()
        start = time.monotonic()
        self._connected.wait(timeout)      # while reconnecting, wait for a master (within the timeout)
        with self._lock:
            if self._broken is not None:
                raise BrokenCluster(self._broken)
            reqid = next(self._ids) & 0xFFFFFFFF
            self._status_waiters[reqid] = waiter
            frame = self._core.status_request(reqid)
            link = self._link
        self._post(link, frame)
        try:
            return waiter.result(max(0.0, timeout - (time.monotonic() - start)))
        except concurrent.futures.TimeoutError:
            with self._lock:
                self._status_waiters.pop(reqid, None)
            raise BrokenCluster(f"the master at {self._link_address} did not answer a status "
                                f"request within {timeout:g} s") from None

    def limit(self, tag: str, limit: int | None) -> None:
        """At most ``limit`` jobs submitted with ``tag=tag`` run at once, across
        the cluster and every client; ``None`` lifts the limit.  The limit
        lives in the master until changed (by any client)."""
        tag, limit = job_options.check_tag(tag), job_options.check_limit(limit)
        with self._lock:
            frame = self._core.limit(tag, limit)
            link = self._link
        self._post(link, frame)

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        self._stop_submitter()       # what submit_async was given goes in first
        with self._lock:
            self._shutdown = True
            pending = list(self._pending.values())
        if cancel_futures:
            # Newest first: the CANCELs of queued jobs then reach the master
            # before those of running ones, so a worker freed by an abort
            # cannot pick up a job whose CANCEL is still on its way.
            for future in reversed(pending):
                future.cancel()
        if wait:
            concurrent.futures.wait(pending)
        self._maybe_close()
        if wait and threading.current_thread() is not self._reader:
            self._reader.join()

    def _maybe_close(self) -> None:
        """Closes the connection once shut down and nothing is pending."""
        with self._lock:
            if not self._shutdown or self._pending or self._closing:
                return
            self._closing = True
            link = self._link
        self._connected.set()       # a status() waiting for a reconnection stops waiting
        if link is not None:
            link.close()


_picklers = None


def _load_picklers():
    """cw.wire.payload and the function cache, imported on first use (they
    load cloudpickle), then kept: an import statement per job costs ~1 us."""
    global _picklers
    from cw.client.functions import FUNCTIONS
    from cw.wire import payload
    _picklers = (FUNCTIONS.lookup, payload)
    return _picklers


def _pickle_call(fn, args, kwargs):
    """``(payload, function)``: ``function`` is ``(digest, bytes)`` when the
    payload names a function sent once (see cw.client.functions), else None."""
    lookup, payload = _picklers or _load_picklers()
    try:
        function = lookup(fn)
    except Exception:  # noqa: BLE001 - it does not pickle: dumps_call says why
        function = None
    if function is None:
        return payload.dumps_call(fn, args, kwargs), None
    return payload.dumps_call_named(fn, function[0], args, kwargs), function


def _pickle_batch(fn, chunk):
    """``_pickle_call`` for a chunk of ``map`` calls."""
    lookup, payload = _picklers or _load_picklers()
    try:
        function = lookup(fn)
    except Exception:  # noqa: BLE001
        function = None
    if function is None:
        return payload.dumps_batch(fn, chunk), None
    return payload.dumps_batch_named(fn, function[0], chunk), function


def _views_writable_memory(payload) -> bool:
    from cw.wire.payload import views_writable_memory  # (cw.payload loads cloudpickle: only when needed)
    return views_writable_memory(payload)


_executor_lock = threading.Lock()
_shared_executor: ClusterExecutor | None = None
_executor_factory = None


def set_executor_factory(factory) -> None:
    """How ``get_executor`` makes its executor (a worker process sets one that
    connects to its own master)."""
    global _executor_factory, _shared_executor
    with _executor_lock:
        _executor_factory = factory
        _shared_executor = None


def get_executor() -> ClusterExecutor:
    """An executor on "this" cluster, shared by the process: inside a job, the
    cluster running the job (its futures are the job's children: waiting on
    them lends the worker to other jobs, and the ones still unfinished when
    the job ends are cancelled); elsewhere, ``ClusterExecutor()``."""
    global _shared_executor
    with _executor_lock:
        executor = _shared_executor
        if executor is None or executor._broken is not None or executor._shutdown:
            executor = _shared_executor = (_executor_factory or ClusterExecutor)()
        return executor
