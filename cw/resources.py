"""What a worker machine has and what a job needs (CPUs, memory, GPUs, and
any named resource a user declares), and the books the dispatcher keeps of
them.  Pure functions except ``detect_gpus`` and ``physical_memory``, which
look at this machine.

Amounts are numbers; memory may be written with a unit ("8G", "512M",
binary multiples) and is kept in bytes.  GPUs are counted on the job's side
and named by id on the worker's (``gpu_ids``), so a job can be told which
ones are its own (``CUDA_VISIBLE_DEVICES``).
"""
from __future__ import annotations

import math
import os
import re
import shutil
import subprocess

_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40, "p": 1 << 50}
_AMOUNT = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([kmgtp]?)(i?b)?\s*$", re.IGNORECASE)
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_.-]{0,63}$")
MAX_KINDS = 32

#: What a job needs when it says nothing: one CPU (the worker process it runs in).
PLAIN = {"cpu": 1}


def parse_amount(value, name: str = "amount") -> float:
    """A non-negative amount: a number, or a string with an optional binary
    unit ("64G", "1.5T", "512MiB")."""
    if isinstance(value, bool):
        raise ValueError(f"resource {name!r} must be a number, not {value!r}")
    if isinstance(value, (int, float)):
        amount = float(value)
    elif isinstance(value, str):
        match = _AMOUNT.match(value)
        if not match:
            raise ValueError(f"resource {name!r}: cannot read {value!r} as an amount (examples: 4, 0.5, 8G, 512M)")
        amount = float(match.group(1)) * _UNITS[match.group(2).lower()]
    else:
        raise ValueError(f"resource {name!r} must be a number or a string like '8G', not {type(value).__name__}")
    if not (amount >= 0 and math.isfinite(amount)):
        raise ValueError(f"resource {name!r} must be a finite amount >= 0, not {value!r}")
    return int(amount) if amount == int(amount) else amount


def check_name(name) -> str:
    if not isinstance(name, str) or not _NAME.match(name):
        raise ValueError(f"resource name {name!r} is not valid: use letters, digits, '_', '.' or '-' "
                         "(at most 64 characters, starting with a letter)")
    return name.lower()


def normalize_need(resources) -> dict:
    """A job's ``resources=`` as {name: amount}; CPUs default to 1 and GPUs
    must be whole.  Raises ValueError with the reason."""
    if resources is None:
        return PLAIN
    if not isinstance(resources, dict):
        raise ValueError(f"resources must be a dict like {{'cpu': 2, 'mem': '8G', 'gpu': 1}}, not {resources!r}")
    if len(resources) > MAX_KINDS:
        raise ValueError(f"resources names {len(resources)} kinds; at most {MAX_KINDS}")
    need = {"cpu": 1}
    for name, value in resources.items():
        name = check_name(name)
        need[name] = parse_amount(value, name)
    if need.get("gpu", 0) != int(need.get("gpu", 0)):
        raise ValueError(f"a job asks for whole GPUs, not {need['gpu']}")
    need = {k: v for k, v in need.items() if v or k == "cpu"}
    return PLAIN if need == PLAIN else need


def parse_spec(spec: str) -> dict:
    """A worker's ``--resources gpu=2,mem=64G,license=3`` as {name: amount}."""
    declared = {}
    for part in filter(None, (p.strip() for p in (spec or "").split(","))):
        name, sep, value = part.partition("=")
        if not sep:
            raise ValueError(f"--resources: {part!r} should be NAME=AMOUNT (like gpu=2 or mem=64G)")
        declared[check_name(name.strip())] = parse_amount(value.strip(), name.strip())
    return declared


def parse_nvidia_smi(text: str) -> list[str]:
    """GPU indices from ``nvidia-smi -L`` ("GPU 0: NVIDIA A100 (UUID: ...)")."""
    return [m.group(1) for m in re.finditer(r"^GPU (\d+):", text, re.MULTILINE)]


def detect_gpus(environ=os.environ) -> list[str]:
    """The GPU ids this machine lets us use.  ``CUDA_VISIBLE_DEVICES``, when
    set, is the answer (the batch system gave us those); else ``nvidia-smi -L``
    when it is installed; else none."""
    visible = environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return [d.strip() for d in visible.split(",") if d.strip() and d.strip() != "-1"]
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return []
    try:
        out = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=20).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return parse_nvidia_smi(out)


def physical_memory() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 0


def node_resources(processes: int, declared: dict, gpus: list[str], memory: int) -> dict:
    """What a worker machine offers: CPUs default to its worker processes,
    memory to the machine's, GPUs to those detected; ``declared`` overrides.
    A declared GPU count without detected ones names them 0..n-1."""
    offer = {"cpu": processes}
    if memory:
        offer["mem"] = memory
    offer.update(declared)
    if "gpu" in declared:
        count = int(declared["gpu"])
        ids = gpus[:count] if len(gpus) >= count else [str(i) for i in range(count)]
    else:
        ids = list(gpus)
    offer["gpu"] = len(ids)
    if not offer["gpu"]:
        del offer["gpu"]
    return {"resources": offer, "gpu_ids": ids}


def format_amounts(amounts: dict) -> str:
    """{"cpu": 2, "mem": 8589934592} -> "cpu=2 mem=8G" (for messages)."""
    parts = []
    for name, value in amounts.items():
        if name == "mem" and value >= 1 << 20:
            for unit in "TGM":
                size = _UNITS[unit.lower()]
                if value >= size:
                    value = f"{value / size:.3g}{unit}"
                    break
        parts.append(f"{name}={value}")
    return " ".join(parts)


class Node:
    """One worker machine (a supervisor and its processes): what it offers,
    what its workers have reserved, and which GPU ids are free.

    A worker process runs one job at a time, so it reserves the most any of
    its jobs needs, not their sum: a job sent ahead (prefetched) behind a
    running one costs nothing more unless it needs more."""

    __slots__ = ("capacity", "free_gpus", "key", "reserved_for", "used", "workers")

    def __init__(self, key: str, capacity: dict, gpu_ids: list[str]):
        self.key = key
        self.capacity = dict(capacity)
        self.used: dict = {}
        self.free_gpus = list(gpu_ids)
        self.workers: set[int] = set()
        self.reserved_for = None      # a queued Job that this node is kept free for

    def can_ever_fit(self, need: dict) -> bool:
        capacity = self.capacity
        return all(amount <= capacity.get(name, 0) for name, amount in need.items())

    def growth(self, held: dict, need: dict) -> dict | None:
        """What reserving ``need`` on top of a worker's ``held`` costs the node;
        None if it does not fit now."""
        extra = {}
        used, capacity = self.used, self.capacity
        for name, amount in need.items():
            more = amount - held.get(name, 0)
            if more > 0:
                if used.get(name, 0) + more > capacity.get(name, 0):
                    return None
                extra[name] = more
        return extra

    def free_gpu_ids(self, ids: list[str]) -> None:
        self.free_gpus += ids
        self.free_gpus.sort(key=lambda i: (len(i), i))   # "2" before "10"

    def take(self, extra: dict) -> None:
        used = self.used
        for name, amount in extra.items():
            used[name] = used.get(name, 0) + amount

    def give_back(self, held: dict, kept: dict) -> None:
        used = self.used
        for name, amount in held.items():
            less = amount - kept.get(name, 0)
            if less > 0:
                used[name] = used.get(name, 0) - less
