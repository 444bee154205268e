"""The provenance block names the GPU that ran the numbers, not merely the process's current one, and the
commit of the code that ran, dirty where anything not ignored differs from it."""

from __future__ import annotations

import subprocess
from types import SimpleNamespace

import pytest
import torch

from globalcom2 import provenance as provenance_module
from globalcom2.provenance import git_state, hardware, hardware_label, provenance


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


def git(root, *args: str) -> None:
    subprocess.run(["git", "-C", str(root), *args], check=True, capture_output=True)


@pytest.fixture
def checkout(tmp_path):
    git(tmp_path, "init", "-q")
    (tmp_path / "tracked.py").write_text("x = 1\n")
    (tmp_path / ".gitignore").write_text("results/\n")
    git(tmp_path, "add", ".")
    git(tmp_path, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "first")
    return tmp_path


def test_an_untracked_module_makes_the_checkout_dirty_and_ignored_files_do_not(checkout):
    """``--untracked-files=no`` called a checkout with a new, uncommitted method module clean."""
    (checkout / "results").mkdir()
    (checkout / "results" / "record.json").write_text("{}")
    clean = git_state(checkout)
    assert len(clean["sha"]) == 40 and clean["dirty"] is False and clean["untracked"] == 0
    (checkout / "new_method.py").write_text("y = 2\n")
    assert git_state(checkout) == {**clean, "dirty": True, "untracked": 1}


def test_a_checkout_owned_by_another_user_still_gives_its_commit(checkout, monkeypatch):
    """git >= 2.35.2 refuses a repository another user owns ("dubious ownership") unless it is declared
    safe; the SHA was then silently None. Simulated with git's own test switch,
    GIT_TEST_ASSUME_DIFFERENT_OWNER."""
    monkeypatch.setenv("GIT_TEST_ASSUME_DIFFERENT_OWNER", "1")
    refused = subprocess.run(
        ["git", "-C", str(checkout), "rev-parse", "HEAD"], capture_output=True, text=True
    )
    assert refused.returncode != 0 and "dubious ownership" in refused.stderr
    assert git_state(checkout)["sha"] is not None


def test_a_record_names_the_code_loaded_at_start_and_flags_a_later_change(checkout, monkeypatch):
    monkeypatch.setattr(provenance_module, "PROJECT_ROOT", checkout)
    monkeypatch.setattr(provenance_module, "_STATE_AT_START", None)
    provenance_module.note_code_state_at_start()
    start = git_state(checkout)
    assert provenance_module.code_state() == start
    (checkout / "tracked.py").write_text("x = 2\n")  # a pull or an edit while the sweep runs
    state = provenance_module.code_state()
    assert state["sha"] == start["sha"] and state["dirty"] is False and state["changed_during_run"] is True
    assert state["now"]["dirty"] is True
