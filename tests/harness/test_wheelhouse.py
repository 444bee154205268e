"""The offline install for clusters, round trip on this machine: ``make wheelhouse``, then ``make install
WHEELHOUSE=…`` into a fresh copy of the project, with no index and no other wheel source."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

from globalcom2.paths import PROJECT_ROOT

pytestmark = pytest.mark.slow  # about 4 minutes: it downloads and installs every dependency


def own_environment() -> dict[str, str]:
    """This process's environment less what would leak into the project under test: an outer make's flags,
    and a ``PYTHONPATH`` (a carried-wheels folder, say) that would shadow the venv this test builds."""
    return {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MAKELEVEL", "PYTHONPATH")}


def make(directory: Path, *args: str, timeout: int = 1800) -> str:
    done = subprocess.run(
        ["make", "-C", str(directory), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=own_environment(),
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout + done.stderr


def test_a_wheelhouse_installs_the_project_offline(tmp_path):
    wheelhouse = tmp_path / "wheelhouse"
    built = make(PROJECT_ROOT, "wheelhouse", f"WHEELHOUSE_DIR={wheelhouse}")
    wheels = {path.name for path in wheelhouse.glob("*.whl")}
    assert any(name.startswith("globalcom2_harness-") for name in wheels)
    assert any(name.startswith("antlr4_python3_runtime-") for name in wheels), "sdist-only deps are built"
    assert not list(wheelhouse.glob("*.tar.gz")) and "install offline with" in built

    copy = tmp_path / "project"
    tracked = subprocess.run(
        ["git", "-C", str(PROJECT_ROOT), "ls-files", "-co", "--exclude-standard"],
        capture_output=True,
        text=True,
        check=True,
        env=own_environment(),
    ).stdout.split()
    for name in tracked:
        source = PROJECT_ROOT / name
        if source.is_file():
            (copy / name).parent.mkdir(parents=True, exist_ok=True)
            (copy / name).write_bytes(source.read_bytes())
    installed = make(copy, "install", f"WHEELHOUSE={wheelhouse}")
    assert "install ok" in installed
    sources = set(re.findall(r"Looking in (?:links|indexes): (.*)", installed))
    assert sources == {str(wheelhouse)}, sources  # nothing but the wheelhouse was consulted
    versions = subprocess.run(
        [str(copy / ".venv/bin/python"), "-c", "import torch, transformers; print(torch.__version__)"],
        capture_output=True,
        text=True,
        check=True,
        env=own_environment(),
    ).stdout
    # TORCH_SPEC's torch (the build pip's sources gave), from the wheelhouse
    assert versions.startswith("2.13.0"), versions
