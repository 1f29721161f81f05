"""cw on SLURM: start a master job and worker jobs, find the master, stop them.

SLURM stays out of the inner loop: it starts the cluster once, and clients
then talk to the master directly for as long as it runs.

Discovery (how clients, workers and ``start --wait`` find the master) is
cw.client.discovery's: the master job publishes its address in the cluster's
address file, and squeue gives its node where that file never appears.  The
secret travels through the shared home too, as ``~/.cw/secret`` (or
``$CW_SECRET_FILE``), never in a batch script.
"""
from __future__ import annotations

import json
import os
import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from cw import add_version_option
from cw.client.discovery import (
    DEFAULT_NAME,
    DISCOVERY_TIMEOUT,
    SQUEUE_FORMAT,
    JobInfo,
    SlurmError,
    address_file,
    available,
    cluster_dir,
    cluster_jobs,
    job_name,
    job_state,
    master_address,
    parse_squeue,
    read_address,
    state_dir,
)
from cw.client.discovery import run_slurm as _run
from cw.client.executor import ClusterExecutor
from cw.errors import CwError
from cw.wire.address import format_address

# Discovery's names are part of this module's interface too: the worker's
# slurm:NAME resolver imports master_address from here.
__all__ = ["DEFAULT_NAME", "DISCOVERY_TIMEOUT", "DRAIN_SECONDS", "SQUEUE_FORMAT", "STOP_TIMEOUT", "JobInfo",
           "Options", "SlurmCluster", "SlurmError", "address_file", "available", "cluster_dir", "cluster_jobs",
           "job_name", "job_state", "main", "master_address", "master_host", "parse_sbatch", "parse_squeue",
           "read_address", "render_master_script", "render_worker_script", "sbatch", "start", "state_dir",
           "status", "stop", "worker_command"]

#: Seconds ``stop`` waits for the cluster's jobs to leave squeue.
STOP_TIMEOUT = 30.0
#: Seconds before the time limit at which SLURM asks workers to drain.
DRAIN_SECONDS = 120
#: Seconds a SLURM worker keeps looking for its master (worker --connect-timeout).
WORKER_CONNECT_TIMEOUT = 600


# --- batch scripts ------------------------------------------------------------

@dataclass
class Options:
    """How to start a cluster; the command-line options of ``slurm.py start``."""
    name: str = DEFAULT_NAME
    workers: int = 1
    partition: str | None = None
    account: str | None = None
    time: str | None = None             # SLURM time limit, e.g. "1-00:00:00"
    mem: str | None = None              # memory per worker, e.g. "4G"
    cpus_per_worker: int = 1
    isolated: bool = False              # one worker per node, nodes not shared
    array: bool = False                 # workers as a job array instead of one job of N tasks
    docker_image: str | None = None
    docker_args: str = ""
    xmaster: list[str] = field(default_factory=list)    # extra sbatch arguments
    xworkers: list[str] = field(default_factory=list)
    extra_lines: list[str] = field(default_factory=list)  # extra batch-script lines
    port: int = 0                       # 0: a free port, published in the address file
    advertise: str = "name"             # publish the master's host "name", or its first "ip" address
    master_restarts: int = 10           # restarts of a crashed master within its job
    master_args: list[str] = field(default_factory=list)  # extra `python -m cw.master` arguments
    tls: bool = False                   # the master speaks TLS only; the address file says so to the workers
    worker_connect_timeout: float = WORKER_CONNECT_TIMEOUT
    drain_seconds: int = DRAIN_SECONDS
    python: str = sys.executable


def _directives(opts: Options, role: str) -> list[str]:
    logs = cluster_dir(opts.name) / "logs"
    lines = [f"--job-name={job_name(opts.name, role)}", f"--output={logs}/{role}-%j.log",
             f"--chdir={os.getcwd()}"]
    if opts.partition:
        lines.append(f"--partition={opts.partition}")
    if opts.account:
        lines.append(f"--account={opts.account}")
    if opts.time:
        lines.append(f"--time={opts.time}")
    return lines


