"""``python -m bench``: cw side by side with ProcessPoolExecutor, loky, Dask and Ray.

Run from the repository's root.  See bench/README.md.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time

# --- the functions a user's script submits ------------------------------------
# Defined here, in the module that `python -m bench` runs as __main__, so that
# they are __main__ functions exactly as in a user's script or notebook:
# cloudpickle sends them by value (cw, loky, Dask, Ray); ProcessPoolExecutor
# (fork) pickles them by reference, which is what its users get too.
# bench/jobs.py holds the same functions as an importable module.


def noop(*args):
    return None


def burn(loops):
    x = 0
    for i in range(loops):
        x += i * i
    return x


def eigvals(seed, size, repeats):
    """B10's job: ``repeats`` x eigenvalues of a random ``size`` x ``size`` matrix;
    returns the largest BLAS thread pool the job saw (None without threadpoolctl)."""
    import numpy as np

    from bench.jobs import blas_threads
    matrix = np.random.default_rng(seed).standard_normal((size, size))
    for _ in range(repeats):
        np.linalg.eigvals(matrix)
    return blas_threads()


def new_noop_lambda():
    """A notebook cell's ``ex.submit(lambda: None)``: a new function object per call."""
    return lambda *args: None


def new_burn_lambda(loops):
    return lambda: burn(loops)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description="cw side by side with "
                                     "ProcessPoolExecutor, loky, Dask distributed and Ray (see bench/README.md).")
    parser.add_argument("--quick", action="store_true", help="small sizes, one repetition (a few minutes)")
    parser.add_argument("--only", default="", help="cases to run, e.g. B1,B3 (default: all)")
    parser.add_argument("--systems", default="", help="systems to run: cw,ppe,loky,dask,ray (default: all available)")
    parser.add_argument("--workers", type=int, default=2, help="worker processes per system (default 2)")
    parser.add_argument("--reps", type=int, default=None, help="repetitions per figure (default 3, quick 1)")
    parser.add_argument("--limit", type=float, default=None,
                        help="seconds a timed batch may take before a slow system is measured over the calls "
                             "it finished (default 6, full mode 30; 0: no limit; B5 has its own: 10 / 120)")
    parser.add_argument("--out", default=None, help="JSON output (default bench/results/latest.json)")
    parser.add_argument("--plot-from", metavar="JSON", default=None,
                        help="measure nothing: draw the B6 plot from the results of an earlier run "
                             "(to bench/results/b6_workers.png, or --out)")
    # A child of a run measuring one separate system (bench/separate.py).
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.plot_from:
        return replot(args.plot_from, args.out)

    # Workers must import bench.jobs: the repository's root on sys.path (cw's
    # client sends its sys.path to the workers; the pools inherit it).
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if root not in sys.path:
        sys.path.insert(0, root)

    # A secret of our own, so the benchmark never touches ~/.cw.
    secret_dir = tempfile.mkdtemp(prefix="cw-bench-")
    os.environ["CW_SECRET_FILE"] = os.path.join(secret_dir, "secret")
    os.environ.pop("CW_MASTER", None)
    try:
        return run(args, root)
    finally:
        shutil.rmtree(secret_dir, ignore_errors=True)


def replot(json_path: str, out: str | None) -> int:
    from .cases import plot_b6
    with open(json_path) as f:
        results = json.load(f)
    b6 = results.get("cases", {}).get("B6", {}).get("extra", {})
    if "curve" not in b6:
        print(f"{json_path} has no B6 curve: run B6 first (python -m bench --only B1,B6)", file=sys.stderr)
        return 2
    references = b6.get("references")
    if references is None:     # runs from before B6 kept them: B1's figures are the same
        b1 = results["cases"].get("B1", {}).get("figures", [])
        submit = next((fig["values"] for fig in b1 if fig["key"] == "submit"), {})
        references = {name: rate for name, rate in submit.items() if name != "cw" and rate}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    path = out or os.path.join(root, "bench", "results", "b6_workers.png")
    drawn = plot_b6(b6["curve"], references, results.get("config", {}).get("workers", 2), path,
                    lambda msg: print(msg, file=sys.stderr))
    if drawn:
        print(f"B6 plot from {json_path} in {os.path.relpath(drawn)}")
    return 0 if drawn else 1


