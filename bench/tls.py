"""What TLS costs: B1, B2 and B3 against a plain master and a ``--tls`` one, in one run.

    python -m bench.tls [--workers N] [--calls N] [--round-trips N] [--runs N] [--rounds N] [--b1-only]

Each case runs the way bench.cases runs it for cw (the same jobs from
bench.jobs), once on a plain master and once on a TLS master, each with
its own workers on this machine; it prints both and the ratio TLS/plain
(above 1 is better for rates, below 1 for times).  B1 also gives the
CPU time per call of this client, of the master and of the worker
processes (user + system, from /proc): on a shared machine a steadier
figure than the rate, and it says which hop TLS costs most.  B3 runs twice: as is
(on one machine a 100 MB frame goes by reference through a memfd, plain or
TLS) and with this client's by-reference path off, so that the bytes go
through the client's socket (TLS: encrypted), as between machines.

Needs the ``cryptography`` package (pip install "cluster-workers[tls]").
The certificates go in a temporary directory, never ~/.cw.
"""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

from bench import jobs, procinfo


def _cluster(tls: bool, workers: int):
    from cw.launch.local import start_master
    cluster = start_master(port=0, args=["--tls"] if tls else [])
    cluster.add_workers(workers)
    cluster.wait_for_workers(workers)
    return cluster


def _processes(cluster) -> dict[str, list[int]]:
    """The pids whose CPU time B1 reports: this client, the master, the worker processes."""
    supervisors = [p.pid for p in cluster.workers]
    return {"client": [os.getpid()], "master": [cluster.master.pid],
            "workers": [pid for pid, _ in procinfo.children(supervisors)]}


def _cpu(pids) -> float:
    return sum(procinfo.cpu_seconds(pid) for pid in pids)


def b1(ex, calls: int, processes: dict[str, list[int]] | None = None) -> tuple[float, dict[str, float]]:
    """No-op calls per second: submit ``calls``, wait for all; and the CPU
    microseconds per call of each kind of process in ``processes``."""
    for f in [ex.submit(jobs.noop) for _ in range(200)]:
        f.result()
    processes = processes or {}
    cpu0 = {name: _cpu(pids) for name, pids in processes.items()}
    t0 = time.perf_counter()
    futures = [ex.submit(jobs.noop) for _ in range(calls)]
    for f in futures:
        f.result()
    rate = calls / (time.perf_counter() - t0)
    return rate, {name: (_cpu(pids) - cpu0[name]) / calls * 1e6 for name, pids in processes.items()}


def b2(ex, round_trips: int) -> float:
    """Median sequential round trip, microseconds."""
    for _ in range(50):
        ex.submit(jobs.noop).result()
    times = []
    for _ in range(round_trips):
        t0 = time.perf_counter()
        ex.submit(jobs.noop).result()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e6


def b3(ex, runs: int, size: int = 100_000_000) -> tuple[float, float]:
    """MB/s of a 100 MB argument to a worker and of a 100 MB result back (medians)."""
    data = b"\x00" * size
    ex.submit(jobs.nbytes, data).result()           # the first run touches fresh memory: not counted
    args, results = [], []
    for _ in range(runs):
        t0 = time.perf_counter()
        assert ex.submit(jobs.nbytes, data).result() == size
        args.append(size / 1e6 / (time.perf_counter() - t0))
        t0 = time.perf_counter()
        assert len(ex.submit(jobs.make_bytes, size).result()) == size
        results.append(size / 1e6 / (time.perf_counter() - t0))
    return statistics.median(args), statistics.median(results)


def measure(tls: bool, args) -> dict:
    from cw.wire import segments
    cluster = _cluster(tls, args.workers)
    out = {}
    try:
        with cluster.executor() as ex:
            out["B1 calls/s"], cpu = b1(ex, args.calls, _processes(cluster))
            for name, us in cpu.items():
                out[f"B1 {name} CPU us/call"] = us
            if args.b1_only:
                return out
            out["B2 median us"] = b2(ex, args.round_trips)
            out["B3 arg MB/s"], out["B3 result MB/s"] = b3(ex, args.runs)
        real_probe = segments.probe
        segments.probe = lambda: None          # this client: no frames by reference (as from another machine)
        try:
            with cluster.executor() as ex:
                out["B3 socket arg MB/s"], out["B3 socket result MB/s"] = b3(ex, args.runs)
        finally:
            segments.probe = real_probe
    finally:
        cluster.stop()
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.tls", description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=2, help="worker processes (default 2)")
    parser.add_argument("--calls", type=int, default=10_000, help="B1 no-op calls (default 10000)")
    parser.add_argument("--round-trips", type=int, default=1_000, help="B2 round trips (default 1000)")
    parser.add_argument("--runs", type=int, default=3, help="B3 runs, median taken (default 3)")
    parser.add_argument("--rounds", type=int, default=3,
                        help="plain and TLS take turns this many times; medians are printed (default 3)")
    parser.add_argument("--b1-only", action="store_true", help="only B1 and its CPU per call")
    args = parser.parse_args(argv)
    # Everything cw keeps (secret, certificates) in a directory of this run only.
    home = tempfile.mkdtemp(prefix="cw-bench-tls-")
    os.environ["CW_SECRET_FILE"] = os.path.join(home, "secret")
    os.environ.pop("CW_MASTER", None)
    from cw.wire.auth import load_secret
    load_secret(create=True)
    # Plain and TLS take turns, and each figure is the median of its rounds:
    # a machine whose speed drifts (other work, a VM) drifts both alike.
    rounds: dict[bool, list[dict]] = {False: [], True: []}
    for _ in range(args.rounds):
        for tls in (False, True):
            rounds[tls].append(measure(tls, args))
    plain, secure = ({key: statistics.median(r[key] for r in rounds[tls]) for key in rounds[tls][0]}
                     for tls in (False, True))
    print(f"{'figure':24} {'plain':>12} {'tls':>12} {'tls/plain':>10}")
    for key in plain:
        # (a CPU time read from /proc ticks in 10 ms: a short batch can read 0)
        ratio = f"{secure[key] / plain[key]:10.2f}" if plain[key] else f"{'-':>10}"
        print(f"{key:24} {plain[key]:12.1f} {secure[key]:12.1f} {ratio}")
    print(f"({args.workers} workers on this machine, {os.cpu_count()} CPUs, median of {args.rounds} alternating "
          "rounds; B2 is a time: below 1 is faster)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
