"""The systems compared, behind one small interface.

Each ``System`` starts ``nworkers`` worker processes on this machine and
offers ``submit``, ``results`` (wait for a list of futures), ``map`` and
``close``.  ``client()`` gives another client of the same cluster for B7
(its own connection where the system has such a thing).
"""
from __future__ import annotations

import concurrent.futures
import functools
import importlib.util
import itertools
import logging
import os
import time
import warnings

from . import jobs, procinfo

ALL = ("cw", "ppe", "loky", "dask", "ray")
LABELS = {
    "cw": "cw (master + N worker processes)",
    "ppe": "concurrent.futures.ProcessPoolExecutor",
    "loky": "loky.ProcessPoolExecutor",
    "dask": "dask.distributed LocalCluster (processes, 1 thread/worker)",
    "ray": "Ray (ray.init(num_cpus=N), local head node)",
    "ppe-1t": "ProcessPoolExecutor, one BLAS thread per worker set by hand (B10's reference)",
}


#: Systems that run in a child process of their own per case: ray.shutdown()
#: leaves Ray's gRPC threads in the process, and a pool forked later from it can
#: deadlock (a ProcessPoolExecutor worker hung importing numpy.random).
SEPARATE = ("ray",)


def available(name: str) -> str | None:
    """None when the system can run here, else why not."""
    module = {"cw": "cw", "ppe": "concurrent.futures", "loky": "loky", "dask": "distributed", "ray": "ray"}[name]
    if importlib.util.find_spec(module) is None:
        return f"{module} is not importable (pip install loky distributed ray, or the bench extra)"
    return None


def chunks(iterable, size):
    it = iter(iterable)
    while True:
        chunk = list(itertools.islice(it, size))
        if not chunk:
            return
        yield chunk


class System:
    name = "?"
    master_pid: int | None = None   # cw only: the master process

    def __init__(self, nworkers: int):
        self.nworkers = nworkers

    def submit(self, fn, *args):
        return self.executor.submit(fn, *args)

    def result(self, future):
        """One future's result (Ray's futures are object references)."""
        return future.result()

    def service_pids(self) -> list[int]:
        """Processes other than the client and the workers that route the calls
        (cw's master; Ray's GCS server and raylet), for their CPU time."""
        return [self.master_pid] if self.master_pid else []

    def one_worker_view(self):
        """The same system limited to one job at a time, for B4's 1-worker batches
        when a second instance cannot run beside this one (Ray); None otherwise."""
        return None

    def results(self, futures) -> list:
        return [f.result() for f in futures]

    def map(self, fn, iterable, chunksize: int | None = None) -> list:
        return list(self.executor.map(fn, iterable, chunksize=chunksize or 1))

    def map_count(self, fn, iterable, chunksize: int | None = None, limit: float | None = None) -> int:
        """Runs a map and counts its results; stops after ``limit`` seconds (the
        rest is cancelled) so that a slow system cannot stall a quick run."""
        deadline = None if limit is None else time.perf_counter() + limit
        results = self.executor.map(fn, iterable, chunksize=chunksize or 1)
        count = 0
        try:
            for _ in results:
                count += 1
                if deadline is not None and time.perf_counter() > deadline:
                    break
        finally:
            close = getattr(results, "close", None)
            if close is not None:
                close()             # the executors cancel what is left
        return count

    def wait(self, futures, timeout: float | None) -> int:
        """Waits up to ``timeout`` seconds for every future; returns how many are done."""
        done, _ = concurrent.futures.wait(futures, timeout)
        return len(done)

    def cancel(self, futures) -> None:
        for f in futures:
            f.cancel()

    def settle(self, timeout: float = 60.0) -> None:
        """Waits until cancelled work is gone (only Dask needs it), untimed."""

    def client(self):
        """Another client for the same workers (B7); ``close()`` it when done."""
        return SharedClient(self)

    def warm(self) -> None:
        """Makes sure every worker process is up and has imported the jobs."""
        self.results([self.submit(jobs.sleep, 0.02) for _ in range(3 * self.nworkers)])
        self.results([self.submit(jobs.noop) for _ in range(50)])

    def worker_pids(self) -> list[int]:
        """The worker processes' pids (for their CPU time), or [] when unknown."""
        procs = getattr(self.executor, "_processes", None) or {}
        return [int(pid) for pid in procs]

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class SharedClient:
    """For pools that cannot take a second client: the same executor."""
    shared = True

    def __init__(self, system: System):
        self.system = system

    def submit(self, fn, *args):
        return self.system.submit(fn, *args)

    def results(self, futures):
        return self.system.results(futures)

    def wait(self, futures, timeout):
        return self.system.wait(futures, timeout)

    def cancel(self, futures):
        self.system.cancel(futures)

    def close(self):
        pass


