"""Fixtures that start real masters and workers on port 0, and stop exactly them."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

# Every test process, and every process it starts, uses a private secret file.
_SECRET_DIR = None


def pytest_configure(config):
    global _SECRET_DIR
    import tempfile
    _SECRET_DIR = tempfile.mkdtemp(prefix="cw-test-")
    os.environ["CW_SECRET_FILE"] = os.path.join(_SECRET_DIR, "secret")
    # Cluster records of SLURM tests go here, never to ~/.cw; cw.allocate is
    # local unless a test asks for SLURM.
    os.environ["CW_STATE_DIR"] = os.path.join(_SECRET_DIR, "state")
    os.environ["CW_BACKEND"] = "local"
    from cw.wire.auth import load_secret
    load_secret(create=True)


def pytest_unconfigure(config):
    import shutil
    if _SECRET_DIR:
        shutil.rmtree(_SECRET_DIR, ignore_errors=True)


@pytest.fixture
def master():
    """A master on a free port; yields a LocalCluster with no workers yet."""
    from cw.launch.local import start_master
    cluster = start_master(port=0)
    yield cluster
    cluster.stop()


@pytest.fixture(params=["asyncio", "uvloop"])
def master_on_each_loop(request):
    """A master on each event loop in turn (``--loop``), with no workers yet;
    ``.loop`` names the loop."""
    from cw.launch.local import start_master
    cluster = start_master(port=0, args=["--loop", request.param])
    cluster.loop = request.param
    yield cluster
    cluster.stop()


@pytest.fixture
def cluster(master):
    """A master with two worker processes (one supervisor), both connected."""
    master.add_workers(2)
    master.wait_for_workers(2)
    return master


@pytest.fixture
def executor(cluster):
    with cluster.executor() as ex:
        yield ex


def python(*args, **kwargs) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, *args], **kwargs)


def alive(pid: int) -> bool:
    """Whether process ``pid`` runs: a zombie has exited too (it only waits
    for its parent, which may reap it between the two looks)."""
    try:
        os.kill(pid, 0)
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (ProcessLookupError, FileNotFoundError):
        return False


def skip_unless_required(reason: str, *required: str) -> None:
    """Skips the test with ``reason``, or fails it when one of the
    environment variables ``required`` is "1" (CI: what a test needs must be
    there, a skip would hide that it did not run)."""
    named = [name for name in required if os.environ.get(name) == "1"]
    if named:
        pytest.fail(f"required here ({', '.join(n + '=1' for n in named)}) but unavailable: {reason}")
    pytest.skip(reason)


def wait_until(predicate, timeout: float = 30.0, what: str = "condition"):
    """Polls ``predicate`` until it is true; fails the test after ``timeout`` (a hang)."""
    import time
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.02)


def _slurm_answers() -> bool:
    import shutil
    if not os.environ.get("SLURM_CONF") or not shutil.which("sinfo"):
        return False
    try:
        r = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=15)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return r.returncode == 0 and r.stdout.split()[:1] in (["idle"], ["mixed"], ["allocated"])


@pytest.fixture(scope="session")
def local_slurm():
    """A real single-node SLURM: the one in the environment, or one started
    with scripts/local-slurm.sh (root only) and stopped at the end.  Where none
    can be had the SLURM tests skip, unless $CW_REQUIRE_SLURM=1 (CI) makes
    that a failure."""
    from pathlib import Path

    def unavailable(reason):
        skip_unless_required(f"SLURM tests need a SLURM: {reason}", "CW_REQUIRE_SLURM")

    if _slurm_answers():
        yield
        return
    script = Path(__file__).resolve().parent.parent / "scripts" / "local-slurm.sh"
    if os.geteuid() != 0:
        unavailable("no SLURM answers here, and starting a local one needs root: "
                    "run `sudo bash scripts/local-slurm.sh start` and export what it prints")
    proc = subprocess.run(["bash", str(script), "start"], capture_output=True, text=True, timeout=900,
                          stdin=subprocess.DEVNULL)
    if proc.returncode != 0:
        unavailable(f"scripts/local-slurm.sh start failed: {proc.stderr[-3000:]}")
    saved = {}
    for line in proc.stdout.splitlines():
        if line.startswith("export ") and "=" in line:
            key, value = line[len("export "):].split("=", 1)
            saved[key] = os.environ.get(key)
            os.environ[key] = value.strip("'\"")
    try:
        yield
    finally:
        subprocess.run(["bash", str(script), "stop"], capture_output=True, timeout=300, stdin=subprocess.DEVNULL)
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
