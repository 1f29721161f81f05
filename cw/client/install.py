"""Installing Python packages on the workers at run time (``executor.install``).

Each worker process runs ``install_packages`` (through ``submit_on_all``):
the worker's own interpreter runs ``pip install`` (``uv pip install`` when
uv is on the PATH, which is much faster).  Worker processes of one machine
share one environment, so they take turns through a lock file, and the
first to finish leaves a note that lets the others skip pip for a while.
Afterwards the import system's caches are cleared, so the next job can
import what was installed.
"""
from __future__ import annotations

import fcntl
import hashlib
import importlib
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time

from cw.errors import InstallError

log = logging.getLogger("cw.install")   # to the worker's log (cw's records are not a job's output)

#: Seconds during which another worker process of the same machine and
#: environment trusts a finished install of the same packages and skips pip.
SHARED_INSTALL_S = 600.0

#: What this process installed (a sticky install runs here before any job).
installed: list[list[str]] = []


def pip_command(packages: list[str], pip_args: list[str]) -> list[str]:
    uv = shutil.which("uv")
    if uv:
        return [uv, "pip", "install", "--python", sys.executable, *pip_args, *packages]
    return [sys.executable, "-m", "pip", "install", "--disable-pip-version-check", "--no-input", *pip_args, *packages]


def install_packages(packages: list[str], pip_args: list[str] = (), timeout: float | None = None,
                     call: str = "") -> str:
    """Installs ``packages`` into this worker's environment; returns pip's
    last line.  Raises InstallError with pip's output when it fails.  ``call``
    names one ``install()``: the processes of a machine share its pip run,
    a later call runs pip again."""
    packages, pip_args = list(packages), list(pip_args)
    key = hashlib.sha256(json.dumps([sys.prefix, packages, pip_args, call]).encode()).hexdigest()[:16]
    base = os.path.join(tempfile.gettempdir(), f"cw-install-{hashlib.sha256(sys.prefix.encode()).hexdigest()[:12]}")
    with open(base + ".lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)        # one pip at a time per environment
        try:
            with open(base + ".done") as f:
                note = json.load(f)
            if note.get("key") == key and time.time() - note.get("at", 0) < SHARED_INSTALL_S:
                _installed(packages)
                return f"already installed on this machine by pid {note.get('pid')}: {note.get('summary', '')}"
        except (OSError, ValueError):
            pass
        argv = pip_command(packages, pip_args)
        try:
            proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired:
            log.error("pip did not finish within %s s: %s", timeout, " ".join(argv))
            raise InstallError(f"{' '.join(argv)} did not finish within {timeout:g} s "
                               f"on {socket.gethostname()}") from None
        if proc.returncode != 0:
            error = (proc.stderr.strip() or proc.stdout.strip())[-3000:]
            log.error("installing %s failed (exit status %s): %s", " ".join(packages), proc.returncode, error)
            raise InstallError(f"{' '.join(argv)} failed on {socket.gethostname()} (exit status "
                               f"{proc.returncode}):\n{error}")
        lines = proc.stdout.strip().splitlines() or proc.stderr.strip().splitlines() or ["done"]
        summary = lines[-1]
        tmp = f"{base}.{os.getpid()}.tmp"
        with open(tmp, "w") as f:
            json.dump({"key": key, "at": time.time(), "pid": os.getpid(), "summary": summary}, f)
        os.replace(tmp, base + ".done")
    _installed(packages)
    return summary


def _installed(packages: list[str]) -> None:
    importlib.invalidate_caches()
    installed.append(packages)


def check_packages(packages) -> list[str]:
    if isinstance(packages, str):
        packages = [packages]
    packages = list(packages)
    if not packages or not all(isinstance(p, str) and p.strip() for p in packages):
        raise ValueError(f"install() takes a list of pip requirements like ['numpy', 'scipy==1.*'], not {packages!r}")
    return packages
