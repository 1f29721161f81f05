"""The machine header, the tables, the targets and the JSON file."""
from __future__ import annotations

import datetime
import importlib.metadata
import os
import platform
import subprocess
import sys
from dataclasses import asdict

from .cases import HIGHER, LOWER, ROOT, Case

PACKAGES = ("cluster-workers", "cloudpickle", "loky", "distributed", "dask", "ray", "tornado", "msgpack",
            "matplotlib", "numpy", "threadpoolctl", "uvloop")


def machine() -> dict:
    cpu = "?"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    versions = {}
    for pkg in PACKAGES:
        try:
            versions[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            versions[pkg] = None
    info = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "host": platform.node(),
        "nproc": os.cpu_count(),
        "usable_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "cpu_model": cpu,
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "python_impl": platform.python_implementation(),
        "packages": versions,
        "load_avg_at_start": list(os.getloadavg()),
    }
    try:
        info["mem_total_mib"] = int(open("/proc/meminfo").readline().split()[1]) // 1024
    except (OSError, ValueError, IndexError):
        pass
    info["git"] = _git()
    info["cw_source_digest"] = cw_fingerprint()
    return info


def cw_fingerprint() -> str:
    """A digest of cw's source files, to notice the code changing during a run."""
    import hashlib
    digest = hashlib.sha256()
    src = os.path.join(ROOT, "cw")
    for name in sorted(os.listdir(src)) if os.path.isdir(src) else ():
        if name.endswith(".py"):
            with open(os.path.join(src, name), "rb") as f:
                digest.update(name.encode() + f.read())
    return digest.hexdigest()[:12]


def _git() -> dict | None:
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                              text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", "cw"], cwd=ROOT,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return {"head": head or None, "cw_modified": bool(dirty)}
    except (OSError, subprocess.SubprocessError):
        return None


def header(info: dict, config: dict) -> str:
    pk = ", ".join(f"{k} {v}" for k, v in info["packages"].items() if v)
    git = info.get("git") or {}
    lines = [
        "=" * 100,
        f"cw benchmark  {info['date']}  mode: {'quick' if config['quick'] else 'full'}  "
        f"workers per system: {config['workers']}  repetitions: {config['reps']}  "
        f"time limit per batch: {str(config['limit_s']) + ' s' if config['limit_s'] else 'none'}",
        f"machine: {info['nproc']} CPUs ({info['usable_cpus']} usable), {info['cpu_model']}, "
        f"{info.get('mem_total_mib', '?')} MiB RAM, load {info['load_avg_at_start'][0]:.2f} at start",
        f"python: {info['python_impl']} {info['python']} on {info['platform']}",
        f"packages: {pk}",
        f"cw source: git {git.get('head')}{' + local changes in cw/' if git.get('cw_modified') else ''}"
        f" (digest of cw/*.py {info['cw_source_digest']})",
        f"systems: {', '.join(config['systems'])}",
    ]
    lines += [f"skipped: {name}: {why}" for name, why in config["unavailable"].items()]
    lines.append("=" * 100)
    return "\n".join(lines)


def fmt(value) -> str:
    if value is None:
        return "-"
    a = abs(value)
    if a >= 1000:
        return f"{value:,.0f}"
    if a >= 100:
        return f"{value:.0f}"
    if a >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


def _better(fig) -> str:
    return {HIGHER: "higher=better", LOWER: "lower=better"}.get(fig.better, "info")


def table(case: Case, names: list[str]) -> str:
    others = [n for n in names if n != "cw"] if "cw" in names else []
    label_w = max([len(f"{f.label} ({f.unit})") for f in case.figures] + [30])
    better_w = 13
    col = 11
    head = f"{'figure':<{label_w}}  {'':<{better_w}}" + "".join(f"{n:>{col}}" for n in names) + \
        "".join(f"{'cw/' + n:>{col}}" for n in others)
    busy = case.contention.get("other_share")
    load = f"; other processes used {busy * 100:.0f}% of the CPUs meanwhile" if busy is not None else ""
    lines = [f"{case.id}: {case.title}   [{case.seconds:.0f} s{load}]", head, "-" * len(head)]
    for fig in case.figures:
        if all(fig.values.get(n) is None for n in names):
            continue
        row = f"{fig.label + ' (' + fig.unit + ')':<{label_w}}  {_better(fig):<{better_w}}"
        row += "".join(f"{fmt(fig.values.get(n)):>{col}}" for n in names)
        cw = fig.values.get("cw")
        for n in others:
            other = fig.values.get(n)
            row += f"{(f'{cw / other:.2f}x' if cw is not None and other else '-'):>{col}}"
        lines.append(row)
    for note in case.notes:
        lines.append(f"  note: {note}")
    return "\n".join(lines)


# --- targets -------------------------------------------------------------------

def _ratio_target(cases, cid, key, other, op, factor, what):
    def check():
        case = cases.get(cid)
        if case is None:
            return None, "case not run"
        cw, ref = case.value(key, "cw"), case.value(key, other)
        if cw is None or ref is None:
            return None, f"needs cw and {other}"
        ratio = cw / ref
        ok = ratio >= factor if op == ">=" else ratio <= factor
        return ok, f"cw/{other} = {ratio:.2f}x ({fmt(cw)} vs {fmt(ref)} {case.get(key).unit})"
    return (cid, what, check)


def _abs_target(cases, cid, key, op, limit, what, system="cw"):
    def check():
        case = cases.get(cid)
        if case is None:
            return None, "case not run"
        v = case.value(key, system)
        if v is None:
            return None, f"needs {system}"
        ok = v >= limit if op == ">=" else v <= limit
        return ok, f"{system}: {fmt(v)} {case.get(key).unit} (target {op} {fmt(limit)})"
    return (cid, what, check)


