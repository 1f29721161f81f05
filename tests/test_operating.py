"""Operating a cluster (issue 7), end to end with real processes: job output
on the future and echoed in the client, bounded; job states; installing a
package built here as a wheel on every worker (and on workers that join
later); progress through map."""
from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import secrets
import subprocess
import sys
import textwrap
import zipfile

import jobs
import op_jobs
import pytest
from conftest import wait_until

from cw import settings
from cw.client import WorkerInfo
from cw.client.install import InstallError, pip_command

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

WAIT = 60  # seconds; reached only if something hangs


# --- job output ---------------------------------------------------------------

def test_output_has_stdout_stderr_and_logging_in_order(executor):
    future = executor.submit(op_jobs.print_three_ways)
    assert future.result(timeout=WAIT) == "printed"
    lines = future.output().splitlines()
    assert lines[:2] == ["to stdout", "to stderr"]
    assert len(lines) == 3
    assert "a warning from myapp" in lines[2] and "myapp" in lines[2].replace("a warning from myapp", "")
    assert "WARNING" in lines[2]


def test_a_job_that_prints_nothing_has_empty_output(executor):
    future = executor.submit(op_jobs.print_nothing)
    assert future.result(timeout=WAIT) == 42
    assert future.output() == ""


def test_output_of_jobs_running_at_once_does_not_mix(executor, tmp_path):
    a = executor.submit(op_jobs.chatter, "A", str(tmp_path), "B")
    b = executor.submit(op_jobs.chatter, "B", str(tmp_path), "A")
    assert (a.result(timeout=WAIT), b.result(timeout=WAIT)) == ("A", "B")
    assert a.worker != b.worker            # each waited for the other: they ran at once
    for future, tag in ((a, "A"), (b, "B")):
        assert future.output() == "".join(f"{tag} line {i}\n" for i in range(400))


def test_a_failed_jobs_output_is_kept(executor):
    future = executor.submit(op_jobs.print_then_fail, "it went wrong")
    error = future.exception(timeout=WAIT)
    assert isinstance(error, ValueError) and str(error) == "it went wrong"
    output = future.output()
    assert "before the error\n" in output and "on stderr too\n" in output
    assert output.index("before the error") < output.index("on stderr too")


def peak_rss(pid: int) -> int | None:
    """The most resident memory process ``pid`` has had (Linux), or None."""
    try:
        with open(f"/proc/{pid}/status") as f:
            return next(int(line.split()[1]) << 10 for line in f if line.startswith("VmHWM:"))
    except (OSError, StopIteration, ValueError):
        return None


