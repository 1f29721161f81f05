"""A cw cluster of local processes: ``cw.allocate``, ``cw.start``, ``cw.stop``.

The master is started first and its readiness line read (it names the real
port, so port 0 works); the workers follow.  ``stop`` ends exactly the
processes ``start`` created, by pid: the worker supervisors (which stop their
own children) and the master.  Each of them also has a pipe from this
process as its standard input (``--until-stdin-closes``): should this
process end without ``stop`` (killed, a notebook's kernel restarted), the
kernel closes the pipe and the cluster stops itself, instead of living on
with the port taken.
"""
from __future__ import annotations

import contextlib
import os
import selectors
import signal
import subprocess
import sys
import time
from typing import TYPE_CHECKING

from cw import PORT
from cw.errors import CwError
from cw.wire.address import format_address, parse_address

if TYPE_CHECKING:
    from cw.launch.slurm import SlurmCluster

#: Seconds to wait for the master's readiness line.
READY_TIMEOUT = 30.0
#: Seconds a process gets to exit on SIGTERM before it is killed.
STOP_TIMEOUT = 10.0
#: Seconds running jobs get to finish when a local cluster stops.
STOP_GRACE = 2.0
READY_PREFIX = "cw master listening on "


class LocalCluster:
    def __init__(self, master: subprocess.Popen, host: str, port: int, tls: bool = False):
        self.master = master
        self.host = host
        self.port = port
        self.tls = tls               # a master started with --tls
        self.workers: list[subprocess.Popen] = []

    @property
    def address(self) -> str:
        """``HOST:PORT``, or ``tls://HOST:PORT``: what a worker or client is given."""
        return format_address(self.host, self.port, self.tls)

    def add_workers(self, n: int, connect_timeout: float = 60.0, resources: str = "",
                    env: dict | None = None) -> subprocess.Popen:
        """Starts one supervisor running ``n`` worker processes (one worker
        machine: ``resources`` is its ``--resources``, e.g. "gpu=2,mem=8G")."""
        args = [sys.executable, "-m", "cw.worker", self.address, "-n", str(n),
                "--connect-timeout", str(connect_timeout), "--log-level", "WARNING", "--until-stdin-closes"]
        if resources:
            args += ["--resources", resources]
        proc = subprocess.Popen(args, stdin=subprocess.PIPE, env=env)
        self.workers.append(proc)
        return proc

    def executor(self, **options):
        from cw.client.executor import ClusterExecutor
        return ClusterExecutor(self.address, self.port, **options)

    def wait_for_workers(self, n: int, timeout: float = 60.0) -> None:
        """Blocks until ``n`` workers are connected to the master."""
        with self.executor() as ex:
            deadline = time.monotonic() + timeout
            while len(ex.status()["workers"]) < n:
                if time.monotonic() > deadline:
                    raise CwError(f"only {len(ex.status()['workers'])} of {n} workers connected to "
                                  f"{self.address} within {timeout:g} s; see the workers' log on stderr")
                if self.master.poll() is not None:
                    raise CwError(f"the master at {self.address} exited with status {self.master.returncode}")
                time.sleep(0.05)

    def stop(self, grace: float = STOP_GRACE) -> None:
        """Stops the workers (running jobs get ``grace`` seconds to finish; then
        their supervisors are killed, and with them, through the lifeline pipe,
        the worker processes), then the master.  The master goes last, once
        the workers are gone: a worker that saw it close first would log a
        lost master on a clean shutdown."""
        for proc in self.workers:
            _terminate(proc)
        for proc in self.workers:
            _reap(proc, grace)
        _terminate(self.master)
        _reap(self.master)


def _terminate(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        try:
            proc.send_signal(signal.SIGTERM)
        except ProcessLookupError:
            pass


def _reap(proc: subprocess.Popen, timeout: float = STOP_TIMEOUT) -> None:
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    for pipe in (proc.stdin, proc.stdout):
        if pipe is not None:
            pipe.close()


def start_master(port: int = PORT, bind: str = "127.0.0.1", args=(), stderr=None) -> LocalCluster:
    """Starts ``python -m cw.master`` and waits for its readiness line."""
    proc = subprocess.Popen([sys.executable, "-m", "cw.master", "--bind", bind, "--port", str(port),
                             "--log-level", "WARNING", "--until-stdin-closes", *args],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=stderr, text=True)
    try:
        line = read_line(proc, READY_TIMEOUT)
    except BaseException:
        _terminate(proc)
        _reap(proc)
        raise
    if not line.startswith(READY_PREFIX):
        _terminate(proc)
        _reap(proc)
        raise CwError(f"the master did not start (it printed {line!r}); see its error above")
    address = parse_address(line[len(READY_PREFIX):].strip())
    return LocalCluster(proc, address.host, address.port, address.tls)


def read_line(proc: subprocess.Popen, timeout: float) -> str:
    """Reads one line of a child's stdout, waiting at most ``timeout`` seconds."""
    assert proc.stdout is not None, "read_line needs a process started with stdout=PIPE"
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        if not sel.select(timeout):
            command = " ".join(map(str, proc.args[:3])) if isinstance(proc.args, (list, tuple)) else str(proc.args)
            raise CwError(f"process {proc.pid} ({command}) printed nothing within {timeout:g} s")
    return proc.stdout.readline()


def start(nworkers: int | None = None, port: int = PORT, wait: bool = True) -> LocalCluster:
    """Starts a master and ``nworkers`` workers (default: one per core) on this machine."""
    nworkers = nworkers or os.cpu_count() or 1
    cluster = start_master(port)
    try:
        cluster.add_workers(nworkers)
        if wait:
            cluster.wait_for_workers(nworkers)
    except BaseException:
        cluster.stop()
        raise
    return cluster


def stop(cluster: LocalCluster) -> None:
    cluster.stop()


@contextlib.contextmanager
def allocate(nworkers: int | None = None, port: int | None = None, backend: str | None = None):
    """Runs a cluster for the ``with`` block: local processes by default
    (``backend="local"``), or a master job and worker jobs on SLURM only when
    asked (``backend="slurm"``, or ``$CW_BACKEND=slurm``): on a login node,
    submitting batch jobs that may wait in the queue is not something to do
    behind the user's back just because ``squeue`` answers (issue 13).
    ``port``: the master's port, ``cw.PORT`` locally and a free one
    (published in the address file) on SLURM unless given; 0 picks a free
    one.  Inside the block, a client made with no host (``ClusterExecutor()``)
    finds this cluster's master."""
    from cw.client.discovery import ENV_MASTER
    backend = backend or os.environ.get("CW_BACKEND") or "local"
    cluster: LocalCluster | SlurmCluster
    if backend == "slurm":
        from cw.launch.slurm import SlurmCluster
        cluster = SlurmCluster.start(nworkers or 1, port=port or 0)
    elif backend == "local":
        cluster = start(nworkers, PORT if port is None else port)
    else:
        raise ValueError(f"backend must be 'local' or 'slurm', not {backend!r}")
    previous = os.environ.get(ENV_MASTER)
    os.environ[ENV_MASTER] = cluster.address
    try:
        yield cluster
    finally:
        if previous is None:
            os.environ.pop(ENV_MASTER, None)
        else:
            os.environ[ENV_MASTER] = previous
        cluster.stop()
