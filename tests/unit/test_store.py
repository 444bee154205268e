import json
import os
import subprocess
import sys

import pytest

from globalcom2.store import Cell, CellBusy, CellKey, atomic_write_json, ratio_label

KEY = CellKey("demo", "tiny", "random", 0.25, "demo_shapes")


def test_cell_path_is_derived_from_the_key(tmp_path):
    assert Cell(tmp_path, KEY).dir == tmp_path / "demo" / "tiny" / "random" / "r0.25" / "demo_shapes"
    assert [ratio_label(r) for r in (1, 0.1, 0.75)] == ["r1.0", "r0.1", "r0.75"]
    with pytest.raises(ValueError, match="invalid cell path component"):
        CellKey("demo", "../x", "random", 0.25, "b").relative_path()


def test_a_cell_is_finished_only_after_commit(tmp_path):
    cell = Cell(tmp_path, KEY)
    assert not cell.is_complete()
    partial = cell.prepare()
    (partial / "results.json").write_text("{}")
    assert not cell.is_complete()  # outputs without a record are not a result
    cell.commit({"metrics": {"acc": 0.5}})
    assert cell.is_complete() and cell.read_record()["metrics"] == {"acc": 0.5}
    assert (cell.dir / "results.json").exists() and not cell.partial_dir.exists()


def test_prepare_deletes_what_a_killed_run_left(tmp_path):
    cell = Cell(tmp_path, KEY)
    (cell.prepare() / "half_written.jsonl").write_text("{")
    (cell.dir / "stray.json").write_text("x")
    cell.prepare()
    assert sorted(p.name for p in cell.dir.iterdir()) == [".partial"]
    assert list(cell.partial_dir.iterdir()) == []


@pytest.mark.parametrize("content", ["", "{not json", json.dumps({"status": "running"}), "[1, 2]"])
def test_corrupt_or_unfinished_records_do_not_count(tmp_path, content):
    cell = Cell(tmp_path, KEY)
    cell.dir.mkdir(parents=True)
    cell.record_path.write_text(content)
    assert not cell.is_complete()


def test_lock_excludes_a_live_process_and_takes_over_a_dead_one(tmp_path):
    cell = Cell(tmp_path, KEY)
    with cell.lock(), pytest.raises(CellBusy, match="being run by another process"), cell.lock():
        pass
    assert not (cell.dir / ".lock").exists()
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    import socket

    (cell.dir / ".lock").write_text(json.dumps({"pid": int(dead.stdout), "host": socket.gethostname()}))
    with cell.lock():  # the owner is gone: stale
        assert json.loads((cell.dir / ".lock").read_text())["pid"] == os.getpid()


def test_atomic_write_never_leaves_a_partial_file(tmp_path, monkeypatch):
    target = tmp_path / "record.json"
    atomic_write_json(target, {"a": 1})

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="disk full"):
        atomic_write_json(target, {"a": 2})
    assert json.loads(target.read_text()) == {"a": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["record.json"]
