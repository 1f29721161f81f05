"""The benchmark cases B1..B7 (B8 and B9 are in ``b8_b9.py``, B10 in ``b10.py``).

Each case is a function ``case(ctx) -> Case``: it runs every selected system
one right after the other (so they see the same machine load) and fills a
``Case`` with named figures, one value per system.  A system that cannot take
part in a case gets None and a note saying why.
"""
from __future__ import annotations

import contextlib
import json
import os
import statistics
import subprocess
import sys
import threading
import time
import traceback
from dataclasses import dataclass, field

from . import jobs, procinfo, systems

HIGHER, LOWER, INFO = "higher", "lower", None
BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(BENCH_DIR)


@dataclass
class Figure:
    key: str
    label: str
    unit: str
    better: str | None = None        # HIGHER, LOWER, or INFO (no direction)
    values: dict = field(default_factory=dict)   # system -> float or None
    samples: dict = field(default_factory=dict)  # system -> every repetition's value


@dataclass
class Case:
    id: str
    title: str
    params: dict
    figures: list[Figure] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    extra: dict = field(default_factory=dict)
    seconds: float = 0.0
    contention: dict = field(default_factory=dict)
    columns: list | None = None     # the systems shown, when not the run's (B10 adds its reference)

    def figure(self, key, label, unit, better=INFO) -> Figure:
        fig = Figure(key, label, unit, better)
        self.figures.append(fig)
        return fig

    def partial(self, system, what, done, n, limit) -> None:
        """Records that a timed batch hit the time limit (see ``flush_partials``)."""
        if done < n:
            self.extra.setdefault("partial", {}).setdefault(f"{system}: {what}", []).append(
                {"done": done, "of": n, "limit_s": limit})

    def flush_partials(self) -> None:
        for key, runs in self.extra.get("partial", {}).items():
            dones = " / ".join(f"{r['done']:,}" for r in runs)
            self.notes.insert(0, f"{key} stopped at the time limit of {runs[0]['limit_s']:g} s "
                                 f"({len(runs)} time(s); calls done: {dones} of {runs[0]['of']:,}); "
                                 "its figure is over the calls done.")

    def get(self, key) -> Figure:
        return next(f for f in self.figures if f.key == key)

    def value(self, key, system):
        return self.get(key).values.get(system)

    def set(self, system, samples: dict) -> None:
        """Stores each figure's median over ``samples[key]`` (a list) for ``system``."""
        for fig in self.figures:
            vals = samples.get(fig.key)
            if vals is None:
                fig.values.setdefault(system, None)
                continue
            vals = [v for v in vals if v is not None]
            fig.samples[system] = vals
            fig.values[system] = statistics.median(vals) if vals else None


class Context:
    def __init__(self, quick: bool, systems_: list[str], nworkers: int, reps: int, results_dir: str, log,
                 limit: float | None = None, script=None, child: bool = False):
        self.quick = quick
        # Systems measured in a child process of their own (systems.SEPARATE),
        # whose figures __main__ merges in: the cases' loops leave them out.
        self.child = child
        self.separate = set() if child else set(systems.SEPARATE) & set(systems_)
        # The functions defined in the benchmark's __main__, as in a user's script
        # (bench/__main__.py passes them); bench.jobs stands in when there is none.
        self.script = script or ScriptFunctions(jobs.noop, jobs.burn, None)
        # Each timed batch gets at most this many seconds: a system that is
        # slower (Dask) is measured over the calls it finished by then.
        self.limit = limit if limit is not None else (6.0 if quick else 30.0)
        if self.limit <= 0:
            self.limit = None
        self.systems = systems_
        self.nworkers = nworkers
        self.reps = reps
        self.results_dir = results_dir
        self.log = log
        self.submit_rates: dict = {}   # B1's submit calls/s of the other systems: B6's plot draws them beside cw

    def local(self) -> list[str]:
        """The systems this process starts itself."""
        return [name for name in self.systems if name not in self.separate]

    def size(self, quick, full):
        return quick if self.quick else full


@dataclass
class ScriptFunctions:
    """The functions a user's script would submit, defined in its ``__main__``."""
    noop: object
    burn: object
    eigvals: object

    @property
    def in_main(self) -> bool:
        return getattr(self.noop, "__module__", None) == "__main__"

    def new_noop_lambda(self):
        """A notebook's ``ex.submit(lambda: None)``: a new function object each call
        (made in __main__ when the script supplies a maker, so its globals are __main__'s)."""
        maker = getattr(self.noop, "__globals__", {}).get("new_noop_lambda")
        return maker() if maker else (lambda *args: None)

    def new_burn_lambda(self, loops):
        maker = getattr(self.burn, "__globals__", {}).get("new_burn_lambda")
        return maker(loops) if maker else (lambda: jobs.burn(loops))


