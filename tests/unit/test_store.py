import json
import os
import shutil
import subprocess
import sys
import textwrap
import time

import pytest

from globalcom2 import store
from globalcom2.atomic import atomic_write_json
from globalcom2.records import (
    RECORD_SCHEMA,
    CellKey,
    CellRecord,
    CellRef,
    RecordError,
    ratio_label,
    read_record,
)
from globalcom2.store import Cell, CellBusy, cell_id, current_cell_id, identity_diff

KEY = CellKey("demo", "tiny", "random", 0.25, "demo_shapes")
IDENTITY = {"seed": 0, "benchmark": {"limit": 20}, "method": {"params": {"seed": 0}}}


def record_for(cell: Cell, **outcome) -> CellRecord:
    """A minimal finished record of ``cell``."""
    ref = CellRef(**vars(cell.key), id=cell.id, identity=cell.identity, path=str(cell.dir))
    return CellRecord(cell=ref, spec={"seed": 0}, **outcome)


def finished(root, identity=IDENTITY, **outcome):
    cell = Cell(root, KEY, identity)
    with cell.lock():
        cell.prepare()
        cell.commit(record_for(cell, **outcome))
    return cell


def test_cell_path_is_the_key_then_the_identity_hash(tmp_path):
    cell = Cell(tmp_path, KEY, IDENTITY)
    assert cell.dir == tmp_path / "demo" / "tiny" / "random" / "r0.25" / "demo_shapes" / cell.id
    assert len(cell.id) == 12 and cell.id == cell_id(json.loads(json.dumps(IDENTITY)))
    assert [ratio_label(r) for r in (1, 0.1, 0.75)] == ["r1.0", "r0.1", "r0.75"]
    with pytest.raises(ValueError, match="invalid cell path component"):
        CellKey("demo", "../x", "random", 0.25, "b").relative_path()


@pytest.mark.parametrize(
    "changed",
    [
        {"seed": 1, "benchmark": {"limit": 20}, "method": {"params": {"seed": 0}}},
        {"seed": 0, "benchmark": {"limit": None}, "method": {"params": {"seed": 0}}},
        {"seed": 0, "benchmark": {"limit": 20}, "method": {"params": {"seed": 0, "alpha": 0.1}}},
    ],
)
def test_a_changed_identity_is_another_cell_and_never_reuses_a_finished_one(tmp_path, changed):
    old = finished(tmp_path, metrics={"demo": {"acc": 0.5}})
    new = Cell(tmp_path, KEY, changed)
    assert new.dir != old.dir and old.is_complete() and not new.is_complete()
    assert [path for path, _ in new.siblings()] == [old.dir]
    assert identity_diff(old.identity, changed)  # the reason a run would print


def test_identity_hash_ignores_key_order():
    assert cell_id({"a": 1, "b": {"c": 2, "d": 3}}) == cell_id({"b": {"d": 3, "c": 2}, "a": 1})


def test_identity_diff_names_each_changed_setting():
    old = {"benchmark": {"limit": 20}, "method": {"params": {"alpha": 0.5}}, "seed": 0}
    new = {"benchmark": {"limit": None}, "method": {"params": {"alpha": 0.1}}, "seed": 0, "extra": "x"}
    assert identity_diff(old, new) == [
        "benchmark.limit: 20 -> null",
        'extra: (absent) -> "x"',
        "method.params.alpha: 0.5 -> 0.1",
    ]


def test_a_cell_is_finished_only_after_commit_and_then_becomes_current(tmp_path):
    cell = Cell(tmp_path, KEY, IDENTITY)
    assert not cell.is_complete()
    with cell.lock():
        partial = cell.prepare()
        (partial / "results.json").write_text("{}")
        assert not cell.is_complete()  # outputs without a record are not a result
        cell.commit(record_for(cell, metrics={"demo": {"acc": 0.5}}))
    assert cell.is_complete() and cell.read_record().metrics == {"demo": {"acc": 0.5}}
    assert (cell.dir / "results.json").exists() and not cell.partial_dir.exists()
    assert current_cell_id(cell.key_dir) == cell.id


