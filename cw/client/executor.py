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
import logging
import os
import queue
import sys
import threading
import time
from typing import NamedTuple

from cw import PORT, settings
from cw.errors import BrokenCluster, CwError, ProtocolError, Unplaceable, WorkerLost
from cw.wire import buffers, protocol
from cw.wire import options as job_options
from cw.wire.auth import load_secret
from cw.wire.link import master_timeout, open_link, parse_address, peer_info
from cw.wire.options import DEFAULT_RETRIES

log = logging.getLogger("cw.client")

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


class WorkerDescription(NamedTuple):
    """A connected worker, as ``ClusterExecutor.workers()`` lists it.  Pass it
    (or its ``id``) in ``workers=[...]`` to run a job on that worker."""
    id: int
    host: str
    pid: int
    node: str | None
    resources: dict
    state: str
    jobs_done: int

    @property
    def info(self) -> WorkerInfo:
        return WorkerInfo(self.host, self.pid)

    def __hash__(self) -> int:      # resources is a dict: hash by the worker's id
        return hash(self.id)


def resolve_master(host: str | None, port: int = PORT) -> tuple[str, int]:
    """Where the master is: the given host, else ``$CW_MASTER`` (HOST:PORT, set
    by ``cw.allocate``), else the master of the SLURM cluster ``$CW_CLUSTER``
    (default "default") when one has published its address, else this machine."""
    if host:
        return parse_address(host, port)
    if os.environ.get(ENV_MASTER):
        return parse_address(os.environ[ENV_MASTER], port)
    from cw.launch import slurm
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


def scheduling_options(priority=0, resources=None, tag=None, workers=None) -> tuple[int, dict]:
    """Checks a job's scheduling options; returns (priority, SUBMIT_WITH options)."""
    return job_options.job_options(priority, resources, tag, workers)


class JobHooks:
    """How an executor inside a running job ties the jobs it submits to that
    job.  A worker process gives one to the executor ``get_executor()``
    returns in its jobs (see cw.worker.session.NestedJobHooks); elsewhere
    there is none.  Each method's default does nothing."""

    def prepare(self, fn, args: tuple, kwargs: dict, priority: int) -> tuple:
        """The call and priority to submit instead of ``fn(*args, **kwargs)``
        at ``priority``: returns (fn, args, kwargs, priority)."""
        return fn, args, kwargs, priority

    def context_change(self) -> dict | None:
        """The working directory and path to send before the next job
        ({"cwd", "path"}) when they changed since the last one, else None."""
        return None

    def adopt(self, future: ClusterFuture) -> None:
        """A future this executor made: a child of the running job."""

    def wait(self, future: ClusterFuture, timeout: float | None) -> None:
        """Called when the running job waits on ``future``, before the
        waiting itself; returns when the future is done or after
        ``timeout`` seconds (a worker runs other jobs meanwhile)."""


