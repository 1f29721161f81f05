"""Finding the master: ``resolve_master`` and the master of a SLURM cluster.

A client asks, in order: the host it was given, ``$CW_MASTER`` (HOST:PORT,
set by ``cw.allocate``; either may start with ``tls://``), the master of the SLURM cluster ``$CW_CLUSTER``
(default "default") when that cluster has a master job or has published its
address, else this machine.  Instead of a host, a client or worker can be
given ``slurm:NAME`` (the master of SLURM cluster NAME) or ``file:PATH`` (the
address a master started with ``--address-file PATH`` published); both are
read again at every reconnection, so they follow a master that restarted
elsewhere, and both wait for a master that has not published yet.

A SLURM cluster's master job binds a free port and publishes its address
in ``<state dir>/clusters/<name>/master`` (see cw.wire.address) in the home
directory the nodes share; readers wait for that file with a deadline,
logging once what they wait for (a client started right after
``slurm.py start``, while the master job is pending, waits rather than
failing at once; issue 13).  A file is ignored when its master job no
longer runs, or runs on another node than the one that wrote it (requeued
after its node failed, its new master not yet up); the master job's batch
script also removes the file of a master that crashed before restarting it.
Readers ask again at every (re)connection, so they follow a restarted master
to its new host and port.  Where a reader has found no file for a few
seconds (FILE_GRACE) while the master job is RUNNING, ``squeue`` gives the job's
node (never the empty %N of a pending job), with the port the cluster was
started with, if it was started with one.

This module only reads SLURM's state; starting and stopping clusters is
cw.launch.slurm's, which sits above the client and uses what is here.
"""
from __future__ import annotations

import getpass
import logging
import os
import shlex
import shutil
import subprocess
import time
from pathlib import Path
from typing import NamedTuple

from cw import PORT
from cw.errors import SlurmError
from cw.wire.address import AddressFileError, MasterAddress, parse_address, read_address_file

ENV_MASTER = "CW_MASTER"
ENV_CLUSTER = "CW_CLUSTER"
DEFAULT_NAME = "default"
#: Seconds to wait for a master job to publish its address.
DISCOVERY_TIMEOUT = 120.0
SQUEUE_FORMAT = "%i|%j|%T|%N|%r"
#: Seconds ``resolve_master`` waits for a starting SLURM cluster's master by default.
RESOLVE_TIMEOUT = 10.0
#: Seconds a reader waits for the address file of a RUNNING master job before
#: it takes the job's node from squeue (with the cluster's fixed port) instead;
#: at most half the reader's timeout.  Bounded: a worker waits up to 600 s, and
#: a file removed right after it was written (no shared home) must not cost it
#: half of that.
FILE_GRACE = 5.0

log = logging.getLogger(__name__)


class JobInfo(NamedTuple):
    jobid: str
    name: str
    state: str
    nodes: str
    reason: str


SLURM_PREFIX = "slurm:"
FILE_PREFIX = "file:"


def resolve_master(host: str | None, port: int = PORT, timeout: float = RESOLVE_TIMEOUT) -> MasterAddress:
    """Where the master is: the given host (``HOST[:PORT]``, ``slurm:NAME`` or
    ``file:PATH``), else ``$CW_MASTER`` (HOST:PORT, set by ``cw.allocate``),
    else the master of the SLURM cluster ``$CW_CLUSTER`` (default "default")
    when that cluster has a master job (waiting up to ``timeout`` for it to
    publish its address) or an address file, else this machine.  SlurmError
    when the cluster's master does not come up in time; LookupError when
    there is no such cluster or no master published to the file in time."""
    if host and host.startswith(SLURM_PREFIX):
        return master_address(host[len(SLURM_PREFIX):] or None, port, timeout=timeout)
    if host and host.startswith(FILE_PREFIX):
        return published_address(Path(host[len(FILE_PREFIX):]).expanduser(), timeout)
    if host:
        return parse_address(host, port)
    if os.environ.get(ENV_MASTER):
        return parse_address(os.environ[ENV_MASTER], port)
    name = cluster_name()
    # squeue is asked only where it is installed: a local cluster on a
    # laptop costs no subprocess.
    if shutil.which("squeue") and (address_file(name).exists() or _has_master_job(name)):
        try:
            return master_address(name, port=port, timeout=timeout)
        except LookupError:
            pass
    return MasterAddress("localhost", port)


