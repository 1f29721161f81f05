"""``python -m cw.demo``: a local cluster, one job per worker, and the timing.

Each job computes the top eigenvalues of 200x200 random matrices with numpy.
With one worker per core the jobs run side by side, so the whole fan-out
takes about as long as one job (each job gets one BLAS thread: the workers
size their jobs' thread pools to the CPUs they asked for).
"""
from __future__ import annotations

import argparse
import os
import time


def top_eigenvalues(seed: int, size: int = 200, rounds: int = 40, top: int = 3):
    """Job: the ``top`` largest eigenvalue magnitudes of ``rounds`` random matrices."""
    import numpy as np
    start = time.perf_counter()
    rng = np.random.default_rng(seed)
    best = []
    for _ in range(rounds):
        values = np.linalg.eigvals(rng.standard_normal((size, size)))
        best = sorted(np.abs(values).tolist() + best, reverse=True)[:top]
    return best, time.perf_counter() - start


def main(argv=None, prog: str = "python -m cw.demo") -> int:
    from cw import add_version_option, cliargs
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0])
    add_version_option(parser)
    parser.add_argument("-n", "--workers", type=cliargs.count, default=os.cpu_count() or 1,
                        help="workers (default: one per core)")
    args = parser.parse_args(argv)
    try:
        import numpy  # noqa: F401
    except ImportError:
        parser.exit(2, "the demo needs numpy: pip install 'cluster-workers[demo]'\n")

    import cw
    from cw.client.executor import ClusterExecutor

    print(f"starting a local cluster with {args.workers} workers ...", flush=True)
    with cw.allocate(args.workers, port=0, backend="local") as cluster:
        print(f"master at {cluster.address}", flush=True)
        with ClusterExecutor() as executor:
            # Warm up: each worker imports numpy once, outside the timing.
            list(executor.map(top_eigenvalues, range(args.workers), [8] * args.workers, [1] * args.workers))
            start = time.perf_counter()
            futures = [executor.submit(top_eigenvalues, seed) for seed in range(args.workers)]
            for seed, future in enumerate(futures):
                values, seconds = future.result()
                worker = future.worker
                print(f"job {seed}: top eigenvalues {', '.join(f'{v:.2f}' for v in values)}  "
                      f"({seconds:.2f} s on {worker.host} pid {worker.pid})", flush=True)
            wall = time.perf_counter() - start
    longest = max(f.result()[1] for f in futures)
    print(f"{args.workers} jobs in {wall:.2f} s wall time; the longest job alone took {longest:.2f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
