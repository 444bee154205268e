"""Where a number came from: code version, library versions, hardware.

Every ``record.json`` carries this block, so a table cell can always be traced to the exact code, stack
and machine that produced it: git SHA and dirty flag, library versions, CPU, GPU, CUDA and driver.
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import subprocess
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from globalcom2.paths import PROJECT_ROOT

_PACKAGES = (
    "torch",
    "transformers",
    "lmms_eval",
    "accelerate",
    "hydra-core",
    "datasets",
    "tokenizers",
    "numpy",
)


def git_state(root: str | Path | None = None) -> dict[str, Any]:
    """``{"sha", "dirty", "untracked"}`` of the checkout at ``root`` (the project root by default); ``None``
    values outside a git checkout.

    ``dirty`` counts untracked files that are not ignored (a new method module not yet committed changes
    what runs) as well as changes to tracked ones; ``untracked`` is how many there are. Git is run with
    ``safe.directory=*`` for this one read: a checkout owned by another user (root in a container over a
    bind-mounted checkout) is otherwise refused by git >= 2.35.2, and the SHA silently lost; the repository's
    fsmonitor hook is turned off so that no program of the repository's config runs.
    """
    root = Path(root) if root is not None else PROJECT_ROOT

    def git(*args: str) -> str | None:
        command = ["git", "-c", "safe.directory=*", "-c", "core.fsmonitor=false", "-C", str(root), *args]
        try:
            out = subprocess.run(command, capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return out.stdout.strip() if out.returncode == 0 else None

    sha = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=normal")
    if sha is None and (root / ".git").exists():
        warnings.warn(
            f"{root} is a git checkout, but its commit could not be read: provenance records no SHA",
            stacklevel=2,
        )
    lines = status.splitlines() if status is not None else []
    return {
        "sha": sha,
        "dirty": None if status is None else bool(lines),
        "untracked": None if status is None else sum(line.startswith("??") for line in lines),
    }


_STATE_AT_START: dict[str, Any] | None = None


def note_code_state_at_start() -> None:
    """Read the checkout's state now, when the code of this process is loaded: :func:`provenance`, called
    when a cell ends (possibly hours later, after a ``git pull`` or checkout), then records this state and
    flags a change."""
    global _STATE_AT_START
    if _STATE_AT_START is None:
        _STATE_AT_START = git_state()


def code_state() -> dict[str, Any]:
    """The checkout's state for a record: as at :func:`note_code_state_at_start` when it was called, with
    ``changed_during_run`` and the state now (``now``) when they differ; else as now."""
    now = git_state()
    if _STATE_AT_START is None or now == _STATE_AT_START:
        return now
    return {**_STATE_AT_START, "changed_during_run": True, "now": now}


def package_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {}
    for name in _PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def hardware(device: str | torch.device | None = None) -> dict[str, Any]:
    """CPU, and GPU name/memory/CUDA version when one is visible.

    The GPU described is ``device`` when it names a CUDA device with an index (``cuda:1``), else the process's
    current CUDA device: on a machine with mixed GPUs, a benchmark run with ``--device cuda:1`` must not be
    credited to GPU 0's model."""
    info: dict[str, Any] = {
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cuda_available": torch.cuda.is_available(),
    }
    if torch.cuda.is_available():
        device = torch.device(device) if device is not None else None
        on_named_gpu = device is not None and device.type == "cuda" and device.index is not None
        index = device.index if on_named_gpu else torch.cuda.current_device()
        props = torch.cuda.get_device_properties(index)
        info.update(
            gpu=props.name,
            gpu_index=index,
            gpu_count=torch.cuda.device_count(),
            gpu_memory_gb=round(props.total_memory / 2**30, 1),
            cuda=torch.version.cuda,
            cudnn=torch.backends.cudnn.version(),
            driver=_nvidia_driver(),
        )
    return info


#: How every hardware label of a CPU run starts (:func:`hardware_label`); anything else names a GPU.
CPU_LABEL = "CPU "


def hardware_label(info: Mapping[str, Any], device: str | torch.device | None) -> str:
    """How a table's caption or column names the hardware of ``info`` (a :func:`hardware` block) that ran on
    ``device``: the GPU's name for a CUDA device, else the CPU, so a CPU run on a GPU machine is not credited
    to its GPU. ``device=None`` (an old record that did not say) falls back to the GPU when one was seen."""
    on_gpu = torch.device(device).type == "cuda" if device is not None else bool(info.get("gpu"))
    if on_gpu and info.get("gpu"):
        return str(info["gpu"])
    return f"{CPU_LABEL}({info.get('machine', '?')}, {info.get('cpu_count', '?')} cores)"


def _nvidia_driver() -> str | None:
    """The NVIDIA driver version ``nvidia-smi`` reports (``None`` without it)."""
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None


def provenance(device: str | torch.device | None = None) -> dict[str, Any]:
    """The full provenance block: git, versions, hardware (the GPU of ``device``, see :func:`hardware`),
    python."""
    return {
        "git": code_state(),
        "versions": package_versions(),
        "python": platform.python_version(),
        "hardware": hardware(device),
    }
