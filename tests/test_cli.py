"""The command lines as users type them: ``cw COMMAND`` and the ``python -m``
forms; bad values refused up front with the option's name and what is
allowed; errors that say what failed; a worker that cannot find its master
says so, now and then, without float noise; the supervisor checks the secret
before it starts workers."""
from __future__ import annotations

import re
import subprocess
import sys

import pytest

import cw


def run(*args, env=None, timeout=60):
    return subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, timeout=timeout,
                          env=env, stdin=subprocess.DEVNULL)


def test_cw_dispatches_to_each_command_with_its_own_name():
    out = run("cw", "--version")
    assert out.returncode == 0 and out.stdout.strip() == f"cw (cluster-workers) {cw.__version__}"
    for command in ("master", "worker", "status", "slurm", "demo"):
        out = run("cw", command, "--help")
        assert out.returncode == 0, out.stderr
        assert out.stdout.startswith(f"usage: cw {command} ")
    out = run("cw")
    assert out.returncode == 2 and "COMMAND" in out.stderr
    out = run("cw", "bogus")
    assert out.returncode == 2 and "invalid choice: 'bogus'" in out.stderr


@pytest.mark.parametrize(("args", "option", "says"), [
    (["cw.master", "--port", "-5"], "--port", "give 0 to 65535"),
    (["cw.master", "--port", "99999"], "--port", "give 0 to 65535"),
    (["cw.master", "--log-level", "LOUD"], "--log-level", "DEBUG, INFO, WARNING, ERROR, CRITICAL"),
    (["cw.master", "--bind", "no/such"], "--bind", "not an address to listen on"),
    (["cw.master", "--heartbeat", "0"], "--heartbeat", "above 0"),
    (["cw.master", "--slots", "0"], "--slots", "1 or more"),
    (["cw.worker", "host:99999"], "master", "give 0 to 65535"),
    (["cw.worker", "-n", "0"], "-n/--processes", "1 or more"),
    (["cw.worker", "--log-level", "LOUD"], "--log-level", "DEBUG, INFO"),
    (["cw.worker", "slurm:"], "master", "slurm:NAME or file:PATH"),
    (["cw.status", "host:x"], "HOST[:PORT]", "give 0 to 65535"),
    (["cw", "slurm", "start", "-n", "0"], "-n/--workers", "1 or more"),
    (["cw", "slurm", "start", "--port", "-5"], "--port", "give 0 to 65535"),
    (["cw", "slurm", "stop", "--wait"], "--wait", "unrecognized arguments"),
    (["cw", "slurm", "status", "--drain", "5"], "--drain", "unrecognized arguments"),
])
def test_a_bad_option_is_refused_before_anything_starts(args, option, says):
    out = run(*args, timeout=30)
    assert out.returncode == 2, out
    assert option in out.stderr and says in out.stderr, out.stderr
    assert "Traceback" not in out.stderr


def test_bind_errors_say_what_failed(master):
    # 198.18.0.77 is on no interface of this machine: binding it fails at once, sending nothing.
    out = run("cw", "master", "--bind", "198.18.0.77", "--port", "0")
    assert out.returncode == 1
    assert "cannot listen on 198.18.0.77 port 0: no interface of this machine has that address" in out.stderr
    out = run("cw", "master", "--port", str(master.port))
    assert out.returncode == 1 and "the port is in use" in out.stderr


def test_a_worker_that_finds_no_master_says_so_and_gives_up_without_float_noise():
    # Port 1 on loopback refuses at once: nothing listens there.  One attempt lasts 5 s at most,
    # so with 8 s the worker says what it looks for, reports the first failure, tries again, gives up.
    out = run("cw", "worker", "127.0.0.1:1", "--connect-timeout", "8", timeout=60)
    assert out.returncode == 3, out.stderr
    assert re.search(r"looking for the master at 127.0.0.1:1 \(for up to 8 s\)", out.stderr), out.stderr
    assert re.search(r"cannot reach a cw master at 127.0.0.1:1 \(Connection refused\) within 5 s: .*"
                     r"trying again for up to [1-7] s more", out.stderr), out.stderr
    assert "giving up after 8 s (--connect-timeout)" in out.stderr
    assert not re.search(r"\d\.\d{3,}", out.stderr), out.stderr


def test_ctrl_c_of_a_supervisor_stops_its_workers_quietly(master):
    """Ctrl-C in the terminal of `cw worker`: the supervisor drains its workers,
    which finish and exit with nothing worse than INFO lines on stderr."""
    import signal
    proc = subprocess.Popen([sys.executable, "-m", "cw", "worker", master.address, "-n", "2"],
                            stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL)
    try:
        master.wait_for_workers(2)
        with master.executor() as ex:
            assert ex.submit(lambda: 6 * 7).result(timeout=60) == 42
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err
    assert not re.search(r"WARNING|ERROR|Traceback", err), err


def test_the_supervisor_checks_the_secret_before_starting_workers(tmp_path, monkeypatch):
    env = {**__import__("os").environ, "CW_SECRET_FILE": str(tmp_path / "none" / "secret")}
    out = run("cw", "worker", "127.0.0.1:1", "-n", "3", env=env)
    assert out.returncode == 2
    assert out.stderr.count("no cw secret file") == 1, out.stderr     # said once, by the supervisor
