"""cw.commands with real programs: locally, in (stand-in and real) container engines, and through a cluster."""
from __future__ import annotations

import json
import os
import pickle
import shutil
import socket
import subprocess
import sys
import textwrap

import pytest
from conftest import wait_until

from cw.ops.commands import (
    CommandResult,
    ContainerEngineError,
    ContainerEngineMissing,
    command,
    container_argv,
)

HOST = socket.gethostname()


def alive(pid: int) -> bool:
    """Whether ``pid`` runs; a zombie (killed, not yet reaped by init) counts as dead."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.fixture(autouse=True)
def no_engine_override(monkeypatch):
    monkeypatch.delenv("CW_CONTAINER_ENGINE", raising=False)
    monkeypatch.delenv("CW_JOB_CPUS", raising=False)
    monkeypatch.delenv("CW_JOB_MEM", raising=False)


# --- running programs here ----------------------------------------------------

def test_stdout_stderr_returncode():
    result = command(["sh", "-c", "echo out; echo err >&2; exit 4"])
    assert result == CommandResult(["sh", "-c", "echo out; echo err >&2; exit 4"], 4, "out\n", "err\n", HOST)


def test_output_is_decoded_with_replacement():
    assert command(["printf", r"caf\303\251 \377"]).stdout == "café \ufffd"


def test_input_goes_to_stdin():
    assert command(["tr", "a-z", "A-Z"], input="hello").stdout == "HELLO"
    assert command(["wc", "-c"], input=b"x" * 1_000_000).stdout.strip() == "1000000"


def test_env_is_merged_over_this_environment(monkeypatch):
    monkeypatch.setenv("CW_TEST_BASE", "base")
    monkeypatch.setenv("CW_TEST_OVER", "old")
    result = command(["sh", "-c", 'echo "$CW_TEST_BASE $CW_TEST_OVER $CW_TEST_NEW"'],
                     env={"CW_TEST_OVER": "new", "CW_TEST_NEW": 7})
    assert result.stdout == "base new 7\n"


def test_cwd(tmp_path):
    assert command(["pwd"], cwd=tmp_path).stdout == f"{tmp_path}\n"


def test_missing_cwd_names_it_and_the_host(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match=f"{missing}.*{HOST}"):
        command(["pwd"], cwd=missing)


def test_missing_program_names_it_and_the_host():
    with pytest.raises(FileNotFoundError, match=f"'cw-no-such-program' was not found on host {HOST}.*PATH"):
        command(["cw-no-such-program", "-x"])


def test_a_string_argv_is_refused_with_advice():
    with pytest.raises(TypeError, match=r"list of strings.*\['sh', '-c', 'ls -l \| wc'\]"):
        command("ls -l | wc")
    with pytest.raises(TypeError, match="must be strings"):
        command(["sleep", 1])
    with pytest.raises(ValueError, match="empty"):
        command([])


def test_check_raises_called_process_error():
    result = command(["sh", "-c", "echo partial; echo bad >&2; exit 2"])
    with pytest.raises(subprocess.CalledProcessError) as info:
        result.check()
    assert (info.value.returncode, info.value.output, info.value.stderr) == (2, "partial\n", "bad\n")
    with pytest.raises(subprocess.CalledProcessError):
        command(["false"], check=True)
    ok = command(["true"], check=True)
    assert ok.check() is ok


def test_timeout_kills_the_whole_group():
    # The shell prints its background child's pid, then both would sleep a minute.
    with pytest.raises(subprocess.TimeoutExpired) as info:
        command(["sh", "-c", "sleep 60 & echo $!; echo $$; sleep 60"], timeout=0.5)
    assert info.value.timeout == 0.5
    child, shell = (int(pid) for pid in info.value.output.split())
    wait_until(lambda: not alive(child) and not alive(shell), timeout=10, what="the command's processes to die")


def test_timeout_covers_output_of_background_processes():
    # The shell exits at once, but its background child keeps stdout open.
    with pytest.raises(subprocess.TimeoutExpired) as info:
        command(["sh", "-c", "(echo started; sleep 60) &"], timeout=0.5)
    assert info.value.output == "started\n"


def test_output_is_bounded_in_memory():
    # In a fresh interpreter, so its peak memory is the command's alone.
    script = textwrap.dedent("""
        import json, resource, sys
        from cw.ops.commands import command
        size = int(sys.argv[1])
        r = command(["sh", "-c", f"echo START; head -c {size} /dev/zero | tr '\\\\0' x; echo END"],
                    max_output=1000)
        print(json.dumps({"stdout": r.stdout, "stderr": r.stderr,
                          "peak_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}))
    """)

    def run(size):
        proc = subprocess.run([sys.executable, "-c", script, str(size)], capture_output=True, text=True,
                              timeout=120, cwd=os.path.dirname(os.path.dirname(__file__)))
        assert proc.returncode == 0, proc.stderr
        return json.loads(proc.stdout)

    small, big = run(10), run(200_000_000)
    assert small["stdout"] == "START\n" + "x" * 10 + "END\n"
    dropped = len("START\n") + 200_000_000 + len("END\n") - 1000
    assert big["stdout"] == ("START\n" + "x" * 494 + f"\n[... cw.command dropped {dropped} bytes of output here ...]\n"
                             + "x" * 496 + "END\n")
    # 200 MB went through; the interpreter grew by far less than that.
    assert big["peak_kib"] - small["peak_kib"] < 20_000, (small, big)


# --- pickling: results and errors travel back from workers ---------------------

def test_results_and_errors_survive_pickling(tmp_path):
    result = command(["sh", "-c", "echo hi; exit 1"])
    assert pickle.loads(pickle.dumps(result)) == result
    errors = [ContainerEngineMissing("no engine"), ContainerEngineError("no daemon")]
    for run in (result.check, lambda: command(["cw-no-such-program"]), lambda: command(["pwd"], cwd=tmp_path / "x"),
                lambda: command(["sleep", "5"], timeout=0.1)):
        with pytest.raises(Exception) as info:
            run()
        errors.append(info.value)
    for exc in errors:
        copy = pickle.loads(pickle.dumps(exc))
        assert type(copy) is type(exc) and str(copy) == str(exc)
    assert pickle.loads(pickle.dumps(errors[2])).stderr == ""


# --- containers -------------------------------------------------------------------

@pytest.mark.parametrize("engine", ["docker", "podman", "/usr/local/bin/docker"])
def test_container_argv_docker_style(engine):
    assert container_argv(engine, "alpine", ["echo", "hi"]) == [engine, "run", "--rm", "-i", "alpine", "echo", "hi"]
    assert container_argv(engine, "alpine:3", ["make", "-j4"], "/src", {"A": "1", "B": "x y"}, 2.0, 2**30,
                          name="cw-job") == [
        engine, "run", "--rm", "-i", "--name", "cw-job", "--cpus", "2", "--memory", "1073741824",
        "-e", "A=1", "-e", "B=x y", "-v", "/src:/src", "-w", "/src", "alpine:3", "make", "-j4"]
    assert container_argv(engine, "alpine", ["true"], cpus=0.5)[4:6] == ["--cpus", "0.5"]


@pytest.mark.parametrize("engine", ["apptainer", "singularity", "/opt/apptainer/bin/apptainer"])
def test_container_argv_apptainer_style(engine):
    assert container_argv(engine, "img.sif", ["echo", "hi"]) == [engine, "exec", "img.sif", "echo", "hi"]
    assert container_argv(engine, "docker://alpine", ["make"], "/src", {"A": "1"}, 1.5, 512 * 2**20) == [
        engine, "exec", "--cpus", "1.5", "--memory", "536870912", "--env", "A=1",
        "--pwd", "/src", "--bind", "/src", "docker://alpine", "make"]


def test_no_engine_on_path(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(ContainerEngineMissing, match=f"none of docker, podman, apptainer.*{HOST}"):
        command(["true"], image="alpine")


def test_named_engine_missing(monkeypatch):
    monkeypatch.setenv("CW_CONTAINER_ENGINE", "cw-no-such-engine")
    with pytest.raises(ContainerEngineMissing, match=f"CW_CONTAINER_ENGINE='cw-no-such-engine'.*{HOST}"):
        command(["true"], image="alpine")


def stand_in_engine(tmp_path, name, body):
    """A program named like an engine that runs ``body`` (sh) on its arguments."""
    path = tmp_path / name
    path.write_text(f"#!/bin/sh\n{body}\n")
    path.chmod(0o755)
    return str(path)


def test_image_passes_env_cwd_and_job_resources(monkeypatch, tmp_path):
    monkeypatch.setenv("CW_CONTAINER_ENGINE", stand_in_engine(tmp_path, "podman", 'printf "%s\\n" "$@"'))
    monkeypatch.setenv("CW_JOB_CPUS", "3")
    monkeypatch.setenv("CW_JOB_MEM", "1000000000")
    monkeypatch.setenv("CW_TEST_HOST_ONLY", "not passed")
    result = command(["ls", "-l"], image="alpine", cwd=tmp_path, env={"A": "1"})
    args = result.stdout.split("\n")
    assert args[:4] == ["run", "--rm", "-i", "--name"] and args[4].startswith("cw-")
    assert args[5:] == ["--cpus", "3", "--memory", "1000000000", "-e", "A=1", "-v", f"{tmp_path}:{tmp_path}",
                        "-w", str(tmp_path), "alpine", "ls", "-l", ""]


def test_engine_failure_is_not_the_programs_exit_status(monkeypatch, tmp_path):
    monkeypatch.setenv("CW_CONTAINER_ENGINE", stand_in_engine(tmp_path, "podman", "echo 'no such image' >&2; exit 125"))
    with pytest.raises(ContainerEngineError, match=f"on host {HOST} \\(exit status 125\\): no such image"):
        command(["true"], image="alpine")
    engine = stand_in_engine(tmp_path, "apptainer", "echo 'FATAL: no sif' >&2; exit 255")
    monkeypatch.setenv("CW_CONTAINER_ENGINE", engine)
    with pytest.raises(ContainerEngineError, match="FATAL: no sif"):
        command(["true"], image="x.sif")
    # The program's own failures stay results.
    monkeypatch.setenv("CW_CONTAINER_ENGINE", stand_in_engine(tmp_path, "docker", "exit 3"))
    assert command(["false"], image="alpine").returncode == 3


def test_timeout_kills_the_container_too(monkeypatch, tmp_path):
    killed = tmp_path / "killed"
    engine = stand_in_engine(tmp_path, "docker", f'[ "$1" = kill ] && echo "$@" > {killed} && exit 0; exec sleep 60')
    monkeypatch.setenv("CW_CONTAINER_ENGINE", engine)
    with pytest.raises(subprocess.TimeoutExpired):
        command(["sleep", "60"], image="alpine", timeout=0.5)
    assert killed.read_text().startswith("kill cw-")


def test_real_docker_without_daemon():
    if not shutil.which("docker"):
        pytest.skip("no docker CLI on PATH")
    server = subprocess.run(["docker", "version", "--format", "{{.Server.Version}}"], capture_output=True, timeout=60)
    if server.returncode == 0:
        pytest.skip("a docker daemon answers here; this test is about a docker CLI without one")
    with pytest.raises(ContainerEngineError) as info:
        command(["echo", "hi"], image="alpine")
    assert "docker" in str(info.value) and HOST in str(info.value)
    assert "daemon" in str(info.value).lower()


# --- through a real cluster ------------------------------------------------------

def test_command_on_a_worker(executor):
    result = executor.submit(command, ["sh", "-c", "echo hi; exit 3"]).result(timeout=60)
    assert (result.returncode, result.stdout, result.stderr, result.host) == (3, "hi\n", "", HOST)


def test_missing_program_reaches_the_client(executor):
    future = executor.submit(command, ["cw-no-such-program"])
    with pytest.raises(FileNotFoundError, match="cw-no-such-program.*install it there or fix PATH"):
        future.result(timeout=60)


def test_cancelled_command_leaves_nothing_running(executor, tmp_path):
    # The worker stops a cancelled job by exiting; the lifeline must then kill the group.
    pids = tmp_path / "pids"
    script = f'sleep 60 & echo $$ $! > {pids}.tmp; mv {pids}.tmp {pids}; sleep 60'
    future = executor.submit(command, ["sh", "-c", script])
    wait_until(pids.exists, timeout=60, what="the command to start")
    shell, child = (int(pid) for pid in pids.read_text().split())
    assert future.cancel()
    wait_until(lambda: not alive(shell) and not alive(child), timeout=30, what="the cancelled command to die")
