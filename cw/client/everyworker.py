"""The calls of a ClusterExecutor that reach every connected worker.

They are built from ``status()`` and ``submit_with(..., workers=[id])``
alone: a job pinned to each worker the master lists now.
"""
from __future__ import annotations

import concurrent.futures
import os
from collections.abc import Callable
from typing import TYPE_CHECKING

from cw import settings
from cw.client.future import ClusterFuture, WorkerDescription, WorkerInfo
from cw.wire import frames
from cw.wire.frames import Frame

STATUS_TIMEOUT = settings.STATUS_TIMEOUT


class EveryWorker:
    """Mixed into ClusterExecutor, whose ``status``, ``submit_with`` and
    connection (``_post_setup``) it uses."""

    if TYPE_CHECKING:       # what the executor gives this mixin
        def status(self, timeout: float = ...) -> dict: ...
        submit_with: Callable[..., ClusterFuture]
        def _post_setup(self, frame: bytes) -> None: ...

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
        pip's last line}.  Raises ``cw.client.install.InstallError`` naming the
        workers that failed, with pip's error.  ``sticky``: workers that
        connect later install them too, before their first job.
        ``pip_args``: extra pip options (``["--index-url", URL]``)."""
        from cw.client.install import InstallError, check_packages, install_packages
        from cw.wire.payload import dumps_call, joined
        packages = check_packages(packages)
        pip_args = [str(a) for a in pip_args]
        call = os.urandom(8).hex()
        if sticky:
            self._post_setup(frames.frame(Frame.SETUP, joined(dumps_call(
                install_packages, (packages, pip_args, timeout, call), {}))))
        futures = self.submit_on_all(install_packages, packages, pip_args, timeout, call)
        failed = _failures(futures)
        if failed:
            lines = [f"- {w.host} pid {w.pid}: {e}" for w, e in failed.items()]
            raise InstallError(f"installing {' '.join(packages)} failed on {len(failed)} of {len(futures)} "
                               "workers:\n" + "\n".join(lines))
        return {w: f.result() for w, f in futures.items()}


def _failures(futures: dict) -> dict:
    """Waits for every future of {worker: future}; returns {worker: exception} of those that failed."""
    concurrent.futures.wait(list(futures.values()))
    return {w: f.exception() for w, f in futures.items() if f.exception() is not None}
