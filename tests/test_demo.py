"""The README's first command ends in `python -m cw.demo`; it must keep working."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_demo_fans_out_one_job_per_worker():
    pytest.importorskip("numpy")
    proc = subprocess.run([sys.executable, "-m", "cw.demo", "-n", "2"], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    jobs = re.findall(r"^job (\d): top eigenvalues .* on (\S+) pid (\d+)\)$", proc.stdout, re.M)
    assert [j[0] for j in jobs] == ["0", "1"]
    assert len({j[2] for j in jobs}) == 2  # two different workers ran them
    assert re.search(r"^2 jobs in [\d.]+ s wall time", proc.stdout, re.M)
    # A clean run says nothing on stderr: no worker reports a lost master as the cluster stops.
    assert proc.stderr == ""


def test_ci_runs_exactly_the_readme_test_command():
    readme = (ROOT / "README.rst").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    command = [line for line in ci.splitlines() if "pytest" in line and not line.startswith("#")]
    assert len(command) == 1
    assert command[0].strip() in readme