def noop_calls(ctx) -> list[tuple[str, str, object]]:
    """B1/B2's variants: (figure key suffix, label, make() -> (fn, args)); the
    first one, a function of the script's __main__, is the headline."""
    s = ctx.script
    return [("", "script function", lambda: (s.noop, ())),
            ("_module", "module function", lambda: (jobs.noop, ())),
            ("_lambda", "new lambda per call", lambda: (s.new_noop_lambda(), ()))]


def can_run(case: Case, system, make, label: str) -> bool:
    """Runs one call of a variant (which also warms it up); a system that cannot
    run it (ProcessPoolExecutor cannot pickle a lambda) gets a note, once."""
    try:
        fn, args = make()
        system.result(system.submit(fn, *args))
        return True
    except Exception as exc:  # noqa: BLE001 - reported as a note
        note = f"{system.name}: cannot run a {label}: {type(exc).__name__}: {str(exc)[:120]}"
        if note not in case.notes:
            case.notes.append(note)
        return False


def _fail(case: Case, name: str, what: str, exc: BaseException, log) -> None:
    log(f"  {name}: FAILED during {what}: {exc!r}")
    log("".join(traceback.format_exception(exc)).rstrip())
    lines = [line for line in str(exc).splitlines() if line.strip()]
    short = lines[0] + (f" ... {lines[-1].strip()}" if len(lines) > 1 else "") if lines else ""
    case.notes.append(f"{name}: failed during {what}: {type(exc).__name__}: {short[:300]} (details on stderr)")


def run_systems(ctx: Context, case: Case, measure, nworkers: int | None = None, reps: int | None = None,
                names=None) -> None:
    """For each system: start it, run ``measure(system) -> {key: value}`` ``reps``
    times, store the medians, stop it."""
    nworkers = ctx.nworkers if nworkers is None else nworkers
    reps = ctx.reps if reps is None else reps
    for name in names or ctx.local():
        t0 = time.perf_counter()
        samples: dict[str, list] = {}
        try:
            system = systems.start(name, nworkers)
        except Exception as exc:
            _fail(case, name, f"start with {nworkers} workers", exc, ctx.log)
            case.set(name, {})
            continue
        try:
            for _ in range(reps):
                for key, value in measure(system).items():
                    samples.setdefault(key, []).append(value)
        except Exception as exc:
            _fail(case, name, "the measurement", exc, ctx.log)
        finally:
            with contextlib.suppress(Exception):
                system.close()
        case.set(name, samples)
        ctx.log(f"  {name}: {time.perf_counter() - t0:.1f} s")


def _wait_all(system, n, fn=jobs.noop, *args):
    futures = [system.submit(fn, *args) for _ in range(n)]
    results = system.results(futures)
    assert len(results) == n
    return results


def _cpu_sum(pids) -> float | None:
    try:
        return sum(procinfo.cpu_seconds(pid) for pid in pids)
    except OSError:
        return None


def _timed_batch(system, n, limit=None, make=lambda: (jobs.noop, ())) -> tuple[int, float]:
    """Submits ``n`` calls at once (each ``fn(*args)`` for ``fn, args = make()``)
    and waits for all of them, or for ``limit`` seconds from the start (the rest
    is cancelled).  Returns (done, seconds)."""
    t0 = time.perf_counter()
    futures = []
    for _ in range(n):
        fn, args = make()
        futures.append(system.submit(fn, *args))
    if limit is None:
        assert len(system.results(futures)) == n
        return n, time.perf_counter() - t0
    done = system.wait(futures, max(0.0, limit - (time.perf_counter() - t0)))
    elapsed = time.perf_counter() - t0
    if done < n:
        system.cancel(futures)
    return done, elapsed


def _partial(case, name, what, done, n, limit) -> None:
    case.partial(name, what, done, n, limit)


# --- B1 ---------------------------------------------------------------------