def test_output_is_bounded_keeping_head_and_tail(cluster, executor):
    limit = settings.MAX_JOB_OUTPUT
    megabytes = 50
    rss_before = executor.status()["master"]["rss_bytes"]
    peak_before = peak_rss(cluster.master.pid)
    future = executor.submit(op_jobs.print_a_lot, megabytes)
    total = future.result(timeout=WAIT)
    output = future.output()
    rss_after = executor.status()["master"]["rss_bytes"]
    peak_after = peak_rss(cluster.master.pid)

    assert total > 50 * limit
    size = len(output)
    assert abs(size - limit) < 200, size
    assert output[:7] == "BEGIN\n."
    assert output[-6:] == ".\nEND\n"
    lines = output.split("\n")
    [note] = [line for line in lines if "cw dropped" in line]
    dropped = int(re.search(r"cw dropped (\d+) characters", note).group(1))
    # Every character is kept or counted as dropped: only filler dots are dropped.
    kept_dots = sum(line.count(".") for line in lines if line is not note)
    assert kept_dots + dropped == megabytes << 20
    head, _, tail = output.partition(note)
    assert abs(len(head) - limit // 2) < 64 and abs(len(tail) - limit // 2) < 64, (len(head), len(tail))

    assert rss_before > 0
    assert rss_after - rss_before < 16 << 20, (rss_before, rss_after)
    # Not even for a moment: the master's peak (had the 50 MB come through, it would be 50 MB up at least).
    if peak_before is not None:
        assert peak_after - peak_before < 16 << 20, (peak_before, peak_after)


# --- echo in the client ---------------------------------------------------------

ECHO_CLIENT = textwrap.dedent('''
    import json
    import sys

    from cw.client import ClusterExecutor


    def talk():
        print("first echoed line")
        print("second echoed line", file=sys.stderr)
        return "talked"


    host, _, port = sys.argv[1].rpartition(":")
    with ClusterExecutor(host, int(port), echo=sys.argv[2] == "on") as executor:
        future = executor.submit(talk)
        result = future.result(timeout=60)
        print(json.dumps({"jobid": future.jobid, "host": future.worker.host, "pid": future.worker.pid,
                          "result": result, "output": future.output()}))
''')


def run_echo_client(cluster, tmp_path, echo: str) -> tuple[dict, str]:
    script = tmp_path / "echo_client.py"
    script.write_text(ECHO_CLIENT)
    # CW_SECRET_FILE comes with the environment; cw from this checkout, installed or not.
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run([sys.executable, str(script), cluster.address, echo], capture_output=True, text=True,
                          timeout=120, stdin=subprocess.DEVNULL, env=env)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["result"] == "talked"
    assert report["output"] == "first echoed line\nsecond echoed line\n"
    return report, proc.stderr


def test_echo_prints_job_output_on_the_clients_stderr(cluster, tmp_path):
    report, stderr = run_echo_client(cluster, tmp_path, "on")
    prefix = f"[job {report['jobid']} on {report['host']}:{report['pid']}] "
    echoed = [line for line in stderr.splitlines() if line.startswith("[job ")]
    assert echoed == [prefix + "first echoed line", prefix + "second echoed line"], stderr


def test_without_echo_nothing_is_echoed(cluster, tmp_path):
    _, stderr = run_echo_client(cluster, tmp_path, "off")
    assert "[job " not in stderr and "echoed line" not in stderr, stderr


# --- lifecycle ------------------------------------------------------------------

def test_job_states_worker_and_times(master, tmp_path):
    master.add_workers(1)
    master.wait_for_workers(1)
    started, release = tmp_path / "started", tmp_path / "release"
    started.mkdir()
    with master.executor() as executor:
        [worker] = executor.workers()
        first = executor.submit(jobs.block, str(started), str(release), "first")
        second = executor.submit(jobs.identity, "second")
        third = executor.submit(jobs.identity, "third")
        wait_until(lambda: first.state == "running", what="the first job to be running")
        assert second.state == "queued"
        assert third.state == "queued"
        with pytest.raises(TimeoutError):
            first.output(timeout=0)
        assert third.cancel()
        assert third.state == "cancelled"

        release.touch()
        assert first.result(timeout=WAIT) == "first"
        assert second.result(timeout=WAIT) == "second"
        assert first.state == "done" and second.state == "done"

        failing = executor.submit(jobs.fail, "no")
        assert isinstance(failing.exception(timeout=WAIT), ValueError)
        assert failing.state == "failed"

        for future in (first, second, failing):
            assert future.worker == WorkerInfo(worker.host, worker.pid)
            assert future.submitted_at <= future.finished_at
        assert first.finished_at <= second.finished_at <= failing.finished_at


# --- installing packages --------------------------------------------------------

def build_wheel(directory, name: str, value: str):
    """A pure-Python wheel of package ``name`` whose ``VALUE`` is ``value``."""
    info = f"{name}-0.1.dist-info"
    files = {
        f"{name}/__init__.py": f"VALUE = {value!r}\n",
        f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.1\n",
        f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: cw-tests\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record = []
    for path, text in files.items():
        data = text.encode()
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        record.append(f"{path},sha256={digest},{len(data)}")
    record.append(f"{info}/RECORD,,")
    wheel = directory / f"{name}-0.1-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        for path, text in files.items():
            archive.writestr(path, text)
        archive.writestr(f"{info}/RECORD", "\n".join(record) + "\n")
    return wheel


@pytest.fixture
def wheel(tmp_path):
    """(path, package name, VALUE) of a wheel no run has installed before;
    uninstalled from this Python (which the workers share) afterwards."""
    name = f"cwtest_pkg_{secrets.token_hex(6)}"
    value = secrets.token_hex(8)
    path = build_wheel(tmp_path, name, value)
    try:
        yield str(path), name, value
    finally:
        subprocess.run([sys.executable, "-m", "pip", "uninstall", "-y", "--disable-pip-version-check", name],
                       capture_output=True, timeout=120, stdin=subprocess.DEVNULL)


def installed_everywhere(executor) -> dict[int, list]:
    """{worker pid: what it installed}, asked of every worker."""
    futures = executor.submit_on_all(op_jobs.installed_here)
    return {info.pid: f.result(timeout=WAIT)[0] for info, f in futures.items()}


def test_install_a_local_wheel_on_every_worker(executor, wheel):
    path, name, value = wheel
    before = executor.submit_on_all(op_jobs.import_value, name)
    assert len(before) == 2
    for future in before.values():
        assert isinstance(future.exception(timeout=WAIT), ModuleNotFoundError)

    report = executor.install([path], pip_args=["--no-index"], timeout=120)
    assert set(report) == {w.info for w in executor.workers()}
    assert all(isinstance(line, str) for line in report.values())

    after = executor.submit_on_all(op_jobs.import_value, name)
    assert set(after) == set(report)
    assert all(f.result(timeout=WAIT) == value for f in after.values())
    assert executor.submit(op_jobs.import_value, name).result(timeout=WAIT) == value


@pytest.mark.parametrize("sticky", [True, False])
def test_a_worker_that_joins_later_installs_only_when_sticky(cluster, executor, wheel, sticky):
    path, name, value = wheel
    report = executor.install([path], sticky=sticky, pip_args=["--no-index"], timeout=120)
    assert len(report) == 2
    cluster.add_workers(1)
    cluster.wait_for_workers(3)
    [new] = [w for w in executor.workers() if w.info not in report]

    # Its first job: a sticky install ran before it.
    installed, pid = executor.submit(op_jobs.installed_here, workers=[new]).result(timeout=WAIT)
    assert pid == new.pid
    assert installed == ([[path]] if sticky else [])
    # The workers that were there installed once, not again.
    assert installed_everywhere(executor) == {**{w.pid: [[path]] for w in report}, new.pid: installed}
    assert executor.submit(op_jobs.import_value, name, workers=[new]).result(timeout=WAIT) == value


def test_a_failed_install_names_each_worker_with_pips_error(executor):
    missing = "/nonexistent/x.whl"
    with pytest.raises(InstallError) as raised:
        executor.install([missing], sticky=False, timeout=120)
    message = str(raised.value)
    workers = executor.workers()
    assert len(workers) == 2
    for w in workers:
        assert any(w.host in line and str(w.pid) in line for line in message.splitlines()), message
    # What pip itself says about it, run the way the workers run it:
    pip = subprocess.run(pip_command([missing], []), capture_output=True, text=True, timeout=120,
                         stdin=subprocess.DEVNULL)
    assert pip.returncode != 0
    pip_error = (pip.stderr.strip() or pip.stdout.strip()).splitlines()[-1]
    assert message.count(pip_error) == 2, message
    # Nothing was installed, and the workers go on.
    assert set(map(tuple, installed_everywhere(executor).values())) == {()}
    assert executor.submit(jobs.square, 7).result(timeout=WAIT) == 49


# --- progress -------------------------------------------------------------------

def test_map_with_progress_gives_the_results(executor):
    assert list(executor.map(pow, [2] * 20, range(20), progress=True)) == [2 ** i for i in range(20)]
    # Without a length (a generator): the display has no total, the results are the same.
    assert list(executor.map(pow, (2 for _ in range(5)), range(5), progress=True)) == [1, 2, 4, 8, 16]


def test_progress_is_silent_when_stderr_is_not_a_terminal(executor, capsys):
    assert not sys.stderr.isatty()
    assert list(executor.map(jobs.square, range(10), progress=True)) == [i * i for i in range(10)]
    assert capsys.readouterr().err == ""


def test_a_sticky_install_reaches_a_worker_that_joins_a_restarted_master(cluster, wheel):
    """The new master learns the sticky install from the client that rides
    through its restart, and a worker that joins it afterwards installs
    before its first job."""
    from cw.launch.local import start_master
    path, name, value = wheel
    with cluster.executor(reconnect_timeout=60) as executor:
        executor.install([path], pip_args=["--no-index"], timeout=120)
        cluster.master.kill()
        cluster.master.wait()
        cluster.master = start_master(port=cluster.port).master
        # A job through the new master: the client has reconnected and told it everything.
        assert executor.submit(os.getpid).result(timeout=WAIT)
        wait_until(lambda: len(executor.workers()) == 2, what="both workers back on the new master")
        before = {w.pid for w in executor.workers()}
        cluster.add_workers(1)
        wait_until(lambda: len(executor.workers()) == 3, what="the third worker on the new master")
        [new] = [w for w in executor.workers() if w.pid not in before]
        installed, pid = executor.submit(op_jobs.installed_here, workers=[new]).result(timeout=WAIT)
        assert (pid, installed) == (new.pid, [[path]])
        assert executor.submit(op_jobs.import_value, name, workers=[new]).result(timeout=WAIT) == value
