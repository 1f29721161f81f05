"""The documentation site builds with warnings as errors, and its code
examples run (Sphinx's doctest builder: they start a real local cluster)."""
from __future__ import annotations

import re
import subprocess
import sys
import warnings
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


def test_the_readme_is_a_short_front_door_that_renders():
    docutils_core = pytest.importorskip("docutils.core")
    text = (ROOT / "README.rst").read_text()
    assert len(text.encode()) <= 12 * 1024
    # The package index renders it with docutils: any warning would show as broken markup.
    with warnings.catch_warnings():      # (writer_name: every docutils takes it; 0.22 prefers writer=)
        warnings.simplefilter("ignore", PendingDeprecationWarning)
        docutils_core.publish_string(text, writer_name="null",
                                     settings_overrides={"halt_level": 2, "report_level": 2})
    for page in ("getting-started", "guide/using", "guarantees", "performance", "design"):
        assert f"docs/{page}.rst" in text or page.split("/")[-1] + ".rst" in text
