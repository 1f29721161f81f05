"""``python -m bench.tls --b1-only`` measures B1 plain and under TLS and says
how much CPU each process (client, master, workers) spent per call: the
figure that tells which hop TLS costs most on a machine shared with others.
No figure's size is asserted, only that each was measured."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

pytest.importorskip("cryptography")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_bench_tls_gives_each_process_cpu_per_b1_call():
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-m", "bench.tls", "--b1-only", "--calls", "300", "--rounds", "1",
                           "--workers", "1"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {line[:24].strip(): line[24:].split() for line in proc.stdout.splitlines()}
    assert set(rows) >= {"B1 calls/s", "B1 client CPU us/call", "B1 master CPU us/call", "B1 workers CPU us/call"}
    assert "B2 median us" not in rows            # --b1-only
    plain, tls, _ratio = map(float, rows["B1 calls/s"])
    assert plain > 0 and tls > 0
    for who in ("client", "master", "workers"):
        plain_us, tls_us, _ = rows[f"B1 {who} CPU us/call"]
        assert float(plain_us) > 0 and float(tls_us) > 0, who
