"""Every key of the Hydra configs is read: an override that silently does nothing is a bug.

Each config group has its reader: the module and the name it reads the group through (:data:`READERS`). A
key of a group's files counts as read when the reader reads it from that object (``model_cfg["key"]``,
``model_cfg.get("key"``, ``cfg.logger.key``); a ``# @package _global_`` file's keys under the group's own
name (``launcher/slurm.yaml``) count as the group's. ``configs/paths`` keys may instead be interpolated by
another config (``${paths.<key>}``, or ``${.<key>}`` inside the group's own file). The training recipe's
nested keys (``configs/train``) are checked more loosely, as names its module reads (``.key`` or
``"key"``); its command line refuses unknown keys besides.
"""

from __future__ import annotations

import re
from typing import Any

import pytest
import yaml

from globalcom2.paths import PROJECT_ROOT

PATHS = PROJECT_ROOT / "configs" / "paths" / "default.yaml"
CONFIGS = PROJECT_ROOT / "configs"
#: Group -> (module, the expression it reads the group through); ``None``: the primary config's own keys.
READERS: dict[str | None, list[tuple[str, str]]] = {
    "model": [("globalcom2/cells.py", "model_cfg")],
    "method": [("globalcom2/cells.py", "method_cfg")],
    "benchmark": [("globalcom2/cells.py", "bench_cfg")],
    "launcher": [("globalcom2/cells.py", "launcher_cfg")],
    "logger": [("globalcom2/run.py", "cfg.logger"), ("globalcom2/tracking.py", "logger")],
    None: [("globalcom2/run.py", "cfg"), ("globalcom2/cells.py", "plain")],
}
TRAIN_READERS = ["globalcom2/training/train_tiny.py"]
#: Keys Hydra itself reads (the Slurm launcher file overrides ``hydra.launcher``), and the defaults list.
HYDRA_KEYS = {"defaults", "hydra"}


def group_keys() -> list[tuple[str | None, str, str]]:
    """``(group, file, key)`` for every key of every file of a group in :data:`READERS`."""
    found = []
    for group in READERS:
        files = [CONFIGS / "eval.yaml"] if group is None else sorted((CONFIGS / group).glob("*.yaml"))
        for path in files:
            text = path.read_text()
            content = yaml.safe_load(text) or {}
            if group is not None and text.startswith("# @package _global_"):
                content = content.get(group, {})
            found += [(group, path.name, key) for key in content if key not in HYDRA_KEYS]
    return found


def is_read(key: str, accessor: str, source: str) -> bool:
    """Whether ``source`` reads ``key`` from the object ``accessor`` names."""
    obj = re.escape(accessor)
    return bool(re.search(rf"""(?<![\w.]){obj}(\[["']{key}["']\]|\.get\(["']{key}["']|\.{key}\b)""", source))


@pytest.mark.parametrize(("group", "file", "key"), group_keys())
def test_every_group_key_is_read_by_its_reader(group, file, key):
    readers = READERS[group]
    read = any(is_read(key, accessor, (PROJECT_ROOT / module).read_text()) for module, accessor in readers)
    assert read, f"{group or 'eval'}/{file}: key {key!r} is never read by {readers}"


def test_an_unread_key_is_caught():
    """The check above can fail: a key read from another object, or not at all, is reported."""
    source = (
        'name = model_cfg["name"]; tasks = bench_cfg.get("tasks"); x = cfg.logger.dir; y = other_cfg.dtype'
    )
    assert is_read("name", "model_cfg", source) and is_read("tasks", "bench_cfg", source)
    assert is_read("dir", "cfg.logger", source) and not is_read("dir", "logger", 'print("cfg.logger.dir")')
    assert not is_read("dtype", "model_cfg", source) and not is_read("dtype", "cfg", source)
    assert not is_read("limit", "bench_cfg", 'lite = bench_cfg["limited"]')


def leaf_keys(tree: dict[str, Any], prefix: str = "") -> list[str]:
    keys = []
    for key, value in tree.items():
        keys += leaf_keys(value, f"{prefix}{key}.") if isinstance(value, dict) else [f"{prefix}{key}"]
    return keys


@pytest.mark.parametrize("path", sorted((CONFIGS / "train").glob("*.yaml")), ids=lambda p: p.name)
def test_every_training_recipe_key_is_read(path):
    source = "\n".join((PROJECT_ROOT / module).read_text() for module in TRAIN_READERS)
    unread = [
        dotted
        for dotted in leaf_keys(yaml.safe_load(path.read_text()))
        for key in [dotted.rpartition(".")[2]]
        if not re.search(rf"""\.{key}\b|["']{key}["']""", source)
    ]
    assert not unread, f"configs/train/{path.name}: {unread} never read by {TRAIN_READERS}"


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