def test_a_record_written_for_another_identity_does_not_count(tmp_path):
    cell = Cell(tmp_path, KEY, IDENTITY)
    other = Cell(tmp_path, KEY, {"seed": 1})
    atomic_write_json(cell.record_path, record_for(other).to_dict())  # complete, for another identity
    with pytest.raises(RecordError, match=f"written for cell {other.id}"):
        cell.is_complete()


def test_a_killed_forced_run_over_a_rejected_record_keeps_it(tmp_path):
    """force=true replaces a record the reader rejects at commit, not when the run starts: a run killed in
    between (here: prepared, never committed) leaves the newer checkout's cell as it was."""
    cell = Cell(tmp_path, KEY, IDENTITY)
    newer = {**record_for(cell).to_dict(), "schema": RECORD_SCHEMA + 1}
    atomic_write_json(cell.record_path, newer)
    (cell.dir / "results.json").write_text("theirs")
    with cell.lock():
        (cell.prepare() / "results.json").write_text("ours, half done")
    assert json.loads(cell.record_path.read_text()) == newer
    assert (cell.dir / "results.json").read_text() == "theirs"
    with cell.lock():
        partial = cell.prepare()
        (partial / "results.json").write_text("ours")
        cell.commit(record_for(cell))
    assert cell.is_complete() and (cell.dir / "results.json").read_text() == "ours"


def test_prepare_deletes_what_a_killed_run_left(tmp_path):
    cell = Cell(tmp_path, KEY, IDENTITY)
    with cell.lock():
        (cell.prepare() / "half_written.jsonl").write_text("{")
        (cell.dir / "stray.json").write_text("x")
        cell.prepare()
        assert sorted(p.name for p in cell.dir.iterdir()) == [".lock", ".partial"]
    assert list(cell.partial_dir.iterdir()) == []


def test_the_answers_journal_outlives_a_failed_or_killed_run_and_goes_with_force_or_the_commit(tmp_path):
    cell = Cell(tmp_path, KEY, IDENTITY)
    with cell.lock():
        cell.prepare()
        cell.answers_dir.mkdir()
        (cell.answers_dir / "rank0.jsonl").write_text("answers so far\n")
        cell.discard_partial()  # a run that failed
        assert not cell.partial_dir.exists() and cell.answers_dir.is_dir()
        cell.prepare()  # the next run resumes from it
        assert sorted(p.name for p in cell.dir.iterdir()) == [".answers", ".lock", ".partial"]
        cell.prepare(keep_answers=False)  # force=true: everything again
        assert sorted(p.name for p in cell.dir.iterdir()) == [".lock", ".partial"]
        cell.answers_dir.mkdir()
        (cell.answers_dir / "rank0.jsonl").write_text("answers\n")
        (cell.partial_dir / "results.json").write_text("{}")
        cell.commit(record_for(cell))  # finished: its answers are in the outputs now
    assert cell.is_complete() and not cell.answers_dir.exists()
    assert sorted(p.name for p in cell.dir.iterdir()) == ["record.json", "results.json"]


def _run_outputs(cell: Cell, tag: str) -> None:
    partial = cell.prepare()
    (partial / "results.json").write_text(tag)
    (partial / "samples").mkdir()
    (partial / "samples" / "task.jsonl").write_text(tag)


def _state(cell: Cell) -> tuple[dict | None, dict[str, str]]:
    record = cell.read_record()
    files = {
        str(p.relative_to(cell.dir)): p.read_text()
        for p in sorted(cell.dir.rglob("*"))
        if p.is_file() and p.name not in ("record.json", ".lock")
    }
    return (record.metrics if record else None), files