def _b8_bound(cases) -> float:
    case = cases.get("B8")
    return (case.params["workers"] + 1) * case.params["megabytes"] if case is not None else 0


def _best_target(cases, cid, key, others, what):
    """cw's ``key`` (lower is better) at most the best of ``others``'."""
    def check():
        case = cases.get(cid)
        if case is None:
            return None, "case not run"
        cw = case.value(key, "cw")
        theirs = {o: case.value(key, o) for o in others if case.value(key, o) is not None}
        if cw is None or not theirs:
            return None, f"needs cw and one of {', '.join(others)}"
        best = min(theirs, key=theirs.get)
        return cw <= theirs[best], f"cw/{best} = {cw / theirs[best]:.2f}x ({fmt(cw)} vs {fmt(theirs[best])} " \
                                   f"{case.get(key).unit})"
    return (cid, what, check)


def _first_and_later_target(cases, cid, key, other, factor, what):
    """cw / ``other`` >= ``factor`` for both the first run (``key``_first) and the later ones."""
    def check():
        case = cases.get(cid)
        if case is None:
            return None, "case not run"
        ratios = []
        for k in (key + "_first", key):
            cw, ref = case.value(k, "cw"), case.value(k, other)
            if cw is None or ref is None:
                return None, f"needs cw and {other}"
            ratios.append((cw / ref, cw, ref))
        detail = "; ".join(f"{label} cw/{other} = {r:.2f}x ({fmt(cw)} vs {fmt(ref)} {case.get(key).unit})"
                           for label, (r, cw, ref) in zip(("first", "later"), ratios, strict=True))
        return all(r >= factor for r, _, _ in ratios), detail
    return (cid, what, check)


def targets(cases: dict[str, Case]) -> list[dict]:
    checks = [
        _ratio_target(cases, "B1", "submit", "ppe", ">=", 1.3, "cw submit, script function >= 1.3x ppe"),
        _ratio_target(cases, "B1", "submit", "ray", ">=", 5.0, "cw submit, script function >= 5x Ray"),
        _ratio_target(cases, "B1", "worker_cpu", "ppe", "<=", 1.5, "cw worker CPU per no-op call <= 1.5x ppe's"),
        _ratio_target(cases, "B1", "map_chunked", "ppe", ">=", 1.0, "cw map chunksize=1000 >= 1.0x ppe"),
        _ratio_target(cases, "B2", "median", "ppe", "<=", 1.3, "cw median round trip, script fn <= 1.3x ppe"),
        _first_and_later_target(cases, "B3", "arg", "ppe", 2.0, "cw 100 MB argument >= 2x ppe (first too)"),
        _first_and_later_target(cases, "B3", "result", "ppe", 2.0, "cw 100 MB result >= 2x ppe (first too)"),
        _first_and_later_target(cases, "B3", "arg", "ray", 1.0, "cw 100 MB argument >= 1.0x Ray (first too)"),
        _first_and_later_target(cases, "B3", "result", "ray", 1.0, "cw 100 MB result >= 1.0x Ray (first too)"),
        _abs_target(cases, "B4", "speedup", ">=", 1.9, "cw CPU-bound speed-up >= 1.9x"),
        _ratio_target(cases, "B5", "time", "ppe", "<=", 1.0, "cw time for all calls <= ppe"),
        _abs_target(cases, "B5", "queued_bytes", "<=", 300, "cw master <= 300 bytes per queued job beyond payload"),
        _abs_target(cases, "B6", "ratio", ">=", 0.8, "cw throughput with extra workers >= 0.8x without"),
        _abs_target(cases, "B7", "deviation", "<=", 20, "every cw client within 20% of an equal share"),
        _abs_target(cases, "B8", "written_shared", "<=", _b8_bound(cases),
                    "cw master writes <= (workers+1) x the array"),
        _best_target(cases, "B8", "time_shared", ("dask", "ray"), "cw time with put <= the best of Dask and Ray"),
        _ratio_target(cases, "B9", "chain", "dask", ">=", 3.0, "cw dependency chain >= 3x Dask's jobs/s"),
        _ratio_target(cases, "B9", "chain", "ray", ">=", 1.0, "cw dependency chain >= Ray's jobs/s"),
        _ratio_target(cases, "B9", "tree", "dask", ">=", 3.0, "cw reduction tree >= 3x Dask's jobs/s"),
        _ratio_target(cases, "B9", "tree", "ray", ">=", 1.0, "cw reduction tree >= Ray's jobs/s"),
        _ratio_target(cases, "B10", "time", "ppe-1t", "<=", 1.1, "cw numpy time <= 1.1x one thread set by hand"),
    ]
    out = []
    for cid, what, check in checks:
        if cid not in cases:
            continue
        ok, detail = check()
        out.append({"case": cid, "target": what, "status": {True: "PASS", False: "MISS", None: "n/a"}[ok],
                    "detail": detail})
    return out


def targets_table(results: list[dict]) -> str:
    lines = ["Targets (informational: a MISS never fails the run)", "-" * 100]
    for t in results:
        lines.append(f"{t['status']:<5} {t['case']}  {t['target']:<58} {t['detail']}")
    return "\n".join(lines)


def to_json(info: dict, config: dict, cases: dict[str, Case], target_results: list[dict]) -> dict:
    return {"machine": info, "config": config,
            "cases": {cid: asdict(case) for cid, case in cases.items()},
            "targets": target_results}
