"""Every key of ``configs/paths`` is read somewhere: an override that silently does nothing is a bug.

A key counts as read when the harness code names it (``paths.<key>``) or another config interpolates it
(``${paths.<key>}``, or ``${.<key>}`` inside the group's own file).
"""

from __future__ import annotations

import re

import pytest
import yaml

from globalcom2.paths import PROJECT_ROOT

PATHS = PROJECT_ROOT / "configs" / "paths" / "default.yaml"


def _sources() -> str:
    files = [
        *PROJECT_ROOT.joinpath("globalcom2").rglob("*.py"),
        *PROJECT_ROOT.joinpath("configs").rglob("*.yaml"),
    ]
    return "\n".join(f.read_text(encoding="utf-8") for f in files if f != PATHS)


@pytest.mark.parametrize("key", sorted(yaml.safe_load(PATHS.read_text())))
def test_every_paths_key_is_read(key):
    own = PATHS.read_text(encoding="utf-8")
    read = re.search(rf"\bpaths\.{key}\b", _sources()) or f"${{.{key}}}" in own
    assert read, (
        f"paths.{key} in {PATHS.name} is never read: wire it (globalcom2/run.py export_paths) or remove it"
    )


def test_data_and_tasks_dir_reach_the_processes_of_a_cell(monkeypatch, tmp_path):
    from omegaconf import OmegaConf

    from globalcom2 import paths
    from globalcom2.run import export_paths

    (tmp_path / "tasks").mkdir()
    cfg = OmegaConf.create({"paths": {"data_dir": str(tmp_path / "d"), "tasks_dir": str(tmp_path / "tasks")}})
    monkeypatch.setenv(paths.DATA_DIR_ENV, "unset")  # recorded, so the test's export is undone afterwards
    monkeypatch.setenv(paths.TASKS_DIR_ENV, "unset")
    export_paths(cfg)
    assert paths.data_dir() == tmp_path / "d" and paths.tasks_dir() == tmp_path / "tasks"