def _commit_killed_at(cell: Cell, record: CellRecord, kills: int, monkeypatch) -> bool:
    """``cell.commit(record)``, killed (``KeyboardInterrupt``) at its rename number ``kills``; whether it
    finished before that."""
    real_replace, calls = os.replace, 0

    def replace_then_die(src, dst):
        nonlocal calls
        if calls == kills:
            raise KeyboardInterrupt("killed")
        calls += 1
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace_then_die)
    try:
        cell.commit(record)
        return True
    except KeyboardInterrupt:
        return False
    finally:
        monkeypatch.setattr(os, "replace", real_replace)


def test_a_force_rerun_killed_anywhere_in_its_commit_loses_nothing(tmp_path, monkeypatch):
    """``force=true`` over a finished cell, killed at each rename of the commit in turn: the next run's
    ``prepare`` finds the old cell whole (its record and its files, never the new files beside the old
    record), or, once the new record is written, the new cell whole."""
    kills = 0
    while True:
        root = tmp_path / str(kills)
        cell = Cell(root, KEY, IDENTITY)
        with cell.lock():
            _run_outputs(cell, "old")
            cell.commit(record_for(cell, metrics={"demo": {"acc": 0.1}}))
        old = _state(cell)
        with cell.lock():
            _run_outputs(cell, "new")
            finished = _commit_killed_at(
                cell, record_for(cell, metrics={"demo": {"acc": 0.9}}), kills, monkeypatch
            )
        with cell.lock():
            cell.prepare()  # the next run (force=true again, or a resume) starts here
            after = _state(cell)
        expected_new = ({"demo": {"acc": 0.9}}, {"results.json": "new", "samples/task.jsonl": "new"})
        if after[0] == {"demo": {"acc": 0.9}}:
            assert after == expected_new, f"killed after rename {kills}"
        else:
            assert after == old, f"killed after rename {kills}: the old cell is not whole"
        assert not any(p.name.startswith(".previous") for p in cell.dir.iterdir())
        if finished:
            break
        kills += 1
    assert kills >= 5  # record aside, two files aside, the folder renamed, new files in, the new record


def test_a_first_commit_killed_anywhere_keeps_the_answers_journal_until_the_record_is_written(
    tmp_path, monkeypatch
):
    """The commit moves the journal aside with the other old entries: a kill before the record is written
    leaves it for the next run to resume from; once the record is written it is gone."""
    kills = 0
    while True:
        cell = Cell(tmp_path / str(kills), KEY, IDENTITY)
        with cell.lock():
            _run_outputs(cell, "new")
            cell.answers_dir.mkdir()
            (cell.answers_dir / "rank0.jsonl").write_text("journal\n")
            finished = _commit_killed_at(cell, record_for(cell), kills, monkeypatch)
        with cell.lock():
            cell.prepare()  # the next run starts here
            if cell.read_record() is not None:
                assert not cell.answers_dir.exists(), f"killed after rename {kills}"
            else:
                assert (cell.answers_dir / "rank0.jsonl").read_text() == "journal\n", f"killed after {kills}"
        if finished:
            break
        kills += 1
    assert kills >= 3  # the journal aside, the folder renamed, the new files in, the record


def test_recovering_a_killed_commit_can_itself_be_killed_anywhere_and_repeated(tmp_path, monkeypatch):
    """The next run's recovery of a half-done commit is killed at each of its renames in turn; the run after
    it still finds the old cell whole (recovery deleted files it had already put back when repeated)."""
    real_replace, recovery_kills = os.replace, 0
    while True:
        cell = Cell(tmp_path / str(recovery_kills), KEY, IDENTITY)
        with cell.lock():
            _run_outputs(cell, "old")
            cell.commit(record_for(cell, metrics={"demo": {"acc": 0.1}}))
        old = _state(cell)
        plan = {"calls": 0, "limit": 5}  # the commit dies after its 5th rename: old files aside, one new in

        def replace_then_die(src, dst, plan=plan):
            if plan["calls"] == plan["limit"]:
                raise KeyboardInterrupt("killed")
            plan["calls"] += 1
            return real_replace(src, dst)

        with cell.lock():
            _run_outputs(cell, "new")
            monkeypatch.setattr(os, "replace", replace_then_die)
            with pytest.raises(KeyboardInterrupt):
                cell.commit(record_for(cell, metrics={"demo": {"acc": 0.9}}))
            plan.update(calls=0, limit=recovery_kills)  # now the recovery dies after this many renames
            try:
                cell.recover()
                recovered = True
            except KeyboardInterrupt:
                recovered = False
            finally:
                monkeypatch.setattr(os, "replace", real_replace)
            cell.prepare()  # the run after
            assert _state(cell) == old, f"recovery killed after rename {recovery_kills}"
        if recovered:
            break
        recovery_kills += 1
    assert recovery_kills >= 3  # the folder renamed back, the old files, the record


