"""What a per-job timeout costs: B1 with and without one, on one cluster.

    python -m bench.timeouts [--workers N] [--calls N] [--rounds N]

A client that gives its jobs a timeout (``ClusterExecutor(timeout=...)``
or ``submit_with(..., timeout=...)``) asks each worker to watch every job
it runs.  This runs B1's submit figure (no-op calls of bench.jobs.noop,
wait for all; bench.tls.b1) on one cluster, alternating rounds from an
executor without a timeout and one with ``timeout=60``, and prints the
median calls/s and CPU per call of each and their ratio.  None of the other
systems of ``python -m bench`` has a per-task timeout to compare with.
"""
from __future__ import annotations

import argparse
import statistics

from bench.tls import _cluster, _processes, b1


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.timeouts", description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--calls", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args(argv)
    cluster = _cluster(tls=False, workers=args.workers)
    try:
        processes = _processes(cluster)
        runs: dict[str, list] = {"without": [], "with": []}
        for _ in range(args.rounds):
            for name, options in (("without", {}), ("with", {"timeout": 60.0})):
                with cluster.executor(**options) as ex:
                    runs[name].append(b1(ex, args.calls, processes))
    finally:
        cluster.stop()
    print(f"B1 submit x{args.calls:,}, wait all, {args.workers} workers, {args.rounds} rounds each, alternating")
    rate = {name: statistics.median(r for r, _ in rounds) for name, rounds in runs.items()}
    for name, rounds in runs.items():
        cpu = {kind: statistics.median(c[kind] for _, c in rounds) for kind in processes}
        print(f"  {name} a timeout of 60 s: {rate[name]:8,.0f} calls/s; CPU us per call: "
              + ", ".join(f"{kind} {value:.1f}" for kind, value in cpu.items()))
    print(f"  ratio with/without: {rate['with'] / rate['without']:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