class CwSystem(System):
    name = "cw"

    def __init__(self, nworkers: int):
        super().__init__(nworkers)
        import cw.launch.local
        self.cluster = cw.launch.local.start_master(port=0)
        self.master_pid = self.cluster.master.pid
        try:
            if nworkers:
                self.cluster.add_workers(nworkers)
                self.cluster.wait_for_workers(nworkers)
            self.executor = self.cluster.executor()
        except BaseException:
            self.cluster.stop()
            raise

    def client(self):
        return CwClient(self.cluster.executor())

    def worker_pids(self) -> list[int]:
        # The worker processes are the children of the supervisors we started.
        return [pid for pid, _ in procinfo.children(proc.pid for proc in self.cluster.workers)]

    def close(self) -> None:
        try:
            self.executor.shutdown(wait=False, cancel_futures=True)
        finally:
            self.cluster.stop()


class CwClient:
    shared = False

    def __init__(self, executor):
        self.executor = executor

    def submit(self, fn, *args):
        return self.executor.submit(fn, *args)

    def results(self, futures):
        return [f.result() for f in futures]

    def wait(self, futures, timeout):
        return len(concurrent.futures.wait(futures, timeout)[0])

    def cancel(self, futures):
        for f in futures:
            f.cancel()

    def close(self):
        self.executor.shutdown(wait=True, cancel_futures=True)


class PpeSystem(System):
    name = "ppe"

    def __init__(self, nworkers: int):
        super().__init__(nworkers)
        self.executor = concurrent.futures.ProcessPoolExecutor(max_workers=nworkers)

    def close(self) -> None:
        self.executor.shutdown(wait=True, cancel_futures=True)


class PpeOneThreadSystem(PpeSystem):
    """B10's reference: ProcessPoolExecutor whose workers were limited to one
    BLAS / OpenMP thread by hand (environment variables and threadpoolctl)."""
    name = "ppe-1t"

    def __init__(self, nworkers: int):
        System.__init__(self, nworkers)
        self.executor = concurrent.futures.ProcessPoolExecutor(max_workers=nworkers,
                                                               initializer=jobs.one_blas_thread)


class LokySystem(System):
    name = "loky"

    def __init__(self, nworkers: int):
        super().__init__(nworkers)
        import loky
        self.executor = loky.ProcessPoolExecutor(max_workers=nworkers)

    def close(self) -> None:
        self.executor.shutdown(wait=True, kill_workers=False)


