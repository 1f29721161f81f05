"""Reading amounts (cw.wire.options) and --resources, GPU discovery, what a machine offers
(cw.worker.machine), a machine's books (cw.master.placement)."""
from __future__ import annotations

import os
import stat

import pytest

from cw.master import placement
from cw.wire import options as r
from cw.worker import machine as m

SMI = """GPU 0: NVIDIA A100-SXM4-40GB (UUID: GPU-5a3c...)
GPU 1: NVIDIA A100-SXM4-40GB (UUID: GPU-7b1d...)
"""


@pytest.mark.parametrize("text, value", [
    (4, 4), (0.5, 0.5), ("8G", 8 << 30), ("512M", 512 << 20), ("1.5T", int(1.5 * (1 << 40))),
    ("64GiB", 64 << 30), ("2k", 2048), ("3", 3),
])
def test_amounts_with_binary_units(text, value):
    assert r.parse_amount(text) == value


@pytest.mark.parametrize("bad", ["-1", "lots", "8X", True, None, float("nan"), float("inf"), -2])
def test_bad_amounts_are_refused_with_the_reason(bad):
    with pytest.raises(ValueError, match="resource"):
        r.parse_amount(bad, "mem")


def test_worker_spec_and_its_errors():
    assert m.parse_spec("gpu=2,mem=64G, license=3") == {"gpu": 2, "mem": 64 << 30, "license": 3}
    assert m.parse_spec("") == {}
    with pytest.raises(ValueError, match="NAME=AMOUNT"):
        m.parse_spec("gpu")
    with pytest.raises(ValueError, match="not valid"):
        m.parse_spec("2gpu=1")
    assert m.parse_spec("cpus=4,Memory=8G,gpus=1") == {"cpu": 4, "mem": 8 << 30, "gpu": 1}
    with pytest.raises(ValueError, match="'mem' is given twice"):
        m.parse_spec("mem=8G,memory=16G")


def test_a_jobs_need_defaults_to_one_cpu_and_wants_whole_gpus():
    assert r.normalize_need(None) is r.PLAIN
    assert r.normalize_need({"cpu": 1}) is r.PLAIN
    assert r.normalize_need({"gpu": 1, "mem": "8G"}) == {"cpu": 1, "gpu": 1, "mem": 8 << 30}
    assert r.normalize_need({"cpu": 0, "gpu": 1}) == {"cpu": 0, "gpu": 1}
    with pytest.raises(ValueError, match="whole GPUs"):
        r.normalize_need({"gpu": 0.5})
    with pytest.raises(ValueError, match="dict"):
        r.normalize_need(["gpu"])


def test_gpu_ids_from_nvidia_smi_and_cuda_visible_devices(tmp_path):
    assert m.parse_nvidia_smi(SMI) == ["0", "1"]
    assert m.detect_gpus({"CUDA_VISIBLE_DEVICES": "2,3"}) == ["2", "3"]
    assert m.detect_gpus({"CUDA_VISIBLE_DEVICES": ""}) == []
    assert m.detect_gpus({"CUDA_VISIBLE_DEVICES": "-1"}) == []
    # A real executable named nvidia-smi on PATH (this machine has no GPU).
    smi = tmp_path / "nvidia-smi"
    smi.write_text("#!/bin/sh\n[ \"$1\" = -L ] && printf '%s' '" + SMI + "'\n")
    smi.chmod(smi.stat().st_mode | stat.S_IXUSR)
    old = os.environ["PATH"]
    os.environ["PATH"] = f"{tmp_path}:{old}"
    try:
        assert m.detect_gpus({}) == ["0", "1"]
    finally:
        os.environ["PATH"] = old


def test_what_a_machine_offers():
    offer = m.node_resources(16, {"mem": 64 << 30}, ["0", "1"], 128 << 30)
    assert offer == {"resources": {"cpu": 16, "mem": 64 << 30, "gpu": 2}, "gpu_ids": ["0", "1"]}
    assert m.node_resources(2, {}, [], 0) == {"resources": {"cpu": 2}, "gpu_ids": []}
    assert m.node_resources(2, {"gpu": 2}, [], 0)["gpu_ids"] == ["0", "1"]      # declared, none detected
    assert m.node_resources(2, {"gpu": 1}, ["3", "5"], 0)["gpu_ids"] == ["3"]   # fewer than detected


def test_node_books_never_go_over_capacity():
    node = placement.Node("n", {"cpu": 2, "gpu": 1}, ["0"])
    assert node.growth({}, {"cpu": 1}) == {"cpu": 1}
    node.take({"cpu": 2})
    assert node.growth({}, {"cpu": 1}) is None
    assert node.growth({"cpu": 1}, {"cpu": 1}) == {}        # a job behind one of its size costs nothing more
    node.give_back({"cpu": 2}, {})
    assert node.growth({}, {"cpu": 2, "gpu": 1}) == {"cpu": 2, "gpu": 1}
    assert not node.can_ever_fit({"gpu": 2})
