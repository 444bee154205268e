"""Every key of the Hydra configs is read: an override that silently does nothing is a bug.

Each config group has the module(s) that read it (:data:`READERS`). A key of a group's files counts as read
when its reader names it (``["key"]``, ``.get("key"``, or ``.key``). ``configs/paths`` keys may instead be
interpolated by another config (``${paths.<key>}``, or ``${.<key>}`` inside the group's own file).
"""

from __future__ import annotations

import re

import pytest
import yaml

from globalcom2.paths import PROJECT_ROOT

PATHS = PROJECT_ROOT / "configs" / "paths" / "default.yaml"
CONFIGS = PROJECT_ROOT / "configs"
#: Which modules read each group (``None``: the primary config's own keys). ``paths`` is checked below.
READERS = {
    "model": ["globalcom2/cells.py"],
    "method": ["globalcom2/cells.py"],
    "benchmark": ["globalcom2/cells.py"],
    "launcher": ["globalcom2/cells.py"],
    "logger": ["globalcom2/run.py", "globalcom2/tracking.py"],
    None: ["globalcom2/run.py", "globalcom2/cells.py"],
}
#: Keys Hydra itself reads (the Slurm launcher file overrides ``hydra.launcher``), and the defaults list.
HYDRA_KEYS = {"defaults", "hydra"}


def group_keys() -> list[tuple[str | None, str, str]]:
    """``(group, file, key)`` for every top-level key of every file of a group in :data:`READERS`."""
    found = []
    for group in READERS:
        files = [CONFIGS / "eval.yaml"] if group is None else sorted((CONFIGS / group).glob("*.yaml"))
        for path in files:
            for key in yaml.safe_load(path.read_text()) or {}:
                if key not in HYDRA_KEYS:
                    found.append((group, path.name, key))
    return found


def is_read(key: str, source: str) -> bool:
    return bool(re.search(rf"""\[["']{key}["']\]|\.get\(["']{key}["']|\.{key}\b""", source))


@pytest.mark.parametrize(("group", "file", "key"), group_keys())
def test_every_group_key_is_read_by_its_reader(group, file, key):
    source = "\n".join((PROJECT_ROOT / module).read_text(encoding="utf-8") for module in READERS[group])
    assert is_read(key, source), f"{group or 'eval'}/{file}: key {key!r} is never read by {READERS[group]}"


def test_an_unread_key_is_caught():
    """The check above can fail: a key its reader never names is reported."""
    source = 'name = cfg["name"]; tasks = cfg.get("tasks"); dtype = cfg.dtype'
    assert is_read("name", source) and is_read("tasks", source) and is_read("dtype", source)
    assert not is_read("data_dir", source) and not is_read("limit", 'lite = cfg["limited"]')


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