def published_address(path: Path, timeout: float) -> MasterAddress:
    """The address in the address file ``path``, waiting up to ``timeout`` for
    a master to write it (once, with one log line).  An unreadable file is
    an error at once: waiting would not mend it."""
    deadline = time.monotonic() + timeout
    said = False
    while True:
        try:
            record = read_address_file(path)
        except OSError as exc:
            raise LookupError(f"cannot read the master's address file {path}: {exc.strerror}") from None
        if record is not None:
            return MasterAddress(record.host, record.port, record.tls)
        if time.monotonic() >= deadline:
            raise LookupError(f"no cw master has published its address in {path} within {timeout:g} s; start "
                              f"one with `python -m cw.master --address-file {path}`, or check the path")
        if not said:
            log.warning("waiting up to %.0f s for a cw master to publish its address in %s", timeout, path)
            said = True
        time.sleep(min(0.2, max(0.0, deadline - time.monotonic())))


def _has_master_job(name: str) -> bool:
    try:
        return any(j.name == job_name(name, "master") for j in cluster_jobs(name))
    except SlurmError:
        return False         # squeue is installed but no SLURM answers: not a SLURM machine after all


# --- where a cluster's records live ---------------------------------------------

def cluster_name(name: str | None = None) -> str:
    """``name``, else ``$CW_CLUSTER``, else "default"."""
    return name or os.environ.get(ENV_CLUSTER) or DEFAULT_NAME


def state_dir() -> Path:
    """Where cluster records live: ``$CW_STATE_DIR``, else ``~/.cw`` (shared by the nodes)."""
    return Path(os.environ.get("CW_STATE_DIR") or Path.home() / ".cw")


def cluster_dir(name: str) -> Path:
    return state_dir() / "clusters" / name


def address_file(name: str) -> Path:
    return cluster_dir(name) / "master"


def job_name(name: str, role: str) -> str:
    return f"cw-{name}-{role}"


# --- asking SLURM ---------------------------------------------------------------

def user() -> str:
    return os.environ.get("USER") or getpass.getuser()


def available() -> bool:
    """True where the SLURM commands are installed and answer."""
    if not shutil.which("sbatch") or not shutil.which("squeue"):
        return False
    try:
        return subprocess.run(["squeue", "-h", "-o", "%i", "-u", user()], capture_output=True,
                              timeout=15).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def run_slurm(cmd: list[str], input: str | None = None) -> str:
    """Runs a SLURM command; its stdout, or SlurmError saying what failed."""
    try:
        proc = subprocess.run(cmd, input=input, capture_output=True, text=True, timeout=60)
    except FileNotFoundError:
        raise SlurmError(f"{cmd[0]} not found: is SLURM installed here, and on PATH?") from None
    except subprocess.TimeoutExpired:
        raise SlurmError(f"`{shlex.join(cmd)}` did not answer within 60 s; is slurmctld up?") from None
    if proc.returncode != 0:
        raise SlurmError(f"`{shlex.join(cmd)}` failed (exit {proc.returncode}): {proc.stderr.strip()}")
    return proc.stdout


def parse_squeue(output: str) -> list[JobInfo]:
    jobs = []
    for line in output.splitlines():
        if not line.strip():
            continue
        parts = line.split("|")
        if len(parts) != 5:
            raise SlurmError(f"unexpected squeue line {line!r}; expected {SQUEUE_FORMAT}")
        jobs.append(JobInfo(*(p.strip() for p in parts)))
    return jobs


def cluster_jobs(name: str) -> list[JobInfo]:
    names = ",".join(job_name(name, role) for role in ("master", "workers"))
    return parse_squeue(run_slurm(["squeue", "-h", "-u", user(), "-n", names, "-o", SQUEUE_FORMAT]))


