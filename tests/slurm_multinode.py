"""A real multi-node SLURM on one machine, for tests: one login host and N
compute nodes, each a network namespace of tests/netns.py on its private
bridge (addresses from 198.18.0.0/24 only, never routed by the machine).

::

    login  198.18.0.1   slurmctld; sbatch, squeue, slurm.py and clients run here
    node-n1 198.18.0.2  slurmd  \\
    node-n2 198.18.0.3  slurmd   > compute nodes; batch jobs and their workers
    ...                         /

Why not ../shared/slurm/start-multinode-slurm.sh: it puts its nodes on
198.18.1.0/24 and routes that subnet from the machine itself, and it edits
/etc/hosts; this bed keeps everything inside namespaces (the machine's routing
table and files stay as they were), names every namespace after the test
process, and is removed whole at teardown, so a run never collides with a
test bed, or a multi-host test, of someone else.

Node names resolve nowhere: slurm.conf gives every NodeAddr, and cw's master
publishes its IP address (``--advertise``) rather than a host name.  State,
config and logs live in a temporary directory.  The daemons run in the
foreground as children of the test process (``setpriv --pdeathsig``), started
with ``nsenter --net`` rather than ``ip netns exec``, whose remount of /sys
hides the cgroup mounts slurmd looks for.

A node "fails" with ``fail(node)``: its bridge port stops forwarding and every
process in it is killed, as when a machine loses power.  slurmctld notices
after SLURMD_TIMEOUT.
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

from netns import NetnsUnavailable, Network

#: Seconds of silence after which slurmctld marks a node DOWN (SLURM's
#: default is 300; a site's is often 300 too).  Low, so a test sees it soon.
SLURMD_TIMEOUT = 10
#: A requeued job may start again only after CredExpire + 1 s (120 s by
#: default): its old credential must expire first.  Low here, for the same reason.
CRED_EXPIRE = 10
CPUS_PER_NODE = 2
SLURM_TOOLS = ("slurmctld", "slurmd", "sbatch", "squeue", "scancel", "nsenter")


def unavailable_reason() -> str | None:
    for tool in SLURM_TOOLS:
        if shutil.which(tool) is None:
            return f"`{tool}` is not installed (apt-get install slurmctld slurmd slurm-client util-linux)"
    return None


class MultiNodeSlurm:
    """slurmctld on a login host, one slurmd per compute node."""

    def __init__(self, nodes: int = 3):
        reason = unavailable_reason()
        if reason:
            raise NetnsUnavailable(reason)
        self.network = Network()
        self.dir = Path(tempfile.mkdtemp(prefix="cw-slurm-multi-"))
        self.daemons: list[subprocess.Popen] = []
        try:
            self.login = self.network.add_host("login")
            self.nodes = [self.network.add_host(f"node-n{i}") for i in range(1, nodes + 1)]
            self.conf = self.dir / "slurm.conf"
            self._write_conf()
            self._start()
        except BaseException:
            self.close()
            raise

    @property
    def env(self) -> dict[str, str]:
        """The environment of a process that uses this SLURM."""
        return {**os.environ, "SLURM_CONF": str(self.conf)}

    def _write_conf(self) -> None:
        d = self.dir
        for sub in ("state", "spool", "log", "run"):
            (d / sub).mkdir()
        lines = [
            "ClusterName=cwmulti", f"SlurmctldHost=login({self.login.address})",
            "AuthType=auth/none", "CredType=cred/none", f"AuthInfo=cred_expire={CRED_EXPIRE}",
            "SlurmUser=root", "SlurmdUser=root",
            f"StateSaveLocation={d}/state", f"SlurmdSpoolDir={d}/spool/%n",
            f"SlurmctldPidFile={d}/run/slurmctld.pid", f"SlurmdPidFile={d}/run/slurmd-%n.pid",
            f"SlurmctldLogFile={d}/log/slurmctld.log", f"SlurmdLogFile={d}/log/slurmd-%n.log",
            "MailProg=/bin/true", "MpiDefault=none", "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none", "JobAcctGatherType=jobacct_gather/none",
            "AccountingStorageType=accounting_storage/none",
            "SelectType=select/cons_tres", "SelectTypeParameters=CR_CPU", "SchedulerType=sched/backfill",
            "SchedulerParameters=batch_sched_delay=0,sched_min_interval=0",
            "ReturnToService=2", "SlurmctldTimeout=30", f"SlurmdTimeout={SLURMD_TIMEOUT}",
            "InactiveLimit=0", "MinJobAge=300", "KillWait=5", "Waittime=0",
        ]
        for node in self.nodes:
            lines.append(f"NodeName={node.name} NodeAddr={node.address} CPUs={CPUS_PER_NODE} RealMemory=2000 "
                         "State=UNKNOWN")
        lines.append(f"PartitionName=debug Nodes={','.join(n.name for n in self.nodes)} Default=YES "
                     "MaxTime=INFINITE State=UP")
        self.conf.write_text("\n".join(lines) + "\n")

    def _daemon(self, host, command: list[str]) -> None:
        log = open(self.dir / "log" / f"{host.name}.out", "w")
        with log:
            proc = subprocess.Popen(
                ["nsenter", f"--net=/run/netns/{host.netns}", "setpriv", "--pdeathsig", "KILL",
                 "unshare", "--uts", "sh", "-c", 'hostname "$0" && exec "$@"', host.name, *command],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=self.env)
        self.daemons.append(proc)

    def _start(self) -> None:
        self._daemon(self.login, ["slurmctld", "-D", "-i", "-f", str(self.conf)])
        for node in self.nodes:
            (self.dir / "spool" / node.name).mkdir()
            self._daemon(node, ["slurmd", "-D", "-N", node.name, "-f", str(self.conf)])
        deadline = time.monotonic() + 60
        while self.idle_nodes() < len(self.nodes):
            for proc in self.daemons:
                if proc.poll() is not None:
                    raise RuntimeError(f"{proc.args[-5:]} exited (status {proc.returncode}); logs in {self.dir}/log")
            if time.monotonic() > deadline:
                raise RuntimeError(f"only {self.idle_nodes()} of {len(self.nodes)} nodes became idle within 60 s; "
                                   f"logs in {self.dir}/log")
            time.sleep(0.2)

    def run(self, args: list[str], timeout: float = 60.0) -> subprocess.CompletedProcess:
        """Runs ``args`` on the login host (where SLURM's commands reach slurmctld)."""
        return self.login.run(["env", f"SLURM_CONF={self.conf}", *args], timeout=timeout)

    def popen(self, args: list[str], **kwargs) -> subprocess.Popen:
        """Starts ``args`` on the login host."""
        return self.login.popen(["env", f"SLURM_CONF={self.conf}", *args], **kwargs)

    def idle_nodes(self) -> int:
        proc = self.run(["sinfo", "-h", "-N", "-o", "%T"], timeout=15)
        return sum(1 for state in proc.stdout.split() if state == "idle")

    def node_state(self, node) -> str:
        return self.run(["sinfo", "-h", "-n", node.name, "-o", "%T"], timeout=15).stdout.strip()

    def fail(self, node) -> None:
        """``node`` loses power: cut off the network, every process in it killed."""
        node.cut()
        for pid in node.pids():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def restore(self, node) -> None:
        """``node`` powers on again: back on the network, its slurmd started
        (SLURM returns it to service by itself, ReturnToService=2)."""
        node.heal()
        self._daemon(node, ["slurmd", "-D", "-N", node.name, "-f", str(self.conf)])

    def close(self) -> None:
        """Stops the daemons, every job process with them (they live in the
        namespaces, which go), and removes the state directory."""
        for proc in self.daemons:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.daemons:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        try:
            self.network.close()
        finally:
            if os.environ.get("CW_KEEP_SLURM_LOGS") != "1":
                shutil.rmtree(self.dir, ignore_errors=True)