class ClusterFuture(concurrent.futures.Future):
    """A future for one job; ``worker`` names the worker that ran it;
    ``notice`` says why it waits, if the master said so."""

    def __init__(self, executor: ClusterExecutor, jobid: int):
        super().__init__()
        self.jobid = jobid
        self.worker: WorkerInfo | None = None
        self.notice: str | None = None
        self.submitted_at = time.time()
        self.finished_at: float | None = None
        self._output = ""
        self._executor = executor

    def output(self, timeout=None) -> str:
        """What the job printed (stdout, stderr, logging records), once it is
        done; "" when nothing.  Bounded: see settings.MAX_JOB_OUTPUT."""
        concurrent.futures.wait([self], timeout)
        if not self.done():
            raise TimeoutError(f"job {self.jobid} is not done after {timeout} s")
        return self._output

    @property
    def state(self) -> str:
        """"queued", "running", "done", "failed" or "cancelled".  For a job not
        done yet this asks the master (a round trip)."""
        if self.cancelled():
            return "cancelled"
        if self.done():
            return "failed" if self.exception() is not None else "done"
        return "running" if self.jobid in self._executor._running_jobids() else "queued"

    def result(self, timeout=None):
        return super().result(self._help(timeout))

    def exception(self, timeout=None):
        return super().exception(self._help(timeout))

    def _help(self, timeout):
        """Inside a job, waiting lends the worker (see JobHooks.wait); returns the time left."""
        hooks = self._executor._hooks
        if hooks is None or self.done():
            return timeout
        start = time.monotonic()
        hooks.wait(self, timeout)
        return None if timeout is None else max(0.0, timeout - (time.monotonic() - start))

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
    ``job_hooks``: see ``JobHooks`` (given by a worker process to the
    executors of its jobs).
    """

    def __init__(self, host: str | None = None, port: int = PORT, *,
                 connect_timeout: float = DEFAULT_CONNECT_TIMEOUT, max_retries: int | None = None,
                 timeout: float | None = None, weight: float = 1.0, echo: bool = False,
                 job_hooks: JobHooks | None = None):
        self._hooks = job_hooks
        self._retries = _check_retries(max_retries)
        self._timeout = _check_timeout(timeout)
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not 0 < weight <= 1e6:
            raise ValueError(f"weight must be a number above 0 (a share relative to other clients), not {weight!r}")
        self._echo = echo
        self.host, self.port = resolve_master(host, port)
        info = peer_info("client")
        info["weight"] = weight
        self._link = open_link(self.host, self.port, load_secret(), info, connect_timeout)
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

    def submit(self, fn, /, *args, priority: int = 0, resources: dict | None = None, tag: str | None = None,
               workers=None, **kwargs) -> ClusterFuture:
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
        from cw.wire.payload import dumps_call
        try:
            payload = dumps_call(fn, args, kwargs)
        except CwError as exc:
            return self._failed_future(exc)
        return self._send_job(payload, self._retries, self._timeout)

    def submit_with(self, fn, args=(), kwargs=None, *, timeout: float | None = None,
                    max_retries: int | None = None, priority: int = 0, resources: dict | None = None,
                    tag: str | None = None, workers=None) -> ClusterFuture:
        """``submit`` with every per-job option as a keyword of its own, and
        ``fn``'s arguments passed as ``args`` and ``kwargs``.  ``timeout``:
        seconds the job may run before it is stopped and fails with
        JobTimeout (default: the executor's).  ``max_retries``: re-runs after
        a worker died under it.  The others: see ``submit``."""
        from cw.wire.payload import dumps_call
        retries = self._retries if max_retries is None else _check_retries(max_retries)
        timeout = self._timeout if timeout is None else _check_timeout(timeout)
        priority, options = scheduling_options(priority, resources, tag, workers)
        if self._hooks is not None:
            fn, args, kwargs, priority = self._hooks.prepare(fn, tuple(args), kwargs or {}, priority)
        try:
            payload = dumps_call(fn, args, kwargs or {})
        except CwError as exc:
            return self._failed_future(exc)
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

    def _send_job(self, payload, retries: int, timeout: float, priority: int = 0,
                  options: dict | None = None) -> ClusterFuture:
        future = self._new_future()
        if self._hooks is not None:
            context = self._hooks.context_change()
            if context is not None:
                self._link.post(protocol.encode_json(protocol.CONTEXT, context))
        if priority or options:
            frame = protocol.encode_submit_with(future.jobid, retries, timeout, priority, options, payload)
        else:
            frame = protocol.encode_submit(future.jobid, retries, timeout, payload)
        try:
            if type(payload) is tuple and _views_writable_memory(payload):
                self._link.post_and_wait(frame, timeout=None)   # the array as it is now, not as it will be
            else:
                self._link.post(frame)
        except OSError as exc:
            self._set_broken(f"lost the connection to the cw master at {self._link.address} ({exc})")
        return future

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
        from cw.wire.payload import batch_items, dumps_batch
        deadline = None if timeout is None else time.monotonic() + timeout
        calls = zip(*iterables, strict=False)
        inflight: collections.deque[ClusterFuture] = collections.deque()

        def submit_next() -> bool:
            chunk = list(itertools.islice(calls, chunksize))
            if not chunk:
                return False
            try:
                inflight.append(self._send_job(dumps_batch(fn, chunk), self._retries, self._timeout,
                                               priority, options))
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
            from cw.ops.tracking import track
            return track(results(), total=total)
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
                elif ftype == protocol.OUTPUT:
                    self._on_output(*protocol.decode_output_for_client(body))
                elif ftype == protocol.NOTICE:
                    self._on_notice(*protocol.decode_notice(body))
                elif ftype == protocol.PING:
                    buffers.POOL.release_idle()   # (a PING shows the master lives; it comes every few seconds)
                elif ftype == protocol.CANCELLED:
                    pass  # a cancelled future is done already
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
        future.finished_at = time.time()
        if status == protocol.UNPLACEABLE:
            info = json.loads(bytes(payload))
            ok, value = False, Unplaceable(
                f"job {jobid} could not run: {info['reason']}, and no worker that could joined within "
                f"{info['waited']:g} s; start workers with what it needs (python -m cw.worker --resources ...), "
                "ask for less, or raise the master's --unplaceable-timeout")
            future.worker = None
        elif status == protocol.LOST:
            info = json.loads(bytes(payload))
            ok, value = False, WorkerLost(
                f"job {jobid} was lost with its worker {info['attempts']} time(s) (last on "
                f"{future.worker.host} pid {future.worker.pid}; all: {', '.join(info['workers'])}); "
                "it may crash its worker (out of memory, segfault, os._exit): run it locally to see",
                jobid, info["attempts"], info["workers"])
        else:
            from cw.wire.payload import load_outcome
            ok, value = load_outcome(status, payload)
        try:
            if ok:
                future.set_result(value)
            else:
                future.set_exception(value)
        except concurrent.futures.InvalidStateError:
            pass  # cancelled by the user at the same moment
        self._maybe_close()

    def _on_output(self, jobid: int, label: bytes, text: str) -> None:
        with self._lock:
            future = self._pending.get(jobid)
        if future is not None:
            future._output = text
        if self._echo:
            prefix = f"[job {jobid} on {label.decode('utf-8', 'replace')}] "
            lines = text.splitlines()
            sys.stderr.write("".join(prefix + line + "\n" for line in lines))
            sys.stderr.flush()

    def _running_jobids(self) -> set:
        me = self._link.welcome.get("id")
        status = self.status()
        return {job for w in status["workers"] for job in w.get("current_jobs", {}).get(str(me), [])}

    def _on_notice(self, jobid: int, text: str) -> None:
        with self._lock:
            future = self._pending.get(jobid)
        if future is not None:
            future.notice = text
        log.warning("cw: job %d cannot run yet: %s", jobid, text)

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

    def limit(self, tag: str, limit: int | None) -> None:
        """At most ``limit`` jobs submitted with ``tag=tag`` run at once, across
        the cluster and every client; ``None`` lifts the limit.  The limit
        lives in the master until changed (by any client)."""
        tag, limit = job_options.check_tag(tag), job_options.check_limit(limit)
        self._link.post(protocol.encode_json(protocol.LIMIT, {"tag": tag, "limit": limit}))

    def workers(self, timeout: float = STATUS_TIMEOUT) -> list[WorkerDescription]:
        """The workers connected now (one per worker process)."""
        return [WorkerDescription(w["id"], w.get("host"), w.get("pid"), w.get("node"), w.get("resources") or {},
                                  w.get("state"), w.get("jobs_done", 0))
                for w in self.status(timeout)["workers"]]

    def submit_on_all(self, fn, /, *args, **kwargs) -> dict[WorkerInfo, ClusterFuture]:
        """Submits ``fn(*args, **kwargs)`` once for every connected worker, each
        pinned to its worker (it runs after the jobs the worker holds);
        returns {WorkerInfo(host, pid): future}.  A worker that leaves first
        fails its job with Unplaceable."""
        return {w.info: self.submit_with(fn, args, kwargs, workers=[w.id], max_retries=0) for w in self.workers()}

    def run_on_all(self, fn, /, *args, **kwargs) -> dict[WorkerInfo, object]:
        """Runs ``fn(*args, **kwargs)`` once on every connected worker; returns
        {WorkerInfo(host, pid): result}.  If some failed, raises the first
        failure once all are done, with the failed workers listed in a note."""
        futures = self.submit_on_all(fn, *args, **kwargs)
        failed = _failures(futures)
        if failed:
            first = next(iter(failed.values()))
            first.add_note("failed on " + ", ".join(f"{w.host} pid {w.pid}: {type(e).__name__}: {e}"
                                                     for w, e in failed.items()))
            raise first
        return {w: f.result() for w, f in futures.items()}

    def install(self, packages, *, sticky: bool = True, pip_args=(), timeout: float | None = None) -> dict:
        """Installs pip requirements (``["numpy", "scipy==1.*"]``, paths, URLs)
        on every connected worker with its own Python; returns {WorkerInfo:
        pip's last line}.  Raises ``cw.ops.install.InstallError`` naming the
        workers that failed, with pip's error.  ``sticky``: workers that
        connect later install them too, before their first job.
        ``pip_args``: extra pip options (``["--index-url", URL]``)."""
        from cw.ops.install import InstallError, check_packages, install_packages
        from cw.wire.payload import dumps_call, joined
        packages = check_packages(packages)
        pip_args = [str(a) for a in pip_args]
        call = os.urandom(8).hex()
        if sticky:
            self._link.post(protocol.frame(protocol.SETUP, joined(dumps_call(
                install_packages, (packages, pip_args, timeout, call), {}))))
        futures = self.submit_on_all(install_packages, packages, pip_args, timeout, call)
        failed = _failures(futures)
        if failed:
            lines = [f"- {w.host} pid {w.pid}: {e}" for w, e in failed.items()]
            raise InstallError(f"installing {' '.join(packages)} failed on {len(failed)} of {len(futures)} "
                               "workers:\n" + "\n".join(lines))
        return {w: f.result() for w, f in futures.items()}

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


def _views_writable_memory(payload) -> bool:
    from cw.wire.payload import views_writable_memory  # (cw.payload loads cloudpickle: only when needed)
    return views_writable_memory(payload)


def _failures(futures: dict) -> dict:
    """Waits for every future of {worker: future}; returns {worker: exception} of those that failed."""
    concurrent.futures.wait(list(futures.values()))
    return {w: f.exception() for w, f in futures.items() if f.exception() is not None}


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