def render_master_script(opts: Options) -> str:
    """The master job: SLURM requeues it when its node fails (--requeue; it
    starts again elsewhere once SLURM has marked the node down, after
    SlurmdTimeout, and its old credential has expired, CredExpire + 1 s), and
    its batch script restarts a master that crashes on a live node.  Each
    master binds a free port (unless --port) and publishes it in the address
    file, where workers and clients find it again (issue 13)."""
    lines = _directives(opts, "master") + ["--ntasks=1", "--cpus-per-task=1", "--requeue"]
    addr = str(address_file(opts.name))
    command = [opts.python, "-m", "cw.master", "--bind", "0.0.0.0", "--port", str(opts.port),
               "--address-file", addr, *(["--tls"] if opts.tls else []), *opts.master_args]
    advertise = ' --advertise "$(hostname -I | cut -d" " -f1)"' if opts.advertise == "ip" else ""
    body = f"""\
# A master that stops on SIGTERM (scancel, the time limit: SLURM signals
# every process of the job) exits 0 and ends the job; one that crashes
# (a signal, an uncaught error) is started again, at most {opts.master_restarts} times.
# Exit 2 is a configuration error, which a restart cannot mend.
trap 'stopping=1' TERM INT
stopping=0
for attempt in $(seq 0 {opts.master_restarts}); do
    # The file a crashed master left names a port nobody listens on:
    # without it, workers and clients wait for the new one instead.
    rm -f {shlex.quote(addr)}
    {shlex.join(command)}{advertise}
    status=$?
    if [ "$stopping" = 1 ] || [ "$status" = 0 ] || [ "$status" = 2 ]; then exit "$status"; fi
    echo "cw: the master exited with status $status; restart $((attempt + 1)) of {opts.master_restarts}" >&2
    sleep 1
done
exit "$status"
"""
    return _script(lines, opts.extra_lines, body)


def worker_command(opts: Options) -> list[str]:
    # Workers wait for a lost master as long as SLURM may take to requeue its
    # job on another node (SlurmdTimeout, often 300 s, then CredExpire + 1 s,
    # 121 s by default); they stop at once when the master job is gone for good.
    # --port always: 0 (a free port) tells the workers there is no fixed port
    # to try on the master job's node when its address file is missing.
    command = [opts.python, "-m", "cw.worker", f"slurm:{opts.name}", "--connect-timeout",
               str(opts.worker_connect_timeout), "--port", str(opts.port)]
    if opts.docker_image:
        home = str(Path.home())
        docker = ["docker", "run", "--rm", "--network", "host", "-v", f"{home}:{home}",
                  "-e", "CW_STATE_DIR", "-e", "CW_SECRET_FILE", "-e", "HOME", "-w", os.getcwd()]
        # The image's entrypoint is its Python (as the original cw required).
        return docker + shlex.split(opts.docker_args) + [opts.docker_image] + command[1:]
    return command


def render_worker_script(opts: Options) -> str:
    lines = _directives(opts, "workers") + [f"--cpus-per-task={opts.cpus_per_worker}"]
    if opts.mem:
        lines.append(f"--mem={opts.mem}")
    command = shlex.join(worker_command(opts))
    if opts.array:
        # Each array task is one worker, run by the batch shell itself: the
        # drain signal must go to the batch step (B:).
        lines += [f"--array=0-{opts.workers - 1}", "--ntasks=1",
                  f"--signal=B:TERM@{opts.drain_seconds}"]
        body = "exec " + command
    else:
        # --no-kill (job and step): a failed node costs its own workers only.
        # Without it SLURM kills the whole job on every node and requeues it,
        # leaving the cluster with no worker for minutes (issue 13).
        lines += [f"--ntasks={opts.workers}", f"--signal=TERM@{opts.drain_seconds}", "--no-kill"]
        if opts.isolated:
            lines += ["--ntasks-per-node=1", "--exclusive"]
        body = f"srun --no-kill --kill-on-bad-exit=0 {command}"
    return _script(lines, opts.extra_lines, body)


def _script(directives: list[str], extra: list[str], body: str) -> str:
    head = ["#!/bin/bash"] + [f"#SBATCH {d}" for d in directives]
    return "\n".join(head + list(extra) + [body]) + "\n"


# --- talking to SLURM ----------------------------------------------------------

def parse_sbatch(output: str) -> str:
    """The job id from ``sbatch --parsable`` output: ``ID`` or ``ID;cluster``."""
    text = output.strip().splitlines()[-1] if output.strip() else ""
    jobid = text.split(";")[0].strip()
    if not jobid.isdigit():
        raise SlurmError(f"sbatch --parsable printed {output!r}, which holds no job id")
    return jobid


def sbatch(script: str, extra_args=()) -> str:
    return parse_sbatch(_run(["sbatch", "--parsable", *extra_args], input=script))


# --- start, find, stop ---------------------------------------------------------

