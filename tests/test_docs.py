"""The documentation site builds with warnings as errors, and its code
examples run (Sphinx's doctest builder: they start a real local cluster)."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

pytest.importorskip("sphinx")


@pytest.mark.parametrize("builder", ["html", "doctest"])
def test_the_docs_build_without_warnings(builder, tmp_path):
    out = subprocess.run([sys.executable, "-m", "sphinx", "-W", "--keep-going", "-q", "-b", builder,
                          str(ROOT / "docs"), str(tmp_path / builder)],
                         capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert out.returncode == 0, out.stdout + out.stderr
    if builder == "doctest":
        report = (tmp_path / builder / "output.txt").read_text()
        assert re.search(r"^ +[1-9][0-9]* tests?$", report, re.M), report      # some example ran
        assert " 0 failures in tests" in report, report
