"""Ray as a peer: a local head node with ``num_cpus=N`` started by ``ray.init``.

Ray has no executor: a function becomes a remote function (``ray.remote``) and
each call returns an object reference.  ``RaySystem`` wraps every function
once, as a user decorates it once with ``@ray.remote``; a function object that
is new with each call (B1's notebook-style lambda) is wrapped with each call,
which is what such a user pays in Ray.  Ray starts its own processes (GCS
server, raylet, workers, helpers); ``close`` shuts them down and kills, by pid,
any the shutdown left behind.
"""
from __future__ import annotations

import logging
import os
import time
import weakref

from . import jobs, procinfo
from .systems import System, chunks

#: Ray's long-lived processes that route the calls (the counterpart of cw's master).
SERVICES = ("gcs_server", "raylet")


class RaySystem(System):
    name = "ray"

    def __init__(self, nworkers: int):
        super().__init__(nworkers)
        import ray
        if ray.is_initialized():
            raise RuntimeError("Ray is already initialised in the benchmark's process: a RaySystem must be "
                               "closed before the next one starts")
        self.ray = ray
        self._remotes: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # fn -> {cpus: remote fn}
        self._left: list = []        # tasks of a batch stopped by the time limit
        # The workers must import bench.jobs: Ray's processes inherit the environment
        # of the moment ray.init starts them, so the repository's root goes on PYTHONPATH.
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        saved = os.environ.get("PYTHONPATH")
        os.environ["PYTHONPATH"] = root + (os.pathsep + saved if saved else "")
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")   # no usage report at start-up
        try:
            ray.init(address="local", num_cpus=nworkers, include_dashboard=False, log_to_driver=False,
                     logging_level=logging.ERROR)
        finally:
            if saved is None:
                os.environ.pop("PYTHONPATH", None)
            else:
                os.environ["PYTHONPATH"] = saved

    def _remote(self, fn, cpus: int = 1):
        per_cpus = self._remotes.get(fn)
        if per_cpus is None:
            per_cpus = self._remotes[fn] = {}
        remote = per_cpus.get(cpus)
        if remote is None:
            remote = per_cpus[cpus] = self.ray.remote(num_cpus=cpus)(fn)
        return remote

    def submit(self, fn, *args):
        return self._remote(fn).remote(*args)

    def result(self, future):
        return self.ray.get(future)

    def results(self, futures) -> list:
        return self.ray.get(list(futures))

    def map(self, fn, iterable, chunksize: int | None = None) -> list:
        if not chunksize or chunksize == 1:
            return self.results([self.submit(fn, x) for x in iterable])
        # Ray has no chunksize: one task per chunk, as the pools do inside.
        parts = self.results([self.submit(jobs.run_chunk, fn, [(x,) for x in c])
                              for c in chunks(iterable, chunksize)])
        return [value for part in parts for value in part]

    def map_count(self, fn, iterable, chunksize: int | None = None, limit: float | None = None) -> int:
        if not chunksize or chunksize == 1:
            refs, sizes = [self.submit(fn, x) for x in iterable], None
        else:
            parts = [[(x,) for x in c] for c in chunks(iterable, chunksize)]
            refs = [self.submit(jobs.run_chunk, fn, part) for part in parts]
            sizes = [len(p) for p in parts]
        ready, _ = self.ray.wait(refs, num_returns=len(refs), timeout=limit, fetch_local=False)
        ready = set(ready)
        self.cancel(refs)
        done = [i for i, ref in enumerate(refs) if ref in ready]
        return len(done) if sizes is None else sum(sizes[i] for i in done)

    def wait(self, futures, timeout: float | None) -> int:
        futures = list(futures)
        ready, _ = self.ray.wait(futures, num_returns=len(futures), timeout=timeout, fetch_local=False)
        return len(ready)

    def cancel(self, futures) -> None:
        # No ray.cancel: with thousands of queued tasks it aborts the driver
        # (Ray 2.60: "Tried to complete task that was not pending").  The tasks
        # the benchmark leaves behind are no-ops: settle() lets them run out.
        futures = list(futures)
        _, pending = self.ray.wait(futures, num_returns=len(futures), timeout=0, fetch_local=False)
        self._left.extend(pending)

    def settle(self, timeout: float = 120.0) -> None:
        if self._left:
            self.ray.wait(self._left, num_returns=len(self._left), timeout=timeout, fetch_local=False)
            self._left = []

    def _own(self) -> list[tuple[int, str]]:
        return procinfo.children([os.getpid()])

    def service_pids(self) -> list[int]:
        return [pid for pid, comm in self._own() if comm in SERVICES]

    def worker_pids(self) -> list[int]:
        raylets = [pid for pid, comm in self._own() if comm == "raylet"]
        return [pid for pid, comm in procinfo.children(raylets) if comm.startswith("ray::")]

    def one_worker_view(self):
        # One ray.init per process: the 1-worker batches run on this same node,
        # each task asking for all its CPUs, so that one runs at a time.
        return OneAtATime(self)

    def close(self) -> None:
        before = {pid for pid, _ in self._own()} | set(self.worker_pids())
        self.ray.shutdown()
        deadline = time.monotonic() + 15
        left = before
        while left and time.monotonic() < deadline:
            left = {pid for pid in before if os.path.exists(f"/proc/{pid}")
                    and _state(pid) not in ("Z", None)}
            time.sleep(0.1)
        for pid in left:       # started by this RaySystem and still there: stop them
            try:
                os.kill(pid, 9)
            except OSError:
                pass
        if left:
            logging.getLogger(__name__).warning("ray.shutdown() left %d processes; killed: %s", len(left), left)


class OneAtATime:
    """B4's 1-worker instance for Ray: every task asks for all the node's CPUs;
    everything else is the system's own."""

    def __init__(self, system: RaySystem):
        self.system = system

    def __getattr__(self, name):
        return getattr(self.system, name)

    def submit(self, fn, *args):
        return self.system._remote(fn, self.system.nworkers).remote(*args)

    def close(self) -> None:
        pass        # the system it views is closed on its own


def _state(pid: int) -> str | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0]
    except (OSError, IndexError):
        return None
