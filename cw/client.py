"""Clients: ``ClusterExecutor`` (concurrent.futures) and ``ClientThread`` (callbacks).

Both hold one authenticated connection to the master.  Calls are pickled in
the submitting thread and sent at once; a reader thread receives results,
unpickles them and completes the futures.  If the connection breaks, every
pending future fails with ``BrokenCluster`` instead of waiting forever.
"""
from __future__ import annotations

import collections
import concurrent.futures
import itertools
import json
import os
import queue
import sys
import threading
import time
from typing import NamedTuple

from . import PORT, protocol, settings
from .auth import load_secret
from .dispatch import DEFAULT_RETRIES
from .errors import BrokenCluster, CwError, ProtocolError, WorkerLost
from .link import master_timeout, open_link, parse_address, peer_info

DEFAULT_CONNECT_TIMEOUT = settings.CLIENT_CONNECT_TIMEOUT
DEFAULT_MAP_WINDOW = settings.MAP_WINDOW
STATUS_TIMEOUT = settings.STATUS_TIMEOUT
ENV_MASTER = "CW_MASTER"


class WorkerInfo(NamedTuple):
    """The worker that ran a job."""
    host: str
    pid: int

    @classmethod
    def from_label(cls, label: bytes) -> WorkerInfo:
        host, _, pid = label.decode("utf-8", "replace").rpartition(":")
        return cls(host, int(pid) if pid.isdigit() else -1)


def resolve_master(host: str | None, port: int = PORT) -> tuple[str, int]:
    """Where the master is: the given host, else ``$CW_MASTER`` (HOST:PORT, set
    by ``cw.allocate``), else the master of the SLURM cluster ``$CW_CLUSTER``
    (default "default") when one has published its address, else this machine."""
    if host:
        return parse_address(host, port)
    if os.environ.get(ENV_MASTER):
        return parse_address(os.environ[ENV_MASTER], port)
    from . import slurm
    if slurm.address_file(os.environ.get("CW_CLUSTER") or slurm.DEFAULT_NAME).exists() and slurm.available():
        try:
            return slurm.master_address(port=port)
        except LookupError:
            pass
    return "localhost", port


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


class ClusterFuture(concurrent.futures.Future):
    """A future for one job; ``worker`` names the worker that ran it."""

    def __init__(self, executor: ClusterExecutor, jobid: int):
        super().__init__()
        self.jobid = jobid
        self.worker: WorkerInfo | None = None
        self._executor = executor

    def cancel(self) -> bool:
        # Unlike a thread pool, a cw job can be withdrawn until its result is
        # here: the master drops it from its queue, or the result is ignored.
        with self._condition:
            was_pending = self._state == "PENDING"
        if not super().cancel():
            return False
        if was_pending:
            # CANCELLED -> CANCELLED_AND_NOTIFIED, or wait() and as_completed()
            # would never count this future as done.
            self.set_running_or_notify_cancel()
            self._executor._withdraw(self.jobid)
        return True