def test_a_commit_that_fails_puts_the_finished_cell_back_at_once(tmp_path, monkeypatch):
    """A full disk while the new record is written: the old cell is whole again before the error surfaces."""
    import globalcom2.store as store

    cell = finished(tmp_path, metrics={"demo": {"acc": 0.1}})
    old = _state(cell)
    with cell.lock():
        _run_outputs(cell, "new")

        def full_disk(*args, **kwargs):
            raise OSError(28, "No space left on device")

        monkeypatch.setattr(store, "write_record", full_disk)
        with pytest.raises(OSError, match="No space left"):
            cell.commit(record_for(cell, metrics={"demo": {"acc": 0.9}}))
    assert _state(cell) == old


@pytest.mark.parametrize("content", ["", "{not json", json.dumps({"status": "running"}), "[1, 2]"])
def test_corrupt_or_unfinished_records_do_not_count(tmp_path, content):
    cell = Cell(tmp_path, KEY, IDENTITY)
    cell.dir.mkdir(parents=True)
    cell.record_path.write_text(content)
    with pytest.raises(RecordError):  # never "not run yet", which would delete it
        cell.is_complete()


def test_the_lock_excludes_a_second_holder_and_is_gone_after_release(tmp_path):
    cell = Cell(tmp_path, KEY, IDENTITY)
    with (
        cell.lock(),
        pytest.raises(CellBusy, match=f"pid {os.getpid()}"),
        Cell(tmp_path, KEY, IDENTITY).lock(),
    ):
        pass
    assert not (cell.dir / ".lock").exists()
    with cell.lock():  # free again
        pass


HOLD = textwrap.dedent(
    """
    import sys, time
    from globalcom2.records import CellKey
    from globalcom2.store import Cell
    cell = Cell(sys.argv[1], CellKey("demo", "tiny", "random", 0.25, "demo_shapes"), {"seed": 0})
    with cell.lock():
        print("locked", flush=True)
        time.sleep(600)
    """
)


def test_a_killed_holder_never_leaves_a_stale_lock(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        cell = Cell(tmp_path, KEY, {"seed": 0})
        with pytest.raises(CellBusy, match=f"pid {holder.pid}"), cell.lock():
            pass
        holder.kill()  # SIGKILL: no cleanup code runs, the kernel drops the flock
        holder.wait()
        with cell.lock():
            assert json.loads((cell.dir / ".lock").read_text())["pid"] == os.getpid()
    finally:
        holder.kill()
        holder.wait()


STRAY_RANK = textwrap.dedent(
    """
    import sys, time
    from globalcom2.store import hold_worker_lock
    hold_worker_lock(sys.argv[1])
    print("holding", flush=True)
    time.sleep(600)
    """
)


def test_a_workers_lock_another_user_created_is_used_read_only(tmp_path, monkeypatch):
    """``.workers.lock`` is never deleted, so its creator's umask may leave it unwritable to the group: ranks
    lock it shared and runners test it through a read-only descriptor instead of failing."""
    cell = Cell(tmp_path, KEY, {"seed": 0})
    with cell.lock():
        partial = cell.prepare()
    (cell.dir / ".workers.lock").write_text("")
    (cell.dir / ".workers.lock").chmod(0o444)
    real_open = os.open
    opened = []

    def as_another_user(path, flags, *args):  # tests may run as root, who may write any file
        if str(path).endswith(".workers.lock"):
            opened.append(flags & (os.O_RDWR | os.O_WRONLY))
            if flags & (os.O_RDWR | os.O_WRONLY):
                raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, flags, *args)

    monkeypatch.setattr(os, "open", as_another_user)
    with cell.lock():
        pass
    store.hold_worker_lock(partial)
    try:
        with pytest.raises(store.WorkersAlive), cell.lock():  # this process now holds it shared
            pass
    finally:
        os.close(store._worker_lock_fd)
        store._worker_lock_fd = None
    assert opened and opened[-1] == 0


