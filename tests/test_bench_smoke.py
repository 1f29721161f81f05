"""``python -m bench`` runs and times the users' paths: functions of its own
``__main__`` (a user's script), module functions and a new lambda per call.

Only cw and ProcessPoolExecutor take part (CI does not install the bench extra);
no figure's size is asserted, only that each was measured where it can be.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_bench_times_script_module_and_lambda_functions(tmp_path):
    out = tmp_path / "results.json"
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-m", "bench", "--quick", "--only", "B1,B2", "--systems", "cw,ppe",
                           "--out", str(out)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(out.read_text())
    b1, b2 = results["cases"]["B1"], results["cases"]["B2"]
    values = {fig["key"]: fig["values"] for case in (b1, b2) for fig in case["figures"]}
    for key in ("submit", "submit_module", "submit_lambda", "median", "median_module", "median_lambda",
                "worker_cpu", "worker_cpu_module", "worker_cpu_lambda"):
        assert values[key]["cw"] is not None, key
    # ProcessPoolExecutor runs script and module functions, and has a worker-CPU figure
    # beside cw's (a target compares them), but cannot pickle a lambda: a note says so.
    for key in ("submit", "submit_module", "median", "median_module", "worker_cpu"):
        assert values[key]["ppe"] is not None, key
    assert values["submit_lambda"]["ppe"] is None
    assert any(note.startswith("ppe: cannot run a new lambda per call") for note in b2["notes"])
    # The headline functions really were __main__ functions of the run.
    assert any(note.startswith("script function = defined in the benchmark's __main__") for note in b1["notes"])
    assert not any("NOT __main__" in note for note in b1["notes"])
    statuses = {t["target"]: t["status"] for t in results["targets"]}
    assert statuses["cw worker CPU per no-op call <= 1.5x ppe's"] in ("PASS", "MISS")


def test_bench_runs_the_data_cases_alone(tmp_path):
    """B8 (a shared input) and B9 (futures as arguments) run on their own (``--only B8,B9``)."""
    out = tmp_path / "results.json"
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-m", "bench", "--quick", "--only", "B8,B9", "--systems", "cw,ppe",
                           "--out", str(out)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    cases = json.loads(out.read_text())["cases"]
    values = {(cid, fig["key"]): fig["values"] for cid in ("B8", "B9") for fig in cases[cid]["figures"]}
    for key in (("B8", "time_shared"), ("B8", "time_plain"), ("B8", "written_shared"), ("B9", "chain"),
                ("B9", "tree")):
        assert values[key]["cw"] is not None, key
    assert values[("B8", "time_plain")]["ppe"] is not None
    assert values[("B9", "chain")]["ppe"] is None          # a pool cannot take futures as arguments
