"""``atomic.staged_folder``: a folder is built in a sibling and appears whole, or not at all."""

from __future__ import annotations

import pytest

from globalcom2.atomic import staged_folder


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
