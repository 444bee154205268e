"""The provenance block names the GPU that ran the numbers, not merely the process's current one."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from globalcom2 import provenance as provenance_module
from globalcom2.provenance import hardware, hardware_label, provenance


@pytest.fixture
def two_gpus(monkeypatch: pytest.MonkeyPatch) -> None:
    """A machine with two different GPUs, GPU 0 current; nothing touches a real driver."""
    names = {0: "GPU-A (index 0)", 1: "GPU-B (index 1)"}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(
        torch.cuda,
        "get_device_properties",
        lambda index: SimpleNamespace(name=names[index], total_memory=(index + 1) * 2**30),
    )
    monkeypatch.setattr(torch.backends.cudnn, "version", lambda: None)
    monkeypatch.setattr(provenance_module, "_nvidia_driver", lambda: None)


@pytest.mark.usefixtures("two_gpus")
@pytest.mark.parametrize(
    ("device", "gpu", "index"),
    [
        ("cuda:1", "GPU-B (index 1)", 1),
        (torch.device("cuda", 1), "GPU-B (index 1)", 1),
        ("cuda:0", "GPU-A (index 0)", 0),
        ("cuda", "GPU-A (index 0)", 0),  # no index: the current device, as torch itself resolves it
        (None, "GPU-A (index 0)", 0),
        ("cpu", "GPU-A (index 0)", 0),  # a CPU run still lists the machine's (current) GPU
    ],
)
def test_the_gpu_described_is_the_device_under_test(device: object, gpu: str, index: int) -> None:
    info = hardware(device)  # type: ignore[arg-type]
    assert (info["gpu"], info["gpu_index"], info["gpu_count"]) == (gpu, index, 2)
    assert info["gpu_memory_gb"] == index + 1
    assert provenance(device)["hardware"]["gpu"] == gpu  # type: ignore[arg-type]


def test_without_cuda_no_gpu_is_claimed() -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA; the two-GPU cases above cover it")
    info = hardware("cuda:1")
    assert info["cuda_available"] is False and "gpu" not in info


@pytest.mark.parametrize(
    ("device", "label"),
    [
        ("cuda:1", "GPU-B"),
        ("cuda", "GPU-B"),
        ("cpu", "CPU (x86_64, 16 cores)"),  # a CPU run on a GPU machine is the CPU's number
        (None, "GPU-B"),  # an old record that did not say where it ran: the GPU it saw
    ],
)
def test_the_hardware_label_follows_the_device(device: str | None, label: str) -> None:
    info = {"machine": "x86_64", "cpu_count": 16, "gpu": "GPU-B"}
    assert hardware_label(info, device) == label
    assert hardware_label({"machine": "x86_64", "cpu_count": 16}, device) == "CPU (x86_64, 16 cores)"