def test_a_rank_that_outlived_its_runner_keeps_the_cell_busy_until_it_is_gone(tmp_path):
    """torchrun and accelerate start ranks in sessions of their own, without the runner's lock descriptor: a
    rank still alive after its runner is gone holds ``.workers.lock``, and no new runner takes the cell."""
    cell = Cell(tmp_path, KEY, {"seed": 0})
    with cell.lock():  # the runner, its group launched into .partial/
        partial = cell.prepare()
        rank = subprocess.Popen(
            [sys.executable, "-c", STRAY_RANK, str(partial)], stdout=subprocess.PIPE, text=True
        )
    try:
        assert rank.stdout.readline().strip() == "holding"
        stray = "a worker process of an earlier run of this cell is still alive"
        with pytest.raises(CellBusy, match=stray), cell.lock():
            pass
        assert not (cell.dir / ".lock").exists()  # the refused runner left no lock behind
        rank.kill()
        rank.wait()
        with cell.lock():
            cell.prepare()  # the store's own files survive a clean-up
            assert sorted(p.name for p in cell.dir.iterdir()) == [".lock", ".partial", ".workers.lock"]
    finally:
        rank.kill()
        rank.wait()


RACE = textwrap.dedent(
    """
    import sys, time
    from globalcom2.records import CellKey, CellRecord, CellRef
    from globalcom2.store import Cell, CellBusy
    cell = Cell(sys.argv[1], CellKey("demo", "tiny", "random", 0.25, "demo_shapes"), {"seed": 0})
    ref = CellRef(**vars(cell.key), id=cell.id, identity=cell.identity, path=str(cell.dir))
    start = float(sys.argv[2])
    time.sleep(max(0.0, start - time.time()))
    runs = 0
    for _ in range(200):
        try:
            with cell.lock():
                if not cell.is_complete():
                    cell.prepare()
                    time.sleep(0.05)
                    cell.commit(CellRecord(cell=ref, spec={}, run={"runner": sys.argv[3]}))
                    runs += 1
                break
        except CellBusy:
            time.sleep(0.01)
    print(runs)
    """
)


@pytest.mark.slow
def test_concurrent_runners_run_a_cell_exactly_once(tmp_path):
    start = time.time() + 1.0
    runners = [
        subprocess.Popen(
            [sys.executable, "-c", RACE, str(tmp_path), str(start), str(i)], stdout=subprocess.PIPE, text=True
        )
        for i in range(4)
    ]
    runs = [int(r.communicate(timeout=120)[0].strip()) for r in runners]
    assert sorted(runs) == [0, 0, 0, 1]
    cell = Cell(tmp_path, KEY, {"seed": 0})
    assert cell.is_complete() and not (cell.dir / ".lock").exists()


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


