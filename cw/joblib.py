"""joblib on a cw cluster: ``import cw.joblib`` registers the backend "cw".

    import cw.joblib
    from joblib import Parallel, delayed, parallel_config

    with parallel_config(backend="cw"):
        squares = Parallel(n_jobs=-1)(delayed(pow)(i, 2) for i in range(1000))

scikit-learn's ``n_jobs=-1`` estimators and searches go through joblib, so
the same block runs a ``GridSearchCV`` on the cluster.  The backend submits
joblib's batches of calls as cw jobs (joblib groups quick calls into bigger
batches by itself, measuring how long batches take).  Which cluster:
``parallel_config(backend="cw", executor=ex)`` uses the executor ``ex``;
``host=`` and ``port=`` make one; else the process's shared executor
(``cw.get_executor()``: ``$CW_MASTER``, the SLURM cluster, or this machine;
inside a cw job, the job's own cluster).  ``n_jobs=-1`` means every worker
process connected when the call starts.  A joblib call inside a cw job runs
its own calls one after the other there: the job already has its CPUs.
"""
from __future__ import annotations

from joblib import register_parallel_backend
from joblib._parallel_backends import AutoBatchingMixin, ParallelBackendBase, SequentialBackend

__all__ = ["ClusterBackend"]


class ClusterBackend(AutoBatchingMixin, ParallelBackendBase):
    """joblib's ``ParallelBackendBase`` over a ``ClusterExecutor``."""

    supports_retrieve_callback = True
    supports_timeout = True
    default_n_jobs = -1

    def __init__(self, executor=None, host=None, port=None, **kwargs):
        super().__init__(**kwargs)
        self._address = (host, port)
        self._executor = executor
        self._owns_executor = False        # made here (host=/port=): ended by terminate()
        self._futures: set = set()

    def _cluster(self):
        if self._executor is None:
            from cw.client import ClusterExecutor, get_executor
            host, port = self._address
            if host is None and port is None:
                self._executor = get_executor()
            else:
                from cw import PORT
                self._executor = ClusterExecutor(host, PORT if port is None else port)
                self._owns_executor = True
        return self._executor

    def effective_n_jobs(self, n_jobs):
        if n_jobs == 0:
            raise ValueError("n_jobs == 0 in Parallel has no meaning")
        if n_jobs is None or n_jobs < 0:
            # Every worker process connected now (at least one: jobs wait for workers that join later).
            return max(1, len(self._cluster().workers()))
        return n_jobs

    def submit(self, func, callback=None):
        future = self._cluster().submit(func)
        self._futures.add(future)
        future.add_done_callback(self._futures.discard)
        if callback is not None:
            future.add_done_callback(callback)
        return future

    def retrieve_result_callback(self, out):
        return out.result()

    def abort_everything(self, ensure_ready=True):
        """The calls still queued or running are of no use any more: cancel them."""
        for future in list(self._futures):
            future.cancel()
        self._futures.clear()

    def terminate(self):
        """Ends an executor this backend made itself (host=/port=); a given
        or shared one stays for its owner."""
        if self._owns_executor:
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._executor, self._owns_executor = None, False

    def get_nested_backend(self):
        return SequentialBackend(nesting_level=(self.nesting_level or 0) + 1), None


register_parallel_backend("cw", ClusterBackend)
