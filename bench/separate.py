"""Measuring a system in a child process of its own and merging its figures.

Ray leaves threads in its driver process after ``ray.shutdown()``; a pool
forked from that process afterwards can deadlock.  So for each case that starts
systems in the benchmark's process, a separate system (``systems.SEPARATE``)
runs in ``python -m bench --child --only CASE --systems NAME`` (its own
``__main__``, so its script functions are __main__ functions too), right after
the others, and its figures and notes join the case's table.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile

#: Cases whose systems run inside the benchmark's process (B5 starts a child per
#: system anyway; B6 measures cw only).
IN_PROCESS = ("B1", "B2", "B3", "B4", "B7", "B8", "B9", "B10")


def measure(name: str, cid: str, ctx, root: str, timeout: float = 1800) -> tuple[dict | None, str | None]:
    """Runs case ``cid`` for system ``name`` in a child; returns (its case as JSON, None) or (None, why)."""
    fd, out = tempfile.mkstemp(prefix=f"cw-bench-{name}-", suffix=".json")
    os.close(fd)
    cmd = [sys.executable, "-m", "bench", "--child", "--only", cid, "--systems", name,
           "--workers", str(ctx.nworkers), "--reps", str(ctx.reps), "--limit", str(ctx.limit or 0), "--out", out]
    if ctx.quick:
        cmd.append("--quick")
    # Its own session, so that a child stuck past the timeout goes with every
    # process it started (Ray's), by its process group id.
    proc = subprocess.Popen(cmd, cwd=root, stdout=subprocess.DEVNULL, start_new_session=True)
    try:
        try:
            code = proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            return None, f"its child process (python -m bench --child) did not finish within {timeout:g} s"
        if code != 0:
            return None, f"its child process (python -m bench --child) exited with status {code} (stderr above)"
        with open(out) as f:
            return json.load(f)["cases"][cid], None
    finally:
        os.unlink(out)


def merge(case, name: str, child: dict | None, why: str | None) -> None:
    """Puts the child's figures for ``name`` and its notes about ``name`` into ``case``."""
    if child is None:
        case.notes.append(f"{name}: not measured: {why}.")
        case.set(name, {})
        return
    theirs = {fig["key"]: fig for fig in child["figures"]}
    for fig in case.figures:
        other = theirs.get(fig.key)
        fig.values[name] = other["values"].get(name) if other else None
        if other and name in other["samples"]:
            fig.samples[name] = other["samples"][name]
    case.notes.extend(note for note in child["notes"] if note.startswith(f"{name}:") and note not in case.notes)
