"""``python -m bench.timeouts`` runs B1 from an executor without a per-job
timeout and one with, on one cluster, and prints both with their ratio.
No figure's size is asserted, only that each was measured."""
from __future__ import annotations

import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_bench_timeouts_measures_b1_with_and_without_a_timeout():
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-m", "bench.timeouts", "--calls", "300", "--rounds", "1",
                           "--workers", "1"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rates = dict(re.findall(r"^  (without|with) a timeout of 60 s: +([\d,]+) calls/s", proc.stdout, re.MULTILINE))
    assert set(rates) == {"without", "with"}, proc.stdout
    assert all(float(rate.replace(",", "")) > 0 for rate in rates.values())
    assert re.search(r"ratio with/without: \d+\.\d\d", proc.stdout), proc.stdout
