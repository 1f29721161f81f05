"""Memory and CPU time of processes, from /proc (Linux)."""
from __future__ import annotations

import os
import re
import time

_FIELD = re.compile(r"^(\w+):\s+(\d+)", re.M)


def status(pid: int | str = "self") -> dict[str, int]:
    """The numeric fields of /proc/PID/status (VmRSS, VmHWM, ... in KiB)."""
    with open(f"/proc/{pid}/status") as f:
        return {k: int(v) for k, v in _FIELD.findall(f.read())}


def rss_kib(pid: int | str = "self") -> int:
    return status(pid)["VmRSS"]


def hwm_kib(pid: int | str = "self") -> int:
    return status(pid)["VmHWM"]


def reset_hwm(pid: int | str = "self") -> bool:
    """Resets the peak RSS (VmHWM) of a process to its current RSS (Linux >= 4.0).
    Returns False when the kernel or permissions do not allow it."""
    try:
        with open(f"/proc/{pid}/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def cpu_seconds(pid: int | str = "self") -> float:
    """User + system CPU time of a process (all its threads), in seconds."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rpartition(")")[2].split()
    # fields[0] is the state (field 3); utime and stime are fields 14 and 15.
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _stat_fields(pid) -> list[str]:
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rpartition(")")[2].split()


def children(parents) -> list[tuple[int, str]]:
    """(pid, command name) of the live processes whose parent is in ``parents``."""
    parents = set(parents)
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                head, _, rest = f.read().rpartition(")")
            if int(rest.split()[1]) in parents:
                found.append((int(entry), head.partition("(")[2]))
        except (OSError, ValueError, IndexError):
            continue
    return found


def tree_cpu_seconds(root: int | None = None) -> float:
    """CPU time of a process and all its live descendants, each with its reaped
    children's time (cutime, cstime): what this benchmark itself has used."""
    root = os.getpid() if root is None else root
    children: dict[int, list[int]] = {}
    times: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            fields = _stat_fields(entry)
        except OSError:
            continue
        pid = int(entry)
        children.setdefault(int(fields[1]), []).append(pid)
        times[pid] = sum(int(x) for x in fields[11:15])
    total, todo = 0, [root]
    while todo:
        pid = todo.pop()
        total += times.get(pid, 0)
        todo.extend(children.get(pid, ()))
    return total / os.sysconf("SC_CLK_TCK")


def machine_cpu_seconds() -> tuple[float, float]:
    """(busy, steal) CPU seconds of the whole machine since boot, from /proc/stat."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    user, nice, system, idle, iowait, irq, softirq, steal = (fields + [0] * 8)[:8]
    hz = os.sysconf("SC_CLK_TCK")
    return (user + nice + system + irq + softirq) / hz, steal / hz


class Contention:
    """How much of the machine's CPU others used while a case ran (other
    users' processes compete with the benchmark on a shared machine)."""

    def __init__(self):
        self.t0 = time.perf_counter()
        self.busy0, self.steal0 = machine_cpu_seconds()
        self.own0 = tree_cpu_seconds()

    def stop(self) -> dict:
        wall = time.perf_counter() - self.t0
        busy, steal = machine_cpu_seconds()
        own = tree_cpu_seconds() - self.own0
        ncpu = os.cpu_count() or 1
        other = max(0.0, (busy - self.busy0) - own)
        return {"wall_s": wall, "own_cpu_s": own, "other_cpu_s": other,
                "other_share": other / (wall * ncpu) if wall > 0 else 0.0,
                "steal_share": (steal - self.steal0) / (wall * ncpu) if wall > 0 else 0.0,
                "load_avg_end": os.getloadavg()[0]}
