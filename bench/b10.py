"""B10: a numpy workload, each system with its libraries' default thread settings.

Jobs of ``np.linalg.eigvals`` on a random square matrix (the script's
``eigvals`` function, defined in the benchmark's ``__main__``), all submitted
at once to N workers on this machine.  A worker process whose BLAS starts one
thread per core fights the other workers for the cores; the reference row
(``ppe-1t``) is ProcessPoolExecutor whose workers were limited to one BLAS /
OpenMP thread by hand.  The benchmark sets no thread variable for the systems.
"""
from __future__ import annotations

import contextlib
import importlib.util
import itertools
import time

from . import systems
from .cases import HIGHER, INFO, LOWER, Case, _fail, _partial, _timed_batch

REFERENCE = "ppe-1t"


def b10(ctx) -> Case:
    size, repeats = 400, 6
    njobs = ctx.size(8, 16)
    reps = 1 if ctx.quick else ctx.reps
    case = Case("B10", f"numpy: {njobs} jobs of {repeats} x eigvals({size}x{size}), library defaults",
                {"jobs": njobs, "size": size, "repeats": repeats, "reps": reps})
    case.figure("time", f"time for {njobs} jobs", "s", LOWER)
    case.figure("rate", "eigvals per second", "1/s", HIGHER)
    case.figure("blas_threads", "largest BLAS thread pool a job saw", "threads", INFO)
    if importlib.util.find_spec("numpy") is None or ctx.script.eigvals is None:
        case.notes.append("skipped: numpy is not importable (pip install numpy), or the benchmark was not "
                          "started with python -m bench (no script function)")
        return case
    # A pathological oversubscription can take minutes: each batch gets a limit.
    limit = None if ctx.limit is None else 5 * ctx.limit
    # The reference runs in the main process only (a child measures its system alone).
    case.columns = list(ctx.systems) + ([] if ctx.child else [REFERENCE])
    eigvals = ctx.script.eigvals

    seeds = itertools.count(1)

    def make():     # every job gets a matrix of its own
        return eigvals, (next(seeds), size, repeats)

    for name in [n for n in case.columns if n not in ctx.separate]:
        t0 = time.perf_counter()
        samples: dict[str, list] = {}
        system = None
        try:
            system = systems.start(name, ctx.nworkers)
            # Every worker imports numpy and runs a small job before the timing.
            warm = [system.submit(eigvals, 10_000 + i, 50, 1) for i in range(2 * ctx.nworkers)]
            threads = list(system.results(warm))
            for _ in range(reps):
                done, elapsed = _timed_batch(system, njobs, limit, make)
                _partial(case, name, "the batch", done, njobs, limit)
                samples.setdefault("time", []).append(elapsed * njobs / max(done, 1))
                samples.setdefault("rate", []).append(done * repeats / elapsed)
                system.settle()
            threads += [system.result(system.submit(eigvals, 20_000 + i, 50, 1)) for i in range(ctx.nworkers)]
            known = [t for t in threads if t is not None]
            samples["blas_threads"] = [max(known) if known else None]
        except Exception as exc:
            _fail(case, name, "the measurement", exc, ctx.log)
        finally:
            if system is not None:
                with contextlib.suppress(Exception):
                    system.close()
        case.set(name, samples)
        ctx.log(f"  {name}: {time.perf_counter() - t0:.1f} s")
    case.notes.append(f"{REFERENCE}: ProcessPoolExecutor whose workers set OMP_NUM_THREADS, OPENBLAS_NUM_THREADS, "
                      "MKL_NUM_THREADS (and friends) to 1 and call threadpoolctl.threadpool_limits(1) in their "
                      "initializer: one thread per worker set by hand, the reference of the target. The other "
                      "systems run with their defaults (the benchmark sets no thread variable).")
    case.notes.append(f"a batch stopped by the limit ({limit and f'{limit:g} s'}) is extrapolated to all "
                      f"{njobs} jobs; BLAS threads from threadpoolctl inside the jobs (- when not installed).")
    return case