class ClusterExecutor(concurrent.futures.Executor):
    """Runs calls on a cw cluster.

    ``host=None`` finds the master (see ``resolve_master``).  ``max_retries``
    is how often a job is re-run after its worker died under it (default:
    the master's, 2 re-runs); 0 for jobs that must never run twice.
    """

    def __init__(self, host: str | None = None, port: int = PORT, *,
                 connect_timeout: float = DEFAULT_CONNECT_TIMEOUT, max_retries: int | None = None,
                 timeout: float | None = None):
        self._retries = _check_retries(max_retries)
        self._timeout = _check_timeout(timeout)
        self.host, self.port = resolve_master(host, port)
        self._link = open_link(self.host, self.port, load_secret(), peer_info("client"), connect_timeout)
        self._link.send(protocol.encode_json(protocol.CONTEXT, {"cwd": os.getcwd(), "path": sys.path}))
        self._link.start_writer()
        self._lock = threading.Lock()
        self._pending: dict[int, ClusterFuture] = {}
        self._status_waiters: dict[int, concurrent.futures.Future] = {}
        self._ids = itertools.count(1)
        self._shutdown = False
        self._closing = False
        self._broken: str | None = None
        self._reader = threading.Thread(target=self._read_loop, name="cw-client-reader", daemon=True)
        self._reader.start()

    # --- submitting -----------------------------------------------------------

    def submit(self, fn, /, *args, **kwargs) -> ClusterFuture:
        return self.submit_with(fn, args, kwargs)

    def submit_with(self, fn, args=(), kwargs=None, *, timeout: float | None = None,
                    max_retries: int | None = None) -> ClusterFuture:
        """``submit`` with per-job options (they cannot be keywords of ``submit``
        itself: those go to ``fn``).  ``timeout``: seconds the job may run
        before it is stopped and fails with JobTimeout (default: the
        executor's).  ``max_retries``: re-runs after a worker died under it."""
        from .payload import dumps_call
        retries = self._retries if max_retries is None else _check_retries(max_retries)
        timeout = self._timeout if timeout is None else _check_timeout(timeout)
        try:
            payload = dumps_call(fn, args, kwargs or {})
        except CwError as exc:
            return self._failed_future(exc)
        return self._send_job(payload, retries, timeout)

    def _new_future(self, register: bool = True) -> ClusterFuture:
        with self._lock:
            if self._broken is not None:
                raise BrokenCluster(self._broken)
            if self._shutdown:
                raise RuntimeError("cannot schedule new futures after shutdown")
            future = ClusterFuture(self, next(self._ids))
            if register:
                self._pending[future.jobid] = future
        return future

    def _failed_future(self, exc: BaseException) -> ClusterFuture:
        """A future that failed before it could be sent (its call did not pickle)."""
        future = self._new_future(register=False)
        future.set_exception(exc)
        return future

    def _send_job(self, payload: bytes, retries: int, timeout: float) -> ClusterFuture:
        future = self._new_future()
        try:
            self._link.post(protocol.encode_submit(future.jobid, retries, timeout, payload))
        except OSError as exc:
            self._set_broken(f"lost the connection to the cw master at {self._link.address} ({exc})")
        return future

    def map(self, fn, *iterables, timeout: float | None = None, chunksize: int = 1,
            window: int = DEFAULT_MAP_WINDOW):
        """Like ``Executor.map``, but lazy: at most ``window`` chunks of
        ``chunksize`` calls are in flight, so an endless iterable runs in
        constant memory.  Results come in order."""
        if chunksize < 1:
            raise ValueError("chunksize must be >= 1")
        if window < 1:
            raise ValueError("window must be >= 1")
        from .payload import batch_items, dumps_batch
        deadline = None if timeout is None else time.monotonic() + timeout
        calls = zip(*iterables, strict=False)
        inflight: collections.deque[ClusterFuture] = collections.deque()

        def submit_next() -> bool:
            chunk = list(itertools.islice(calls, chunksize))
            if not chunk:
                return False
            try:
                inflight.append(self._send_job(dumps_batch(fn, chunk), self._retries, self._timeout))
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

        return results()

    def _withdraw(self, jobid: int) -> None:
        with self._lock:
            if self._pending.pop(jobid, None) is None or self._broken is not None:
                return
        try:
            self._link.post(protocol.encode_cancel(jobid))
        except OSError:
            pass  # the reader will see the broken connection
        self._maybe_close()

    # --- the master's answers ---------------------------------------------------

    def _read_loop(self) -> None:
        reason = None
        try:
            while True:
                item = self._link.recv(master_timeout(self._link))
                if item is None:
                    reason = "the master closed the connection"
                    break
                ftype, body = item
                if ftype == protocol.RESULT:
                    self._on_result(*protocol.decode_result(body))
                elif ftype in (protocol.CANCELLED, protocol.PING):
                    pass  # a cancelled future is done already; a PING only shows the master lives
                elif ftype == protocol.STATUS:
                    reqid, status = protocol.decode_status(body)
                    waiter = self._status_waiters.pop(reqid, None)
                    if waiter is not None:
                        waiter.set_result(status)
                elif ftype == protocol.ERROR:
                    reason = "the master dropped this client: " + bytes(body).decode("utf-8", "replace")
                    break
                else:
                    reason = f"the master sent an unexpected {protocol.FRAME_NAMES.get(ftype, ftype)} frame"
                    break
        except (OSError, ProtocolError) as exc:  # TimeoutError included: the master stopped answering
            reason = str(exc) or type(exc).__name__
        except Exception as exc:  # a bug here must fail the futures, not leave them hanging
            reason = f"internal error in the client's reader: {exc!r}"
        if not self._closing:
            self._set_broken(f"lost the connection to the cw master at {self._link.address}: {reason}")

    def _on_result(self, jobid: int, status: int, label: bytes, payload) -> None:
        with self._lock:
            future = self._pending.pop(jobid, None)
        if future is None:
            return  # cancelled meanwhile
        future.worker = WorkerInfo.from_label(label)
        if status == protocol.LOST:
            info = json.loads(bytes(payload))
            ok, value = False, WorkerLost(
                f"job {jobid} was lost with its worker {info['attempts']} time(s) (last on "
                f"{future.worker.host} pid {future.worker.pid}; all: {', '.join(info['workers'])}); "
                "it may crash its worker (out of memory, segfault, os._exit): run it locally to see",
                jobid, info["attempts"], info["workers"])
        else:
            from .payload import load_outcome
            ok, value = load_outcome(status, payload)
        try:
            if ok:
                future.set_result(value)
            else:
                future.set_exception(value)
        except concurrent.futures.InvalidStateError:
            pass  # cancelled by the user at the same moment
        self._maybe_close()

    def _set_broken(self, reason: str) -> None:
        with self._lock:
            if self._broken is not None:
                return
            self._broken = reason
            pending = list(self._pending.values())
            self._pending.clear()
            waiters = list(self._status_waiters.values())
            self._status_waiters.clear()
        for future in pending + waiters:
            try:
                future.set_exception(BrokenCluster(reason))
            except concurrent.futures.InvalidStateError:
                pass

    # --- status and shutdown ------------------------------------------------------

    def status(self, timeout: float = STATUS_TIMEOUT) -> dict:
        """The master's view: connected workers, clients, queued and running jobs."""
        waiter = concurrent.futures.Future()
        with self._lock:
            if self._broken is not None:
                raise BrokenCluster(self._broken)
            reqid = next(self._ids) & 0xFFFFFFFF
            self._status_waiters[reqid] = waiter
        self._link.post(protocol.encode_status_request(reqid))
        try:
            return waiter.result(timeout)
        except concurrent.futures.TimeoutError:
            raise BrokenCluster(f"the master at {self._link.address} did not answer a status "
                                f"request within {timeout:g} s") from None

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
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
        self._link.close()


