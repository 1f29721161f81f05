"""A local cluster (cw.start, cw.allocate) ends with the program that
started it, however that program ends: killed, or a notebook's kernel
restarted, its master and workers do not live on holding the port."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

import pytest
from conftest import alive, wait_until

# A user's script: a local cluster, and a wait (the test kills it there).
SCRIPT = textwrap.dedent("""
    import sys
    import cw
    cluster = cw.start(2, port=0)
    with cluster.executor() as ex:
        pids = [w.pid for w in ex.workers()]
    print(cluster.master.pid, *[p.pid for p in cluster.workers], *pids, flush=True)
    sys.stdin.readline()
""")


def test_a_killed_script_takes_its_local_cluster_down():
    script = subprocess.Popen([sys.executable, "-c", SCRIPT], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              text=True)
    pids = []
    try:
        pids = [int(pid) for pid in script.stdout.readline().split()]
        assert len(pids) == 4, pids            # the master, the supervisor, its two worker processes
        script.kill()                          # no finally, no atexit: as SIGKILL or a kernel restart
        script.wait(30)
        wait_until(lambda: not any(alive(pid) for pid in pids), timeout=60,
                   what="the master and workers of a killed script to exit")
    finally:
        if script.poll() is None:
            script.kill()
            script.wait()
        for pid in pids:                       # (only if the test failed: what it started, by pid)
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
        script.stdin.close()
        script.stdout.close()


def test_a_job_reading_its_standard_input_gets_its_end(executor):
    # Not the supervisor's input (a pipe from the program that started it, or a terminal).
    with pytest.raises(EOFError):
        executor.submit(input).result(timeout=30)