def test_a_record_round_trips_through_the_one_reader(tmp_path):
    cell = Cell(tmp_path, KEY, IDENTITY)
    record = record_for(cell, metrics={"demo": {"acc": 0.5}}, efficiency={"kv_cache_mb": 1.0})
    with cell.lock():
        cell.prepare()
        cell.commit(record)
    assert read_record(cell.record_path) == record
    assert json.loads(cell.record_path.read_text())["schema"] == RECORD_SCHEMA


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda r: r["cell"].pop("id"), "schema 1"),
        (lambda r: r.update(schema=RECORD_SCHEMA + 1), "re-run the cell"),
        (lambda r: r.update(metrics="0.5"), "metrics is '0.5', not a mapping"),
        (lambda r: r.update(surprise=1), "surprise"),
        (lambda r: r.update(status="running"), "not complete"),
        # a damaged or hand-made record: its defaults would table as empty cells without a word
        (lambda r: r.pop("schema"), "schema None"),
        (lambda r: r.pop("metrics"), "it lacks metrics"),
        (lambda r: r.pop("efficiency"), "it lacks efficiency"),
        (lambda r: r.update(metrics={"demo": {"acc": "0.9"}}), "metrics.demo.acc is '0.9', not a number"),
        (lambda r: r.update(metrics={"demo": {"acc": True}}), "metrics.demo.acc is True, not a number"),
        (lambda r: r["cell"].update(retention_ratio="0.25"), "retention_ratio is '0.25', not a number"),
        (lambda r: r["cell"].update(identity={}), "cell.identity is {}"),
        # settings edited after the run: the record would claim a cell it is not
        (lambda r: r["cell"]["identity"].update(seed=1), "hashes to .* not to its cell id"),
    ],
)
def test_an_unusable_record_fails_with_what_to_do(tmp_path, change, message):
    cell = Cell(tmp_path, KEY, IDENTITY)
    data = record_for(cell).to_dict()
    change(data)
    atomic_write_json(cell.record_path, data)
    with pytest.raises(RecordError, match=message):
        Cell.finished_record(cell.dir)
    with pytest.raises(RecordError, match=message):
        cell.is_complete()


def test_a_record_in_another_cells_folder_is_not_finished(tmp_path):
    cell = Cell(tmp_path, KEY, IDENTITY)
    other = Cell(tmp_path, KEY, {"seed": 1})
    atomic_write_json(other.record_path, record_for(cell).to_dict())  # copied from the first cell
    with pytest.raises(RecordError, match="written for cell"):
        Cell.finished_record(other.dir)


def test_a_cell_folder_copied_to_another_key_is_not_finished_there(tmp_path):
    """``cp -r results/exp results/exp_old``: the copy's records name ``exp``, so they count under neither
    key there (the report could not table them), while a whole results root copied elsewhere still counts."""
    cell = finished(tmp_path / "results", metrics={"demo": {"acc": 0.5}})
    shutil.copytree(tmp_path / "results" / "demo", tmp_path / "results" / "demo_old")
    moved = Cell(
        tmp_path / "results",
        CellKey("demo_old", *KEY.relative_path().parts[1:3], 0.25, "demo_shapes"),
        IDENTITY,
    )
    assert moved.id == cell.id and moved.dir.is_dir()
    with pytest.raises(
        RecordError, match=r"belongs to demo/tiny/random/r0\.25/demo_shapes, not to this folder"
    ):
        moved.is_complete()
    shutil.copytree(tmp_path / "results", tmp_path / "elsewhere")
    assert Cell(tmp_path / "elsewhere", KEY, IDENTITY).is_complete()


def test_the_lock_file_follows_the_umask_and_an_unwritable_one_fails_naming_its_owner(tmp_path, monkeypatch):
    cell = Cell(tmp_path, KEY, IDENTITY)
    previous = os.umask(0o002)  # a group sharing a results folder
    try:
        with cell.lock():
            mode = (cell.dir / ".lock").stat().st_mode & 0o777
    finally:
        os.umask(previous)
    assert mode == 0o664
    (cell.dir / ".lock").write_text("{}")  # left by another user, not writable by this one
    (cell.dir / ".lock").chmod(0o444)
    real_open = os.open

    def open_as_another_user(path, flags, *args):  # tests may run as root, who opens any file
        if str(path).endswith(".lock") and flags & os.O_RDWR:
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, flags, *args)

    monkeypatch.setattr(os, "open", open_as_another_user)
    lock_message = r"cannot open the lock file .*\.lock .*mode -r--r--r--"
    with pytest.raises(PermissionError, match=lock_message), cell.lock():
        pass
