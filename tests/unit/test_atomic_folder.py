"""``atomic.staged_folder``: a folder is built in a sibling and appears whole, or not at all."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from globalcom2.atomic import atomic_write_text, process_umask, staged_folder


def test_a_successful_build_appears_whole_and_leaves_no_staging(tmp_path):
    target = tmp_path / "ckpt"
    with staged_folder(target) as staging:
        (staging / "weights").write_text("new")
        assert not target.exists()  # nothing visible while it is being built
    assert (target / "weights").read_text() == "new" and [p.name for p in tmp_path.iterdir()] == ["ckpt"]


def test_a_failed_build_leaves_the_old_folder_and_no_staging(tmp_path):
    target = tmp_path / "ckpt"
    target.mkdir()
    (target / "weights").write_text("old")
    with pytest.raises(RuntimeError), staged_folder(target) as staging:
        (staging / "weights").write_text("half")
        raise RuntimeError("interrupted")
    assert (target / "weights").read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["ckpt"]


def test_without_a_marker_a_rebuild_replaces_the_folder(tmp_path):
    target = tmp_path / "ckpt"
    target.mkdir()
    (target / "stale").write_text("old")
    with staged_folder(target) as staging:
        (staging / "weights").write_text("new")
    assert sorted(p.name for p in target.iterdir()) == ["weights"]
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]  # the old folder, set aside, is gone


def test_a_rebuild_never_deletes_the_old_folder_before_the_new_one_is_in_place(tmp_path, monkeypatch):
    """The old folder is moved aside, not deleted, until the new one is renamed in: a failure of that
    rename puts the old one back (it used to be deleted first, leaving nothing)."""
    target = tmp_path / "ckpt"
    target.mkdir()
    (target / "weights").write_text("old")
    real_rename = Path.rename

    def rename(self, destination):
        if Path(destination) == target and self.name.startswith(".ckpt.") and ".old." not in self.name:
            raise OSError("interrupted between the two renames (simulated)")
        return real_rename(self, destination)

    monkeypatch.setattr(Path, "rename", rename)
    with pytest.raises(OSError, match="simulated"), staged_folder(target) as staging:
        (staging / "weights").write_text("new")
    assert (target / "weights").read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["ckpt"]


def test_with_a_marker_a_complete_copy_built_meanwhile_wins(tmp_path):
    target = tmp_path / "ckpt"
    with staged_folder(target, complete_marker="config.json") as staging:
        (staging / "config.json").write_text("ours")
        target.mkdir()  # another process finishes the same build first
        (target / "config.json").write_text("theirs")
    assert (target / "config.json").read_text() == "theirs" and [p.name for p in tmp_path.iterdir()] == [
        "ckpt"
    ]


def test_with_a_marker_an_incomplete_folder_in_the_way_is_an_error(tmp_path):
    target = tmp_path / "ckpt"
    with pytest.raises(OSError), staged_folder(target, complete_marker="config.json") as staging:
        (staging / "config.json").write_text("ours")
        target.mkdir()
        (target / "partial").write_text("?")
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]


def test_files_and_folders_get_the_permissions_of_a_plain_write(tmp_path):
    """``mkstemp`` makes 0600 files and ``mkdtemp`` 0700 folders whatever the umask: records and datasets
    shared by a group on a cluster would be unreadable to it. Both now follow the umask as ``open`` and
    ``mkdir`` do."""
    old = os.umask(0o022)
    try:
        record = atomic_write_text(tmp_path / "record.json", "{}")
        with staged_folder(tmp_path / "dataset") as staging:
            (staging / "part").write_text("rows")
        plain = tmp_path / "plain.txt"
        plain.write_text("x")
        assert process_umask() == 0o022
    finally:
        os.umask(old)
    assert stat.S_IMODE(record.stat().st_mode) == stat.S_IMODE(plain.stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "dataset").stat().st_mode) == 0o755