class DaskSystem(System):
    name = "dask"

    def __init__(self, nworkers: int):
        super().__init__(nworkers)
        from distributed import Client, LocalCluster
        warnings.filterwarnings("ignore", module="distributed")
        warnings.filterwarnings("ignore", message=".*Large object.*")
        for logger in ("distributed", "tornado", "asyncio"):   # shutdown noise on stderr
            logging.getLogger(logger).setLevel(logging.CRITICAL + 1)
        self._environ = dict(os.environ)
        try:
            self.cluster = LocalCluster(n_workers=nworkers, threads_per_worker=1, processes=True,
                                        dashboard_address=":0", silence_logs=logging.ERROR)
            self.executor = Client(self.cluster)
            self.executor.wait_for_workers(nworkers)
        finally:
            restore_environ(self._environ)

    def submit(self, fn, *args):
        return self.executor.submit(fn, *args, pure=False)

    def results(self, futures) -> list:
        return self.executor.gather(futures)

    def map(self, fn, iterable, chunksize: int | None = None) -> list:
        client = self.executor
        if not chunksize or chunksize == 1:
            return client.gather(client.map(fn, list(iterable), pure=False))
        # Dask has no chunksize: each task runs one chunk, as the pools do inside.
        run = functools.partial(jobs.run_chunk, fn)
        parts = client.gather(client.map(run, [[(x,) for x in c] for c in chunks(iterable, chunksize)],
                                         pure=False))
        return [value for part in parts for value in part]

    def map_count(self, fn, iterable, chunksize: int | None = None, limit: float | None = None) -> int:
        client = self.executor
        if not chunksize or chunksize == 1:
            futures, sizes = client.map(fn, list(iterable), pure=False), None
        else:
            parts = [[(x,) for x in c] for c in chunks(iterable, chunksize)]
            futures = client.map(functools.partial(jobs.run_chunk, fn), parts, pure=False)
            sizes = [len(p) for p in parts]
        self.wait(futures, limit)
        done = [i for i, f in enumerate(futures) if f.status == "finished"]
        self.cancel(futures)
        return len(done) if sizes is None else sum(sizes[i] for i in done)

    def wait(self, futures, timeout: float | None) -> int:
        return _dask_wait(futures, timeout)

    def cancel(self, futures) -> None:
        self.executor.cancel([f for f in futures if not f.done()])

    def settle(self, timeout: float = 60.0) -> None:
        # A cancelled batch keeps Dask's scheduler busy for a while: wait until
        # it has no task left to run, so the next measurement starts clean.
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if self.executor.run_on_scheduler(_scheduler_tasks) == 0:
                    return
            except Exception:  # noqa: BLE001 - settling is best effort
                return
            time.sleep(0.2)

    def worker_pids(self) -> list[int]:
        try:
            return [int(pid) for pid in self.executor.run(os.getpid).values()]
        except Exception:  # noqa: BLE001 - only a figure is lost
            return []

    def client(self):
        from distributed import Client
        return DaskClient(Client(self.cluster.scheduler_address, set_as_default=False))

    def close(self) -> None:
        try:
            self.executor.close()
        finally:
            self.cluster.close()
            restore_environ(self._environ)


class DaskClient:
    shared = False

    def __init__(self, client):
        self.executor = client

    def submit(self, fn, *args):
        return self.executor.submit(fn, *args, pure=False)

    def results(self, futures):
        return self.executor.gather(futures)

    def wait(self, futures, timeout):
        return _dask_wait(futures, timeout)

    def cancel(self, futures):
        self.executor.cancel([f for f in futures if not f.done()])

    def close(self):
        self.executor.close()


def restore_environ(saved: dict) -> None:
    """Puts this process's environment back as ``saved``.  Dask's nanny sets
    OMP_NUM_THREADS, MKL_NUM_THREADS, ... = 1 in the environment of the process
    that starts the LocalCluster (distributed 2026.8) and leaves them there: every
    system started afterwards (cw's workers, the Ray child) would inherit Dask's
    thread settings instead of its own defaults (B10)."""
    for key in set(os.environ) - set(saved):
        del os.environ[key]
    for key, value in saved.items():
        if os.environ.get(key) != value:
            os.environ[key] = value


def _dask_wait(futures, timeout) -> int:
    import distributed
    try:
        distributed.wait(futures, timeout=timeout)
    except Exception:  # noqa: BLE001 - TimeoutError, or FuturesCancelledError when the client is closing
        pass
    return sum(1 for f in futures if f.status == "finished")


def _scheduler_tasks(dask_scheduler=None) -> int:
    """Tasks Dask's scheduler still has to run or is running."""
    return sum(1 for ts in dask_scheduler.tasks.values()
               if ts.state in ("released", "waiting", "queued", "processing", "no-worker"))


CLASSES = {"cw": CwSystem, "ppe": PpeSystem, "loky": LokySystem, "dask": DaskSystem,
           "ppe-1t": PpeOneThreadSystem}


def start(name: str, nworkers: int, warm: bool = True) -> System:
    if name == "ray":
        from .ray_system import RaySystem  # imports ray only when it takes part
        system = RaySystem(nworkers)
    else:
        system = CLASSES[name](nworkers)
    if warm and nworkers:
        try:
            system.warm()
        except BaseException:
            system.close()
            raise
    return system