def run(args, root: str) -> int:
    from cw.wire.auth import load_secret

    from . import cases as cases_mod
    from . import procinfo, report, separate, systems

    load_secret(create=True)
    wanted = [s.strip().lower() for s in args.systems.split(",") if s.strip()] or list(systems.ALL)
    for name in wanted:
        if name not in systems.ALL:
            print(f"unknown system {name!r}; choose from {', '.join(systems.ALL)}", file=sys.stderr)
            return 2
    unavailable = {n: why for n in wanted if (why := systems.available(n))}
    names = [n for n in wanted if n not in unavailable]
    only = [c.strip().upper() for c in args.only.split(",") if c.strip()] or list(cases_mod.CASES)
    for cid in only:
        if cid not in cases_mod.CASES:
            print(f"unknown case {cid!r}; choose from {', '.join(cases_mod.CASES)}", file=sys.stderr)
            return 2
    reps = args.reps or (1 if args.quick else 3)
    results_dir = os.path.join(root, "bench", "results")
    os.makedirs(results_dir, exist_ok=True)
    out_path = args.out or os.path.join(results_dir, "latest.json")

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    script = cases_mod.ScriptFunctions(noop, burn, eigvals)
    ctx = cases_mod.Context(args.quick, names, args.workers, reps, results_dir, log, args.limit, script, args.child)
    config = {"quick": args.quick, "workers": args.workers, "reps": reps, "limit_s": ctx.limit,
              "systems": names, "unavailable": unavailable, "cases": only, "argv": sys.argv[1:]}
    info = report.machine()
    print(report.header(info, config), flush=True)
    done: dict = {}
    t_start = time.perf_counter()
    for cid in only:
        if not args.child:
            log(f"[{cid}] running ...")
        t0 = time.perf_counter()
        watch = procinfo.Contention()
        case = cases_mod.CASES[cid](ctx)
        for name in sorted(ctx.separate) if cid in separate.IN_PROCESS else ():
            t1 = time.perf_counter()
            separate.merge(case, name, *separate.measure(name, cid, ctx, root))
            log(f"  {name} (child process): {time.perf_counter() - t1:.1f} s")
            if cid == "B1":
                ctx.submit_rates[name] = case.value("submit", name)
        case.flush_partials()
        case.contention = watch.stop()
        case.seconds = time.perf_counter() - t0
        done[cid] = case
        print()
        print(report.table(case, case.columns or names), flush=True)
    target_results = report.targets(done)
    print()
    print(report.targets_table(target_results))
    busy = max((c.contention.get("other_share", 0) for c in done.values()), default=0)
    if busy > 0.1:
        print(f"\nWARNING: other processes used up to {busy * 100:.0f}% of this machine's CPUs during a case; "
              "the figures are noisy (see each case's header line).")
    total = time.perf_counter() - t_start
    config["total_seconds"] = total
    digest = report.cw_fingerprint()
    config["cw_source_digest_at_end"] = digest
    if digest != info["cw_source_digest"]:
        print(f"\nWARNING: cw's source changed during the run (digest {info['cw_source_digest']} -> {digest}): "
              "cases after the change measured other code.")
    with open(out_path, "w") as f:
        json.dump(report.to_json(info, config, done, target_results), f, indent=1, default=str)
    plot = done.get("B6") and done["B6"].extra.get("plot")
    print(f"\ntotal {total:.0f} s; results in {os.path.relpath(out_path)}" +
          (f", B6 plot in {os.path.relpath(plot)}" if plot else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