def job_state(jobid: str) -> str | None:
    """The job's state, or None once SLURM no longer lists it."""
    placed = job_placement(jobid)
    return placed[0] if placed else None


def job_placement(jobid: str) -> tuple[str, list[str]] | None:
    """The job's state and its nodes (none while it is pending), or None
    once SLURM no longer lists it."""
    proc = subprocess.run(["squeue", "-h", "-j", jobid, "-o", "%T|%N"], capture_output=True, text=True, timeout=60)
    state, _, nodes = proc.stdout.strip().partition("|")
    if proc.returncode != 0 or not state:
        return None
    # A master job has one node: no bracketed ranges to expand.
    return state, [n for n in nodes.split(",") if n]


# --- the master of a cluster ------------------------------------------------------

def read_address(name: str) -> MasterAddress | None:
    """The address cluster ``name``'s master published, if its master job
    (when it had one) still runs, on the node that wrote the file.  None also
    for an unreadable file: a new master replaces it; ``master_address`` says
    what was wrong if none does."""
    try:
        record = read_address_file(address_file(name))
    except (OSError, AddressFileError):
        return None
    if record is None:
        return None
    if record.job and shutil.which("squeue"):
        placed = job_placement(record.job)
        if placed is None or placed[0] != "RUNNING":
            return None           # left behind by a master job that ended, or was requeued
        if record.node and placed[1] and record.node not in placed[1]:
            return None           # written before a requeue, on a node the job has left
    return MasterAddress(record.host, record.port, record.tls)


def _file_problem(name: str) -> str:
    """Why cluster ``name``'s address file gives no address, when it is unreadable."""
    try:
        read_address_file(address_file(name))
    except (OSError, AddressFileError) as exc:
        return f"; {exc}"
    return ""


def master_address(name: str | None = None, port: int = PORT, timeout: float = DISCOVERY_TIMEOUT,
                   wait: bool = True) -> MasterAddress:
    """(host, port) of cluster ``name``'s master (default ``$CW_CLUSTER`` or
    "default").  Waits up to ``timeout`` for it; raises LookupError when there
    is no such cluster, SlurmError when it does not come up in time."""
    name = cluster_name(name)
    started = time.monotonic()
    deadline = started + timeout
    said = False
    while True:
        address = read_address(name)
        if address is not None:
            return address
        jobs = cluster_jobs(name) if shutil.which("squeue") else []
        masters = [j for j in jobs if j.name == job_name(name, "master")]
        if not masters:
            raise LookupError(f"no cw cluster named {name!r} runs on SLURM (no job {job_name(name, 'master')}); "
                              f"start one with `slurm.py start -n N --name {name}`{_file_problem(name)}")
        running = [j for j in masters if j.state == "RUNNING" and j.nodes]
        if running and port and time.monotonic() > started + min(timeout / 2, FILE_GRACE):
            # No address file (no shared home?): the node from squeue, the fixed port.
            # (The scheme is unknown here; a TLS cluster needs the shared home for its certificates anyway.)
            return MasterAddress(running[0].nodes.split(",")[0], port)
        if wait and not said:
            # One line, not one per poll: the wait is normal while a job starts.
            log.warning("waiting up to %.0f s for the master of SLURM cluster %r: job %s is %s%s", timeout, name,
                        masters[0].jobid, masters[0].state, "" if masters[0].reason in ("", "None")
                        else f" ({masters[0].reason})")
            said = True
        if not wait or time.monotonic() > deadline:
            state = masters[0].state + (f" ({masters[0].reason})" if masters[0].reason not in ("", "None") else "")
            raise SlurmError(f"the master job {masters[0].jobid} of cluster {name!r} is {state} and has not "
                             f"published {address_file(name)} within {timeout:g} s; see its log in "
                             f"{cluster_dir(name) / 'logs'}{_file_problem(name)}")
        time.sleep(0.2)
