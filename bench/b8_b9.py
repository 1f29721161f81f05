"""B8 and B9: data between jobs (issue 14).

B8, a shared input: one big numpy array read by many jobs (each sums a
slice), sent once with each system's own means (cw ``put``, Dask
``scatter(broadcast=True)``, Ray ``ray.put``), and passed with every call
(cw without ``put``, ProcessPoolExecutor, which has no other means).  Wall
time from the moment the array is handed over to the last result, and the
bytes the routing process wrote (``wchar`` of /proc/PID/io: sockets
included): cw's master, Ray's gcs_server + raylet; Dask's scheduler runs in
the benchmark's own process, which also sends the array, so it has none.

B9, futures as arguments: a chain of no-op jobs each taking the previous
one's future, and a binary reduction tree (``add``) over leaves that each
return 1; jobs per second from the first submit to the last result.  cw,
Dask futures and Ray object refs; a ProcessPoolExecutor cannot take futures
as arguments.
"""
from __future__ import annotations

import importlib.util
import time

from . import jobs
from .cases import HIGHER, INFO, LOWER, Case, run_systems

MB = 1024 * 1024


def _written(pids) -> int | None:
    """Bytes the processes ``pids`` passed to write calls so far (None: not readable)."""
    total = 0
    try:
        for pid in pids:
            with open(f"/proc/{pid}/io") as f:
                fields = dict(line.split(": ") for line in f.read().splitlines())
            total += int(fields["wchar"])
    except (OSError, KeyError, ValueError):
        return None
    return total


def b8(ctx) -> Case:
    megabytes = ctx.size(40, 200)
    njobs = ctx.size(40, 200)
    case = Case("B8", f"a {megabytes} MB numpy array read by {njobs} jobs (a slice sum each)",
                {"megabytes": megabytes, "jobs": njobs, "workers": ctx.nworkers})
    case.figure("time_shared", "time, the array sent once (put / scatter / ray.put)", "s", LOWER)
    case.figure("time_plain", "time, the array passed with each call", "s", LOWER)
    case.figure("written_shared", "bytes the master wrote, sent once", "MB", LOWER)
    case.figure("written_plain", "bytes the master wrote, with each call", "MB", INFO)
    if importlib.util.find_spec("numpy") is None:
        case.notes.append("skipped: numpy is not importable")
        return case
    import numpy as np
    array = np.random.default_rng(0).random(megabytes * MB // 8)
    expected = [jobs.slice_sum(array, i, njobs) for i in range(njobs)]

    def measure(system):
        out = {}
        for how in ("shared", "plain"):
            if how == "shared" and system.name in ("ppe", "loky"):
                continue            # no means of sending it once
            if how == "plain" and system.name in ("dask", "ray"):
                continue            # the issue compares their means of sharing only
            routers = system.service_pids()      # cw's master, Ray's services; Dask: none
            before = _written(routers) if routers else None
            t0 = time.perf_counter()
            if how == "shared":
                data = _share(system, array)
                futures = [system.submit(jobs.slice_sum, data, i, njobs) for i in range(njobs)]
                assert np.allclose(system.results(futures), expected)   # (sums may differ in the last bit)
                out["time_shared"] = time.perf_counter() - t0
                del data, futures
            else:
                done, elapsed = _calls_within(system, array, njobs, ctx.limit, expected)
                case.partial(system.name, "the array with each call", done, njobs, ctx.limit)
                out["time_plain"] = elapsed * njobs / done     # (over the calls done, when the limit cut it)
            after = _written(routers) if routers else None
            if before is not None and after is not None:
                out[f"written_{how}"] = (after - before) / MB
        return out

    # One repetition: each moves gigabytes.
    run_systems(ctx, case, measure, reps=1)
    case.notes.append("shared: cw ex.put(array) (each worker machine gets the bytes once, its processes map "
                      "one file), Dask client.scatter(array, broadcast=True), Ray ray.put(array); "
                      "ProcessPoolExecutor and loky have no such means; passed with each call: cw and "
                      "ProcessPoolExecutor only (a timed batch stops at the time limit: its time is extrapolated "
                      "from the calls done). Target: cw's master writes at most "
                      f"(workers + 1) x {megabytes} MB = {(ctx.nworkers + 1) * megabytes} MB, and cw's time is "
                      "at most the best of Dask's and Ray's. Bytes written = wchar of /proc/PID/io of the master "
                      "(cw) or of gcs_server + raylet (Ray; its object store is shared memory); Dask's scheduler "
                      "lives in the benchmark's process: no figure. cw sends big frames between processes of "
                      "one machine through shared-memory segments, which wchar does not count: its 'with each "
                      "call' figure is far below the bytes that really move.")
    return case


def _calls_within(system, array, n, limit, expected) -> tuple[int, float]:
    """Calls taking the array itself, submitted until ``limit`` seconds have
    passed (cw's submit waits until a call's array is sent); (done, seconds)."""
    import numpy as np
    t0 = time.perf_counter()
    futures = []
    for i in range(n):
        if limit is not None and time.perf_counter() - t0 > limit:
            break
        futures.append(system.submit(jobs.slice_sum, array, i, n))
    left = None if limit is None else max(1.0, limit - (time.perf_counter() - t0))
    done = system.wait(futures, left)
    elapsed = time.perf_counter() - t0
    if done < len(futures) or len(futures) < n:
        system.cancel(futures)
        system.settle()
    else:
        assert np.allclose(system.results(futures), expected[:len(futures)])
    return max(done, 1), elapsed


def _share(system, array):
    if system.name == "cw":
        return system.executor.put(array)
    if system.name == "dask":
        return system.executor.scatter(array, broadcast=True)
    if system.name == "ray":
        return system.ray.put(array)
    raise ValueError(system.name)


def b9(ctx) -> Case:
    length = ctx.size(1_000, 10_000)
    leaves = ctx.size(512, 4_096)
    case = Case("B9", f"a chain of {length:,} jobs, each taking the previous one's future; a reduction tree "
                      f"over {leaves:,} leaves", {"chain": length, "leaves": leaves})
    case.figure("chain", "chain: jobs per second", "jobs/s", HIGHER)
    case.figure("tree", "reduction tree: jobs per second", "jobs/s", HIGHER)
    case.figure("chain_s", "chain: time", "s", INFO)
    case.figure("tree_s", "tree: time", "s", INFO)

    def measure(system):
        if system.name in ("ppe", "loky"):
            return {}
        t0 = time.perf_counter()
        future = system.submit(jobs.noop)
        for _ in range(length - 1):
            future = system.submit(jobs.noop, future)
        assert system.result(future) is None
        chain_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        level = [system.submit(jobs.one) for _ in range(leaves)]
        count = len(level)
        while len(level) > 1:
            level = [system.submit(jobs.add, level[i], level[i + 1]) for i in range(0, len(level), 2)]
            count += len(level)
        assert system.result(level[0]) == leaves
        tree_s = time.perf_counter() - t0
        return {"chain": length / chain_s, "tree": count / tree_s, "chain_s": chain_s, "tree_s": tree_s}

    run_systems(ctx, case, measure, reps=1 if ctx.quick else min(ctx.reps, 2))
    case.notes.append("cw: ex.submit(noop, previous_future); Dask: client.submit(noop, previous_future, "
                      "pure=False); Ray: remote.remote(previous_ref). ProcessPoolExecutor and loky cannot take "
                      "futures as arguments. Targets: cw >= 3x Dask's jobs/s and >= Ray's.")
    if any(name in ctx.systems for name in ("ppe", "loky")):
        case.notes.append("ppe, loky: no futures as arguments (a dependent job waits in the client).")
    return case