def b1(ctx: Context) -> Case:
    n = ctx.size(3_000, 20_000)
    n_chunked = 10 * n
    case = Case("B1", "no-op call throughput", {"calls": n, "chunked_calls": n_chunked, "chunksize": 1000})
    variants = noop_calls(ctx)
    # Ray exports every new function before its call runs (~50 calls/s here):
    # the notebook-style batch is smaller, so Ray's backlog after the time limit
    # stays short.
    counts = {"": n, "_module": n, "_lambda": max(100, n // 10)}
    for suffix, label, _ in variants:
        case.figure("submit" + suffix, f"submit x{counts[suffix]:,}, wait all: {label}", "calls/s", HIGHER)
    case.figure("map", f"map x{n:,} (chunksize default): script function", "calls/s", HIGHER)
    case.figure("map_chunked", f"map x{n_chunked:,} chunksize=1000: script function", "calls/s", HIGHER)
    for suffix, label, _ in variants:
        case.figure("worker_cpu" + suffix, f"worker processes' CPU per call: {label}", "us", LOWER)
    case.figure("client_cpu", "client process CPU per call: script function", "us", LOWER)
    case.figure("master_cpu", "master / scheduler processes' CPU per call: script function", "us", LOWER)
    case.figure("worker_busy", "worker processes' CPU use during submit: script function", "%", INFO)
    case.figure("master_busy", "master / scheduler processes' CPU use during submit: script fn", "%", INFO)

    def measure(system):
        out = {}
        for suffix, label, make in variants:
            if not can_run(case, system, make, label):
                continue
            workers, services = system.worker_pids(), system.service_pids()
            w0, m0 = _cpu_sum(workers), _cpu_sum(services)
            cpu0 = time.process_time()
            done, elapsed = _timed_batch(system, counts[suffix], ctx.limit, make)
            _partial(case, system.name, "submit" + suffix, done, counts[suffix], ctx.limit)
            out["submit" + suffix] = done / elapsed
            if not suffix:
                out["client_cpu"] = (time.process_time() - cpu0) / max(done, 1) * 1e6
                if services and m0 is not None and (m1 := _cpu_sum(services)) is not None:
                    out["master_cpu"] = (m1 - m0) / max(done, 1) * 1e6
                    out["master_busy"] = (m1 - m0) / elapsed * 100
            if workers and w0 is not None and (w1 := _cpu_sum(workers)) is not None:
                out["worker_cpu" + suffix] = (w1 - w0) / max(done, 1) * 1e6
                if not suffix:
                    out["worker_busy"] = (w1 - w0) / (elapsed * len(workers)) * 100
            system.settle()
        for key, count, chunksize in (("map", n, None), ("map_chunked", n_chunked, 1000)):
            t0 = time.perf_counter()
            done = system.map_count(ctx.script.noop, range(count), chunksize, ctx.limit)
            out[key] = done / (time.perf_counter() - t0)
            _partial(case, system.name, key, done, count, ctx.limit)
            system.settle()
        return out

    run_systems(ctx, case, measure)
    ctx.submit_rates = {name: case.value("submit", name) for name in ctx.systems if name != "cw"}
    case.notes.append(_script_note(ctx))
    case.notes.append("client CPU includes every thread of the client process (cw's reader thread; "
                      "the pools' management thread; Dask's scheduler, which LocalCluster runs in the client; "
                      "Ray's core worker threads). Master / scheduler: cw's master process; Ray's gcs_server and "
                      "raylet. Worker CPU use = the workers' CPU time / (wall time x workers): below 100% they "
                      "wait for work while calls are queued.")
    if "dask" in ctx.systems or "ray" in ctx.systems:
        case.notes.append("Dask and Ray have no map chunksize: chunked map runs one task per chunk of 1000 calls; "
                          "Ray's map is one task per item.")
    if "ray" in ctx.systems:
        case.notes.append("ray: each function is wrapped once with ray.remote (as a user decorates it once); "
                          "a new lambda per call is wrapped (and exported) with each call.")
    return case


def _script_note(ctx) -> str:
    if ctx.script.in_main:
        return ("script function = defined in the benchmark's __main__ (bench/__main__.py run by python -m bench), "
                "as in a user's script: cloudpickle sends it by value (cw, loky, Dask, Ray); ProcessPoolExecutor "
                "(fork) pickles it by reference. module function = bench.jobs, imported by every worker. "
                "new lambda per call = a notebook's ex.submit(lambda: None) in a loop.")
    return ("WARNING: the script functions are NOT __main__ functions in this run (the benchmark was not started "
            "with python -m bench): they travel by reference like the module functions.")


# --- B2 ---------------------------------------------------------------------

def b2(ctx: Context) -> Case:
    n = ctx.size(300, 2_000)
    case = Case("B2", "sequential round trip, submit(fn).result()", {"calls": n})
    variants = noop_calls(ctx)
    case.figure("median", "median round trip: script function", "us", LOWER)
    case.figure("p99", "p99 round trip: script function", "us", LOWER)
    for suffix, label, _ in variants[1:]:
        case.figure("median" + suffix, f"median round trip: {label}", "us", LOWER)
        case.figure("p99" + suffix, f"p99 round trip: {label}", "us", LOWER)

    def measure(system):
        out = {}
        for suffix, label, make in variants:
            if not can_run(case, system, make, label):
                continue
            for _ in range(20):
                fn, args = make()
                system.result(system.submit(fn, *args))
            lat = []
            deadline = None if ctx.limit is None else time.perf_counter() + ctx.limit
            for _ in range(n):
                fn, args = make()
                t0 = time.perf_counter()
                system.result(system.submit(fn, *args))
                lat.append(time.perf_counter() - t0)
                if deadline is not None and t0 > deadline:
                    break
            _partial(case, system.name, "the round trips" + suffix, len(lat), n, ctx.limit)
            lat.sort()
            out["median" + suffix] = statistics.median(lat) * 1e6
            out["p99" + suffix] = lat[min(len(lat) - 1, int(round(0.99 * (len(lat) - 1))))] * 1e6
        return out

    run_systems(ctx, case, measure)
    case.notes.append(_script_note(ctx))
    return case


# --- B3 ---------------------------------------------------------------------

def b3(ctx: Context) -> Case:
    size = 100 * 1_000_000
    runs = ctx.size(3, 5)
    mb = size // 1_000_000
    case = Case("B3", f"a {mb} MB bytes argument / result", {"bytes": size, "runs": runs})
    case.figure("arg", f"{mb} MB argument -> worker", "MB/s", HIGHER)
    case.figure("result", f"{mb} MB result -> client", "MB/s", HIGHER)
    case.figure("arg_first", f"first {mb} MB argument", "MB/s", INFO)
    case.figure("result_first", f"first {mb} MB result", "MB/s", INFO)
    data = b"\x00" * size

    def transfer(system):
        t0 = time.perf_counter()
        assert system.result(system.submit(jobs.nbytes, data)) == size
        arg = size / 1e6 / (time.perf_counter() - t0)
        t0 = time.perf_counter()
        assert len(system.result(system.submit(jobs.make_bytes, size))) == size
        return arg, size / 1e6 / (time.perf_counter() - t0)

    def measure(system):
        out = {}
        if system not in started:
            started.add(system)
            system.result(system.submit(jobs.nbytes, b"x" * 1000))
            out["arg_first"], out["result_first"] = transfer(system)
        out["arg"], out["result"] = transfer(system)
        return out

    started: set = set()
    run_systems(ctx, case, measure, reps=runs)
    case.notes.append(f"median of {runs} runs after a first one, which is shown on its own: there every "
                      "process touches fresh memory (the kernel faults it in a page at a time), later runs "
                      "may reuse memory; MB = 10^6 bytes; the result time includes the worker building the "
                      "bytes (b'x' * N).")
    return case


# --- B4 ---------------------------------------------------------------------

def calibrate_burn(target_s: float = 0.05) -> int:
    loops = 200_000
    jobs.burn(loops)
    best = min(_timed(jobs.burn, loops) for _ in range(5))
    return max(1000, int(loops * target_s / best))


def _timed(fn, *args) -> float:
    t0 = time.perf_counter()
    fn(*args)
    return time.perf_counter() - t0


def bare_speedup(loops: int, n: int, reps: int) -> tuple[float, list, list]:
    """The machine's own parallel speed-up: ``2n`` burns in one bare process vs
    2 burns in each of ``n`` processes at once (timed inside the processes, so
    process start-up is left out), alternated ``reps`` times."""
    import multiprocessing
    mp = multiprocessing.get_context("fork")

    def run(nprocs, count):
        pipes, procs = [], []
        for _ in range(nprocs):
            r, w = mp.Pipe(duplex=False)
            p = mp.Process(target=jobs.burn_timed, args=(loops, count, w))
            p.start()
            w.close()
            pipes.append(r)
            procs.append(p)
        times = [r.recv() for r in pipes]
        for p in procs:
            p.join()
        return max(times)

    t1s, tns = [], []
    for _ in range(reps):
        t1s.append(run(1, 2 * n))
        tns.append(run(n, 2))
    return statistics.median(t1s) / statistics.median(tns), t1s, tns


def b4(ctx: Context) -> Case:
    n = ctx.nworkers
    loops = calibrate_burn()
    job_s = statistics.median(_timed(jobs.burn, loops) for _ in range(5))
    njobs = 2 * n
    reps = 5 if ctx.quick else 9
    case = Case("B4", f"CPU-bound speed-up: {njobs} jobs of ~{job_s * 1000:.0f} ms, 1 vs {n} workers",
                {"jobs": njobs, "loops": loops, "job_s_in_client": job_s, "reps": reps})
    script = ctx.script
    variants = [("", "script function", lambda: (script.burn, (loops,))),
                ("_module", "module function", lambda: (jobs.burn, (loops,))),
                ("_lambda", "new lambda per call", lambda: (script.new_burn_lambda(loops), ()))]
    for suffix, label, _ in variants:
        case.figure("speedup" + suffix, f"speed-up 1 -> {n} workers: {label}", "x", HIGHER)
    case.figure("t1", "batch time, 1 worker: script function", "s", LOWER)
    case.figure("tn", f"batch time, {n} workers: script function", "s", LOWER)
    case.figure("efficiency", f"batch time {n} workers / ideal ({njobs} x job / {n})", "x", LOWER)
    bare, bare1, baren = bare_speedup(loops, n, 1 if ctx.child else reps)
    case.extra["bare_processes"] = {"speedup": bare, "t1": bare1, "tn": baren}
    if not ctx.child:
        ctx.log(f"  bare processes: speed-up {bare:.2f}")

    def batch(system, make):
        t0 = time.perf_counter()
        futures = []
        for _ in range(njobs):
            fn, args = make()
            futures.append(system.submit(fn, *args))
        assert len(system.results(futures)) == njobs
        return time.perf_counter() - t0

    for name in ctx.local():
        t0 = time.perf_counter()
        one = many = None
        times: dict[str, tuple[list, list]] = {}
        try:
            many = systems.start(name, n)
            one = many.one_worker_view() or systems.start(name, 1)
            runnable = [(suffix, make) for suffix, label, make in variants
                        if can_run(case, one, make, label) and can_run(case, many, make, label)]
            for suffix, make in runnable:
                times[suffix] = ([], [])
                batch(one, make)
                batch(many, make)
            for _ in range(reps):       # alternate, so both see the same CPU speed
                for suffix, make in runnable:
                    times[suffix][0].append(batch(one, make))
                    times[suffix][1].append(batch(many, make))
        except Exception as exc:
            _fail(case, name, "the measurement", exc, ctx.log)
        finally:
            for system in (one, many):
                if system is not None:
                    with contextlib.suppress(Exception):
                        system.close()
        samples = {}
        for suffix, (t1s, tns) in times.items():
            t1 = statistics.median(t1s) if t1s else None
            tn = statistics.median(tns) if tns else None
            samples["speedup" + suffix] = [t1 / tn if t1 and tn else None]
            if not suffix:
                samples.update(t1=[t1], tn=[tn], efficiency=[tn / (njobs * job_s / n) if tn else None])
        case.set(name, samples)
        if "" in times:
            case.get("t1").samples[name], case.get("tn").samples[name] = times[""]
        ctx.log(f"  {name}: {time.perf_counter() - t0:.1f} s")
    case.notes.append(f"jobs: burn({loops:,}), a pure-Python loop calibrated to ~50 ms in the client "
                      f"({job_s * 1000:.1f} ms measured); a 1-worker and a {n}-worker instance of each system "
                      f"run batches alternately, {reps} each per variant; speed-up = median batch time on 1 worker "
                      f"/ on {n}. This machine's CPU speed drifts (virtual CPUs), hence the alternation.")
    if "ray" in ctx.systems:
        case.notes.append(f"ray: one ray.init per process, so its 1-worker batches run on the same {n}-CPU node "
                          f"with every task asking for num_cpus={n} (one task at a time).")
    case.notes.append(f"reference: bare processes (no pool, timed inside) give a speed-up of {bare:.2f} here "
                      f"right now: roughly the ceiling for every system.")
    return case


# --- B5 ---------------------------------------------------------------------

def b5(ctx: Context) -> Case:
    n = ctx.size(20_000, 200_000)
    case = Case("B5", f"{n:,} no-op calls submitted at once", {"calls": n})
    case.figure("time", "total time to all results", "s", LOWER)
    case.figure("rate", "throughput", "calls/s", HIGHER)
    case.figure("client_mem", "client peak RSS growth", "MiB", LOWER)
    case.figure("master_mem", "master peak RSS growth", "MiB", LOWER)
    case.figure("queued_bytes", "master bytes per queued job beyond payload", "B", LOWER)
    case.figure("queued_total", "master bytes per queued job (all)", "B", INFO)
    limit = 10.0 if ctx.quick else 120.0    # seconds per system
    for name in ctx.systems:
        t0 = time.perf_counter()
        samples: dict[str, list] = {}
        try:
            cmd = [sys.executable, "-m", "bench.b5_child", name, str(n), str(ctx.nworkers), str(limit)]
            proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=limit + 300)
            if proc.returncode != 0:
                raise RuntimeError(f"exit status {proc.returncode}: {proc.stderr.strip()[-2000:]}")
            out = json.loads(proc.stdout.strip().splitlines()[-1])
        except Exception as exc:
            _fail(case, name, "the measurement (child process)", exc, ctx.log)
            out = None
        if out is not None:
            if out["time_s"] is None:
                case.notes.append(f"{name}: stopped after the limit of {limit:g} s per system with "
                                  f"{out['done']:,} of {n:,} calls done; its throughput is over those.")
            samples["time"] = [out["time_s"]]
            samples["rate"] = [out["done"] / out["elapsed_s"]]
            samples["client_mem"] = [out["client_peak_growth_mib"]]
            if "master_peak_growth_mib" in out:
                samples["master_mem"] = [out["master_peak_growth_mib"]]
            case.extra.setdefault("child", {})[name] = out
        if name == "cw":
            try:
                q = queued_bytes(ctx, n)
                samples["queued_bytes"] = [q["beyond_payload"]]
                samples["queued_total"] = [q["per_job"]]
                case.extra["queued"] = q
            except Exception as exc:
                _fail(case, name, "the queued-job memory measurement", exc, ctx.log)
        case.set(name, samples)
        ctx.log(f"  {name}: {time.perf_counter() - t0:.1f} s")
    case.notes.append("each system runs in a fresh child process, so its client peak RSS is its own; "
                      "one run per system (not a median). Dask's scheduler runs inside the client process "
                      "(LocalCluster), the pools' queue management too; only cw has a separate master.")
    if "cw" in ctx.systems and "queued" in case.extra:
        q = case.extra["queued"]
        case.notes.append(f"queued-job memory: cw master with no workers, {q['jobs']:,} no-op jobs queued: "
                          f"RSS {q['idle_kib'] / 1024:.1f} -> {q['full_kib'] / 1024:.1f} MiB, "
                          f"{q['per_job']:.0f} B/job of which payload {q['payload']} B.")
    return case


def queued_bytes(ctx: Context, n: int) -> dict:
    """RSS of a cw master holding ``n`` queued no-op jobs (no workers) minus its idle RSS, per job."""
    from cw.wire.payload import dumps_call
    payload = len(dumps_call(jobs.noop, (), {}))
    system = systems.start("cw", 0, warm=False)
    try:
        ex = system.executor
        pid = system.master_pid
        ex.status()
        time.sleep(0.2)
        idle = procinfo.rss_kib(pid)
        futures = [ex.submit(jobs.noop) for _ in range(n)]
        deadline = time.monotonic() + 300
        queued = None
        while time.monotonic() < deadline:
            queued = ex.status(timeout=60).get("queued")
            if queued is not None and queued >= n:
                break
            time.sleep(0.1)
        if queued is None or queued < n:
            raise RuntimeError(f"the master reports {queued} queued jobs, expected {n}")
        time.sleep(0.2)
        full = procinfo.rss_kib(pid)
        per_job = (full - idle) * 1024 / n
        del futures
    finally:
        # Stop the master first: cancelling every queued future would send a CANCEL each.
        system.cluster.stop()
        with contextlib.suppress(Exception):
            system.executor.shutdown(wait=False, cancel_futures=True)
    return {"jobs": n, "idle_kib": idle, "full_kib": full, "per_job": per_job, "payload": payload,
            "beyond_payload": per_job - payload}


# --- B6 ---------------------------------------------------------------------

def start_idle_workers(host: str, port: int, count: int, timeout: float = 300) -> subprocess.Popen:
    from cw.launch.local import read_line
    proc = subprocess.Popen([sys.executable, "-m", "bench.idle_workers", host, str(port), str(count)],
                            cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        line = read_line(proc, timeout)
    except BaseException:
        stop_idle_workers(proc)
        raise
    if not line.startswith("ready"):
        stop_idle_workers(proc)
        raise RuntimeError(f"the idle-worker helper did not start (exit status {proc.poll()}, said {line!r})")
    return proc


def stop_idle_workers(proc: subprocess.Popen) -> int | None:
    """Closes the helper's stdin (it exits), returns how many jobs its connections ran."""
    ran = None
    try:
        out, _ = proc.communicate(timeout=30)   # closes its stdin: the helper's signal to exit
        for line in out.splitlines():
            if line.startswith("ran "):
                ran = int(line.split()[1])
    except subprocess.TimeoutExpired:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return ran


def _wait_workers(ex, n: int, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while True:
        have = len(ex.status(timeout=60)["workers"])
        if have == n:
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"the master has {have} workers, expected {n}")
        time.sleep(0.1)


def b6(ctx: Context) -> Case:
    n = ctx.size(3_000, 20_000)
    points = [0, 50, 200] if ctx.quick else [0, 100, 500, 2000]
    top = points[-1]
    case = Case("B6", f"submit throughput with {top:,} extra connected workers", {"calls": n, "points": points})
    case.figure("base", f"submit x{n:,}, no extra workers", "calls/s", HIGHER)
    case.figure("loaded", f"submit x{n:,}, {top:,} extra workers", "calls/s", HIGHER)
    case.figure("ratio", f"throughput with {top:,} extra / with none", "x", HIGHER)
    case.figure("cpu_base", "master CPU per call, no extra workers", "us", LOWER)
    case.figure("cpu_loaded", f"master CPU per call, {top:,} extra workers", "us", LOWER)
    curve = {}
    for name in ctx.systems:
        if name != "cw":
            why = {"ppe": "ProcessPoolExecutor has no notion of extra connected workers",
                   "loky": "loky's pool has no notion of extra connected workers",
                   "ray": "Ray's workers are its raylet's processes; it has no notion of extra connected "
                          "workers on one node",
                   "dask": f"{top:,} extra Dask workers (each a Worker with its own heartbeats, or a process) "
                           "are not practical on this machine"}[name]
            case.notes.append(f"{name}: skipped: {why}.")
            case.set(name, {})
            continue
        t0 = time.perf_counter()
        system = None
        try:
            system = systems.start("cw", ctx.nworkers)
            cl = system.cluster
            for extra in points:
                helper = start_idle_workers(cl.host, cl.port, extra) if extra else None
                try:
                    _wait_workers(system.executor, ctx.nworkers + extra)
                    _wait_all(system, 200, ctx.script.noop)
                    rates, cpu = [], []
                    for _ in range(ctx.reps):
                        m0 = procinfo.cpu_seconds(system.master_pid)
                        t1 = time.perf_counter()
                        _wait_all(system, n, ctx.script.noop)
                        rates.append(n / (time.perf_counter() - t1))
                        cpu.append((procinfo.cpu_seconds(system.master_pid) - m0) / n * 1e6)
                finally:
                    ran = stop_idle_workers(helper) if helper else 0
                curve[extra] = {"rates": rates, "median": statistics.median(rates), "helper_jobs": ran,
                                "master_cpu_us": statistics.median(cpu),
                                "submitted": 200 + len(rates) * n}
                ctx.log(f"  cw + {extra} extra workers: {statistics.median(rates):,.0f} calls/s, "
                        f"master {statistics.median(cpu):.0f} us CPU/call "
                        f"({ran} jobs ran on the extra workers)")
                _wait_workers(system.executor, ctx.nworkers)
        except Exception as exc:
            _fail(case, name, "the measurement", exc, ctx.log)
        finally:
            if system is not None:
                with contextlib.suppress(Exception):
                    system.close()
        base = curve.get(0, {}).get("median")
        loaded = curve.get(top, {}).get("median")
        case.set("cw", {"base": [base], "loaded": [loaded],
                        "ratio": [loaded / base if base and loaded else None],
                        "cpu_base": [curve.get(0, {}).get("master_cpu_us")],
                        "cpu_loaded": [curve.get(top, {}).get("master_cpu_us")]})
        ctx.log(f"  {name}: {time.perf_counter() - t0:.1f} s")
    if curve:
        case.extra["curve"] = {str(k): v for k, v in curve.items()}
        if top in curve:
            case.notes.append(
                f"caveat: the extra workers are {top:,} real connections held by ONE helper process "
                f"(bench/idle_workers.py) that runs whatever jobs it gets, one at a time; the master hands "
                f"them jobs too ({curve[top]['helper_jobs'] or 0:,} of the {curve[top]['submitted']:,} submitted "
                "ran there), and that helper competes for this machine's cores.")
        case.extra["references"] = {k: v for k, v in ctx.submit_rates.items() if v}
        case.extra["plot"] = plot_b6(curve, case.extra["references"], ctx.nworkers,
                                     os.path.join(ctx.results_dir, "b6_workers.png"), ctx.log)
    return case


def plot_b6(curve: dict, references: dict, nworkers: int, path: str, log) -> str | None:
    """Draws cw's throughput against extra connected workers (``curve``:
    {extra: {"median", "rates", ...}}) and, as flat lines, the other systems'
    B1 submit throughput of the same run (``references``: {system: calls/s}):
    they have no notion of connected workers, so that is their one figure."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("  matplotlib is not importable: no B6 plot")
        return None
    curve = {int(k): v for k, v in curve.items()}
    xs = sorted(curve)
    ys = [curve[x]["median"] for x in xs]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(xs, ys, "o-", label="cw submit throughput")
    for x in xs:
        ax.plot([x] * len(curve[x]["rates"]), curve[x]["rates"], "k.", alpha=0.4)
        ran = curve[x].get("helper_jobs")
        if x and ran is not None:
            ax.annotate(f"{100 * ran / curve[x]['submitted']:.0f}% ran on\nextra workers",
                        (x, curve[x]["median"]), textcoords="offset points", xytext=(4, 8),
                        ha="left" if x < xs[-1] else "right", fontsize=7)
    for (name, rate), style in zip(sorted(references.items()), ("--", ":", "-."), strict=False):
        ax.axhline(rate, linestyle=style, color="gray", label=f"{name}, {nworkers} workers (B1 submit)")
    ax.set_xlabel("extra connected workers")
    ax.set_ylabel("no-op calls/s (submit, wait all)")
    ax.set_title(f"throughput vs connected workers ({nworkers} real workers each)")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


# --- B7 ---------------------------------------------------------------------

def b7(ctx: Context) -> Case:
    nclients = 10
    n = ctx.size(300, 2_000)
    case = Case("B7", f"{nclients} clients x {n:,} no-op calls at once", {"clients": nclients, "calls": n})
    case.figure("aggregate", "aggregate throughput", "calls/s", HIGHER)
    case.figure("min", "slowest client's throughput", "calls/s", HIGHER)
    case.figure("max", "fastest client's throughput", "calls/s", HIGHER)
    case.figure("deviation", "max deviation from an equal share", "%", LOWER)

    def measure(system):
        clients = [system.client() for _ in range(nclients)]
        try:
            for c in clients:
                c.results([c.submit(jobs.noop) for _ in range(5)])
            barrier = threading.Barrier(nclients + 1)
            ends = [None] * nclients
            dones = [0] * nclients
            errors = []
            limit = ctx.limit

            def run(i):
                c = clients[i]
                try:
                    barrier.wait()
                    futures = [c.submit(jobs.noop) for _ in range(n)]
                    if limit is None:
                        c.results(futures)
                        dones[i] = n
                    else:
                        dones[i] = c.wait(futures, max(0.0, start + limit - time.perf_counter()))
                        if dones[i] < n:
                            c.cancel(futures)
                    ends[i] = time.perf_counter()
                except Exception as exc:  # reported below
                    errors.append(exc)

            threads = [threading.Thread(target=run, args=(i,)) for i in range(nclients)]
            for t in threads:
                t.start()
            start = time.perf_counter()          # the threads read it once the barrier releases them
            barrier.wait()
            for t in threads:
                t.join()
            if errors:
                raise errors[0]
        finally:
            for c in clients:
                with contextlib.suppress(Exception):
                    c.close()
            system.settle()
        _partial(case, system.name, "some clients", sum(dones), nclients * n, limit)
        rates = [d / (end - start) for d, end in zip(dones, ends, strict=True)]
        mean = statistics.mean(rates)
        return {"aggregate": sum(dones) / (max(ends) - start), "min": min(rates), "max": max(rates),
                "deviation": max(abs(r / mean - 1) for r in rates) * 100}

    run_systems(ctx, case, measure)
    case.notes.append(f"{nclients} threads of one process, released together; cw and Dask give each its own "
                      "client connection (ClusterExecutor, distributed.Client), ProcessPoolExecutor and loky "
                      "can only share one executor, Ray one driver (ray.init once per process). A client's "
                      "throughput = its calls / time from the common start to its last result; "
                      "deviation = max |client / mean - 1|.")
    return case


CASES = {"B1": b1, "B2": b2, "B3": b3, "B4": b4, "B5": b5, "B6": b6, "B7": b7}

# B8, B9 and B10 live in modules of their own, which build on the helpers above.
from .b8_b9 import b8, b9  # noqa: E402
from .b10 import b10  # noqa: E402

CASES["B8"] = b8
CASES["B9"] = b9
CASES["B10"] = b10