def start(workers: int = 1, *, master: bool = True, start_workers: bool = True, **options) -> dict:
    """Submits the master job and the worker job(s); returns their job ids."""
    from cw.wire.auth import load_secret
    opts = Options(workers=workers, **options)
    if workers < 1:
        raise ValueError("workers must be at least 1")
    (cluster_dir(opts.name) / "logs").mkdir(parents=True, exist_ok=True)
    load_secret(create=True)      # before any job starts, so that none of them races to create it
    jobs = {}
    if master:
        if any(j.name == job_name(opts.name, "master") for j in cluster_jobs(opts.name)):
            raise SlurmError(f"cluster {opts.name!r} already has a master job; `slurm.py stop --name "
                             f"{opts.name}` first, or pick another --name")
        address_file(opts.name).unlink(missing_ok=True)
        jobs["master"] = sbatch(render_master_script(opts), opts.xmaster)
    if start_workers:
        jobs["workers"] = sbatch(render_worker_script(opts), opts.xworkers)
    return jobs


def master_host(name: str | None = None) -> str:
    return master_address(name)[0]


def stop(name: str = DEFAULT_NAME, timeout: float = STOP_TIMEOUT) -> list[str]:
    """Cancels the cluster's jobs and waits until SLURM lists none of them.

    Plain ``scancel`` (SIGTERM to every process of the job, batch shell
    included, then SIGKILL after KillWait): ``scancel -s SIG`` without
    ``--full`` would reach only job steps and leave a batch script running."""
    jobids = sorted({j.jobid.split("_")[0] for j in cluster_jobs(name)})
    if jobids:
        _run(["scancel", *jobids])
    deadline = time.monotonic() + timeout
    while cluster_jobs(name):
        if time.monotonic() > deadline:
            raise SlurmError(f"jobs of cluster {name!r} still listed by squeue {timeout:g} s after scancel")
        time.sleep(0.2)
    address_file(name).unlink(missing_ok=True)
    return jobids


def status(name: str = DEFAULT_NAME) -> dict:
    """Jobs, states, nodes, the master's address and its connected workers."""
    jobs = cluster_jobs(name)
    result = {"name": name, "jobs": [j._asdict() for j in jobs], "master": None, "workers": []}
    address = read_address(name)
    if address is not None:
        result["master"] = str(address)
        try:
            with ClusterExecutor(str(address), connect_timeout=5) as ex:
                result["workers"] = ex.status()["workers"]
        except CwError as exc:
            result["error"] = str(exc)
    return result


class SlurmCluster:
    """A cluster started on SLURM for a ``cw.allocate`` block."""

    def __init__(self, name: str, host: str, port: int, tls: bool = False):
        self.name, self.host, self.port, self.tls = name, host, port, tls

    @property
    def address(self) -> str:
        return format_address(self.host, self.port, self.tls)

    @classmethod
    def start(cls, nworkers: int, name: str | None = None, timeout: float = DISCOVERY_TIMEOUT,
              **options) -> SlurmCluster:
        name = name or f"alloc-{os.getpid()}-{os.urandom(3).hex()}"
        start(nworkers, name=name, **options)
        try:
            found = master_address(name, timeout=timeout)
            host, port = found
            with ClusterExecutor(str(found)) as ex:
                deadline = time.monotonic() + timeout
                while len(ex.status()["workers"]) < nworkers:
                    if time.monotonic() > deadline:
                        raise SlurmError(f"only {len(ex.status()['workers'])} of {nworkers} workers of cluster "
                                         f"{name!r} connected within {timeout:g} s; see {cluster_dir(name) / 'logs'}")
                    time.sleep(0.2)
        except BaseException:
            stop(name)
            raise
        return cls(name, host, port, found.tls)

    def executor(self, **options):
        return ClusterExecutor(self.address, self.port, **options)

    def stop(self) -> None:
        stop(self.name)


# --- command line -------------------------------------------------------------

def _print_status(info: dict) -> None:
    print(f"cluster {info['name']}: master {info['master'] or 'not published yet'}")
    for job in info["jobs"]:
        reason = f" ({job['reason']})" if job["reason"] not in ("", "None") else ""
        print(f"  job {job['jobid']:<10} {job['name']:<28} {job['state']}{reason} {job['nodes']}")
    if not info["jobs"]:
        print("  no jobs")
    print(f"  {len(info['workers'])} workers connected")
    for w in info["workers"]:
        print(f"    {w['host']} pid {w['pid']}: {w['state']}, {w['jobs_done']} jobs done")
    if info.get("error"):
        print(f"  could not ask the master: {info['error']}")


