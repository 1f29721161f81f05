"""``ClientThread``: the original cluster-workers client, on a ClusterExecutor.

``callback(jobid, result)`` runs in one thread of the client's own, in the
order jobs finish, so callbacks need no locks among themselves.
"""
from __future__ import annotations

import queue
import threading

from cw import PORT
from cw.client.executor import ClusterExecutor


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
