"""The package as users install it: its name, one version, --version on every
command line, the license and type marker in the wheel."""
from __future__ import annotations

import subprocess
import sys
import zipfile
from importlib import metadata
from pathlib import Path

import pytest

import cw

ROOT = Path(__file__).resolve().parent.parent


def test_one_version_everywhere():
    version = metadata.version("cluster-workers")
    assert cw.__version__ == version
    assert f"## {version}" in (ROOT / "CHANGELOG.md").read_text()


@pytest.mark.parametrize("command", [["-m", "cw.master"], ["-m", "cw.worker"], ["-m", "cw.status"],
                                     [str(ROOT / "slurm.py")]])
def test_every_command_line_has_version(command):
    out = subprocess.run([sys.executable, *command, "--version"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().endswith(f"(cluster-workers) {cw.__version__}")


def test_the_wheel_is_cluster_workers_with_license_and_type_marker(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w",
                    str(tmp_path), str(ROOT)], check=True, timeout=300, capture_output=True)
    [wheel] = tmp_path.glob("*.whl")
    assert wheel.name.startswith(f"cluster_workers-{cw.__version__}-")
    names = zipfile.ZipFile(wheel).namelist()
    assert "cw/py.typed" in names
    assert any(n.endswith(".dist-info/licenses/LICENSE") or n.endswith(".dist-info/LICENSE") for n in names), names
    meta = next(n for n in names if n.endswith(".dist-info/METADATA"))
    text = zipfile.ZipFile(wheel).read(meta).decode()
    assert "License :: OSI Approved :: MIT License" in text and "Name: cluster-workers" in text