class ClientThread:
    """The original cluster-workers client: ``callback(jobid, result)`` runs in
    this object's own thread for each job that succeeds; ``wait()`` blocks
    until every submitted job is done and raises the first job's exception."""

    def __init__(self, callback, host: str | None = None, port: int = PORT, **executor_options):
        self.callback = callback
        self.host, self.port = host, port
        self._options = executor_options
        self._executor: ClusterExecutor | None = None
        self._done: queue.SimpleQueue = queue.SimpleQueue()
        self._cond = threading.Condition()
        self._outstanding = 0
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run_callbacks, name="cw-client-callbacks", daemon=True)

    def start(self) -> None:
        self._executor = ClusterExecutor(self.host, self.port, **self._options)
        self._thread.start()

    def submit(self, jobid, func, *args, **kwargs):
        if self._executor is None:
            raise RuntimeError("call start() (or use `with ClientThread(...)`) before submit()")
        with self._cond:
            self._outstanding += 1
        try:
            future = self._executor.submit(func, *args, **kwargs)
        except BaseException:
            with self._cond:
                self._outstanding -= 1
            raise
        future.add_done_callback(lambda f: self._done.put((jobid, f)))
        return jobid

    start_job = submit  # the original's name

    def _run_callbacks(self) -> None:
        while True:
            item = self._done.get()
            if item is None:
                return
            jobid, future = item
            error = None
            if not future.cancelled():
                error = future.exception()
                if error is None:
                    try:
                        self.callback(jobid, future.result())
                    except BaseException as exc:  # noqa: BLE001 - reported by wait()
                        error = exc
            with self._cond:
                self._outstanding -= 1
                if error is not None and self._error is None:
                    self._error = error
                self._cond.notify_all()

    def wait(self) -> None:
        with self._cond:
            self._cond.wait_for(lambda: self._outstanding == 0)
            error, self._error = self._error, None
        if error is not None:
            raise error

    def stop(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._done.put(None)
            if threading.current_thread() is not self._thread:
                self._thread.join()

    def __enter__(self) -> ClientThread:
        self.start()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is None:
                self.wait()
        finally:
            self.stop()
