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
    from cw.auth import load_secret
    load_secret(create=True)


def pytest_unconfigure(config):
    import shutil
    if _SECRET_DIR:
        shutil.rmtree(_SECRET_DIR, ignore_errors=True)


@pytest.fixture
def master():
    """A master on a free port; yields a LocalCluster with no workers yet."""
    from cw.local import start_master
    cluster = start_master(port=0)
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
