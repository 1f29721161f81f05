"""What this worker machine offers: its GPUs, its memory, and what the user
declares with ``--resources``.  The supervisor sends the result in each of
its workers' HELLO; the master books jobs against it (cw.master.placement).

GPUs are named by id (``gpu_ids``), so a job can be told which ones are its
own (``CUDA_VISIBLE_DEVICES``).
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess

from cw.wire.options import check_name, parse_amount


def parse_spec(spec: str) -> dict:
    """A worker's ``--resources gpu=2,mem=64G,license=3`` as {name: amount}."""
    declared = {}
    for part in filter(None, (p.strip() for p in (spec or "").split(","))):
        name, sep, value = part.partition("=")
        if not sep:
            raise ValueError(f"--resources: {part!r} should be NAME=AMOUNT (like gpu=2 or mem=64G)")
        key = check_name(name.strip())
        if key in declared:
            raise ValueError(f"--resources: {key!r} is given twice (in {spec!r}); give it once")
        declared[key] = parse_amount(value.strip(), name.strip())
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