def main(argv=None, prog: str = "slurm.py") -> int:
    import argparse

    from cw import cliargs
    parser = argparse.ArgumentParser(
        prog=prog, description="Start, inspect and stop a cw cluster on SLURM: one master job and worker jobs.")
    add_version_option(parser)
    named = argparse.ArgumentParser(add_help=False)
    named.add_argument("--name", default=os.environ.get("CW_CLUSTER") or DEFAULT_NAME,
                       help="cluster name, so several clusters of one user coexist; clients find it through "
                            "$CW_CLUSTER (default: $CW_CLUSTER or 'default')")
    commands = parser.add_subparsers(dest="command", required=True, metavar="{start,stop,status}")
    begin = commands.add_parser("start", parents=[named], help="submit a master job and worker jobs",
                                description="Submit a cluster's master job and its worker jobs.")
    commands.add_parser("stop", parents=[named], help="cancel the cluster's jobs",
                        description="Cancel every job of the cluster.")
    inspect = commands.add_parser("status", parents=[named], help="the cluster's jobs and what its master sees",
                                  description="The cluster's jobs and what its master sees.")
    inspect.add_argument("--json", action="store_true", help="print JSON")
    begin.add_argument("-n", "--workers", type=cliargs.count, default=1, help="worker processes to start (default 1)")
    begin.add_argument("-M", "--no-master", action="store_true", help="start no master job (add workers)")
    begin.add_argument("-W", "--no-workers", action="store_true", help="start no worker jobs")
    begin.add_argument("--Xmaster", action="append", default=[], metavar="ARG", help="extra sbatch argument "
                       "for the master job (repeatable)")
    begin.add_argument("--Xworkers", action="append", default=[], metavar="ARG", help="extra sbatch argument "
                       "for the worker jobs (repeatable)")
    begin.add_argument("-p", "--partition")
    begin.add_argument("-A", "--account")
    begin.add_argument("-t", "--time", help="time limit of every job, in SLURM's format (1-00:00:00)")
    begin.add_argument("--mem", help="memory per worker task, e.g. 4G")
    begin.add_argument("-c", "--cpus-per-worker", type=cliargs.count, default=1)
    begin.add_argument("--isolated", action="store_true", help="one worker per node, nodes not shared")
    begin.add_argument("--array", action="store_true", help="workers as a job array (one job each) "
                       "instead of one job of N tasks")
    begin.add_argument("-d", "--docker-image", help="run the workers in this image (its entrypoint: python)")
    begin.add_argument("--docker-args", default="", help="extra `docker run` arguments")
    begin.add_argument("--extra", action="append", default=[], metavar="LINE",
                       help="extra line for the batch scripts, e.g. 'module load python' (repeatable)")
    begin.add_argument("--port", type=cliargs.port, default=0,
                       help="master port (default 0: any free port, published)")
    begin.add_argument("--master-arg", action="append", default=[], metavar="ARG",
                       help="extra argument for `python -m cw.master`, e.g. --master-arg=--peer-timeout=10 "
                            "(repeatable)")
    begin.add_argument("--advertise", choices=("name", "ip"), default="name",
                       help="publish the master's host name (default) or its first IP address, for nodes "
                            "whose names do not resolve where clients run")
    begin.add_argument("--drain", type=cliargs.whole_seconds, default=DRAIN_SECONDS,
                       help="seconds before the time limit at which workers stop taking jobs "
                            f"(default {DRAIN_SECONDS})")
    begin.add_argument("--tls", action="store_true",
                       help="the master speaks TLS only (cw master --tls; the certificates are made in the "
                            "shared home on first use); workers and clients follow the address file")
    begin.add_argument("--wait", action="store_true", help="wait until the master published its address")
    args = parser.parse_args(argv)
    try:
        if args.command == "start":
            jobs = start(args.workers, master=not args.no_master, start_workers=not args.no_workers,
                         name=args.name, partition=args.partition, account=args.account, time=args.time,
                         mem=args.mem, cpus_per_worker=args.cpus_per_worker, isolated=args.isolated,
                         array=args.array, docker_image=args.docker_image, docker_args=args.docker_args,
                         xmaster=args.Xmaster, xworkers=args.Xworkers, extra_lines=args.extra,
                         port=args.port, drain_seconds=args.drain, advertise=args.advertise,
                         master_args=args.master_arg, tls=args.tls)
            for role, jobid in jobs.items():
                print(f"submitted {role} job {jobid} ({job_name(args.name, role)})")
            if args.wait:
                host, port = master_address(args.name)
                print(f"master of cluster {args.name} at {host}:{port}")
        elif args.command == "stop":
            jobids = stop(args.name)
            print(f"stopped cluster {args.name}: cancelled {', '.join(jobids) or 'no jobs'}")
        else:
            info = status(args.name)
            print(json.dumps(info, indent=2)) if args.json else _print_status(info)
    except (CwError, LookupError, ValueError) as exc:
        print(f"slurm.py: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
