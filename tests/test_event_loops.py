"""The master runs on uvloop when it is installed (the "fast" extra) and on
the standard library's asyncio loop otherwise, or as --loop says: the same
work must come out the same on both."""
from __future__ import annotations

import asyncio
import subprocess
import sys

import jobs
import pytest

from cw.master.server import event_loop_runner

MB = 1 << 20


def test_the_same_work_on_either_loop(master_on_each_loop):
    cluster = master_on_each_loop
    cluster.add_workers(2)
    cluster.wait_for_workers(2)
    with cluster.executor() as ex:
        assert ex.status()["master"]["event_loop"] == cluster.loop
        small = [ex.submit(jobs.square, i) for i in range(300)]
        big = ex.submit(jobs.identity, b"\1" * (40 * MB))        # sliced writes, direct receive buffers
        failing = ex.submit(jobs.fail, "on purpose")
        assert [f.result(timeout=60) for f in small] == [i * i for i in range(300)]
        assert big.result(timeout=120) == b"\1" * (40 * MB)
        with pytest.raises(ValueError, match="on purpose"):
            failing.result(timeout=60)
        assert list(ex.map(jobs.add, range(50), range(50), chunksize=7)) == [2 * i for i in range(50)]


def _without_uvloop(code: str) -> subprocess.CompletedProcess:
    """Runs ``code`` in a Python where importing uvloop fails, as where it is not installed."""
    return subprocess.run([sys.executable, "-c", "import sys; sys.modules['uvloop'] = None\n" + code],
                          capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)


def test_asking_for_uvloop_where_it_is_missing_says_how_to_get_it():
    proc = _without_uvloop("from cw.master.server import main; sys.exit(main(['--loop', 'uvloop', '--port', '0']))")
    assert proc.returncode == 2
    assert "uvloop is not installed here" in proc.stderr and "cw[fast]" in proc.stderr
    assert "--loop asyncio" in proc.stderr


def test_auto_falls_back_to_asyncio_where_uvloop_is_missing():
    proc = _without_uvloop("import asyncio; from cw.master.server import event_loop_runner\n"
                           "assert event_loop_runner('auto') is asyncio.run")
    assert proc.returncode == 0, proc.stderr


def test_auto_takes_uvloop_where_it_is_installed():
    import uvloop
    assert event_loop_runner("auto") is uvloop.run
    assert event_loop_runner("asyncio") is asyncio.run
