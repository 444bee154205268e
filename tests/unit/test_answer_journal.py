"""The answers journal: what it keeps, what it refuses, and a write cut by a kill."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap

import pytest

from globalcom2.answer_journal import (
    SETTINGS_FILE,
    AnswerJournal,
    JournalInUseError,
    StaleJournalError,
    code_digest,
    rank_file,
    row_key,
    window_digest,
)
from globalcom2.sample_records import SampleRecord

SETTINGS = {"method": "random", "method_params": {"retention_ratio": 0.25}, "batch_size": 2, "window": 8}


def record(doc_id: int, batch_id: int = 0, answer: str = "yes") -> SampleRecord:
    return SampleRecord(
        task="toy", split="test", doc_id=doc_id, rank=0, batch_id=batch_id, batch_size=2, method="random",
        method_params={}, attn_implementation="sdpa", num_images=1, image_sizes=[[336, 336]], prompt_tokens=9,
        llm_prompt_tokens=9, visual_tokens_before=4, visual_tokens_llm_input=1, visual_tokens_after=1.0,
        output_tokens=1, output_token_ids=[7], answer=answer, empty_answer=False, stop_reason="eos",
        preprocess_s=0.1, prefill_s=None, total_s=None, peak_memory_bytes=None, peak_memory_note=None,
        clock=None, scored_answer=answer,
    )  # fmt: skip


def key(doc_id: int, context: str = "Is there a cat?"):
    return row_key("toy", "test", doc_id, 0, context, {"max_new_tokens": 3})


WINDOW = window_digest([key(i) for i in range(5)])  # the requests the test batches were planned among


def test_a_batch_written_by_one_process_is_read_back_by_the_next(tmp_path):
    journal = AnswerJournal(tmp_path, 0, SETTINGS)
    assert journal.batches == {} and journal.next_batch_id == 0
    journal.append([key(0), key(1)], WINDOW, [record(0, 4), record(1, 4, "no")])
    assert AnswerJournal(tmp_path, 1, SETTINGS).batches == {}  # a rank reads its own file: its requests
    journal.close()  # the first run ends
    again = AnswerJournal(tmp_path, 0, SETTINGS)
    (batch,) = again.batches.values()
    assert batch.rows == (key(0), key(1))
    replayed = batch.sample_records()
    assert [r.answer for r in replayed] == ["yes", "no"] and all(r.replayed for r in replayed)
    assert replayed[0] == SampleRecord.from_dict({**record(0, 4).to_dict(), "replayed": True})
    assert again.next_batch_id == 5  # new calls never share a (rank, batch id) with the earlier run's


def test_a_key_names_the_request_and_what_it_asks():
    assert key(0) == key(0) and key(0) != key(1)
    assert key(0) != key(0, context="Is there a dog?")  # an edited prompt is never answered from the journal
    assert row_key("toy", "test", 0, 0, "q", {"max_new_tokens": 3}) != row_key(
        "toy", "test", 0, 0, "q", {"max_new_tokens": 4}
    )


def test_a_folder_written_under_other_settings_is_refused_naming_what_differs(tmp_path):
    AnswerJournal(tmp_path, 0, SETTINGS).append([key(0)], WINDOW, [record(0)])
    AnswerJournal(tmp_path, 0, dict(SETTINGS))  # the same settings: accepted
    with pytest.raises(StaleJournalError, match=r"other settings \(batch_size: 2 -> 4\); delete the folder"):
        AnswerJournal(tmp_path, 0, {**SETTINGS, "batch_size": 4})
    (tmp_path / SETTINGS_FILE).write_text("{not json")
    with pytest.raises(StaleJournalError, match=f"unreadable {SETTINGS_FILE}"):
        AnswerJournal(tmp_path, 0, SETTINGS)
    (tmp_path / SETTINGS_FILE).unlink()  # answers whose settings nobody can tell
    with pytest.raises(StaleJournalError, match=f"answers without their {SETTINGS_FILE}"):
        AnswerJournal(tmp_path, 0, SETTINGS)
    assert rank_file(tmp_path, 0).exists()  # refused, never deleted: the folder is the caller's


def test_a_folder_its_owner_lets_go_is_emptied_of_stale_answers(tmp_path):
    AnswerJournal(tmp_path, 0, SETTINGS).append([key(0)], WINDOW, [record(0)])
    AnswerJournal(tmp_path, 1, SETTINGS).append([key(1)], WINDOW, [record(1)])
    changed = {**SETTINGS, "code": "another"}
    journal = AnswerJournal(tmp_path, 1, changed, discard_stale=True)
    assert journal.batches == {} and "other settings (code: None -> 'another')" in journal.discarded
    assert not rank_file(tmp_path, 0).exists() and not rank_file(tmp_path, 1).exists()
    assert AnswerJournal(tmp_path, 0, changed).discarded is None  # another rank now finds its settings


def test_the_code_digest_follows_every_source_file(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "a.py").write_text("x = 1\n")
    (tmp_path / "sub" / "b.py").write_text("y = 2\n")
    first = code_digest(tmp_path)
    (tmp_path / "sub" / "b.py").write_text("y = 3\n")
    assert code_digest(tmp_path) != first and len(first) == 16


def test_a_line_cut_by_a_kill_is_ignored_and_cut_off_before_the_next_append(tmp_path):
    journal = AnswerJournal(tmp_path, 0, SETTINGS)
    journal.append([key(0)], WINDOW, [record(0)])
    whole = rank_file(tmp_path, 0).read_bytes()
    with open(rank_file(tmp_path, 0), "ab") as handle:
        handle.write(b'{"rows": [["toy", "te')  # the kill came mid-write
    del journal  # and the kernel closed its files (a killed writer: see the test below)
    AnswerJournal(tmp_path, 1, SETTINGS)  # another rank leaves the file alone
    assert len(rank_file(tmp_path, 0).read_bytes()) > len(whole)
    resumed = AnswerJournal(tmp_path, 0, SETTINGS)  # its own rank cuts it off
    assert len(resumed.batches) == 1 and rank_file(tmp_path, 0).read_bytes() == whole
    resumed.append([key(1)], WINDOW, [record(1, 1)])
    resumed.close()
    assert len(AnswerJournal(tmp_path, 0, SETTINGS).batches) == 2


def test_any_other_unreadable_line_is_an_error_naming_file_and_line(tmp_path):
    journal = AnswerJournal(tmp_path, 0, SETTINGS)
    journal.append([key(0)], WINDOW, [record(0)])
    journal.close()
    path = rank_file(tmp_path, 0)
    entry = json.loads(path.read_text())
    bad_lines = {
        "not json\n": "JSONDecodeError",
        json.dumps({**entry, "records": []}) + "\n": "1 rows of 5 fields each and 0 records",
        json.dumps({**entry, "records": [{"task": "toy"}]}) + "\n": "TypeError",
    }
    for line, reason in bad_lines.items():
        path.write_text(line + json.dumps(entry) + "\n")
        with pytest.raises(ValueError, match=rf"rank0\.jsonl:1: not a journaled batch .*{reason}"):
            AnswerJournal(tmp_path, 0, SETTINGS)


def test_a_cell_s_journal_with_an_unreadable_line_inside_is_discarded_not_a_stopped_sweep(tmp_path):
    journal = AnswerJournal(tmp_path, 0, SETTINGS)
    journal.append([key(0)], WINDOW, [record(0)])
    journal.close()
    rank_file(tmp_path, 0).write_bytes(b"\0\0\0\n" + rank_file(tmp_path, 0).read_bytes())  # a crash's zeros
    with pytest.raises(ValueError, match=r"rank0\.jsonl:1: not a journaled batch"):
        AnswerJournal(tmp_path, 0, SETTINGS)
    resumed = AnswerJournal(tmp_path, 0, SETTINGS, discard_stale=True)
    assert resumed.batches == {} and "rank0.jsonl:1" in resumed.discarded
    assert not rank_file(tmp_path, 0).exists()


def test_the_code_digest_skips_what_is_not_source(tmp_path):
    (tmp_path / "a.py").write_text("x = 1\n")
    first = code_digest(tmp_path)
    (tmp_path / ".#a.py").symlink_to(tmp_path / "gone")  # an editor's lock file: a dangling link
    (tmp_path / ".scratch.py").write_text("y = 2\n")
    assert code_digest(tmp_path) == first


def test_replay_takes_a_batch_only_with_the_rows_it_held_in_their_order_and_window(tmp_path):
    journal = AnswerJournal(tmp_path, 0, SETTINGS)
    keys = [key(i) for i in range(5)]
    first, second = window_digest(keys[:3]), window_digest(keys[3:])
    journal.append([key(0), key(1)], first, [record(0), record(1)])
    journal.append([key(2)], first, [record(2, 1)])
    replay = journal.replay(keys)
    window = [0, 1, 2]
    assert replay.batch([0, 1], window).rows == (key(0), key(1))
    assert replay.batch([1, 0], window) is None and replay.batch([0], window) is None
    assert replay.batch([0, 1], [0, 1, 2, 3]) is None  # planned among other requests: maybe another batch
    # a window is taken whole, as the batches planned among exactly its requests, or not at all
    assert [positions for positions, _ in replay.window(window)] == [[0, 1], [2]]
    assert replay.window([0, 1, 2, 3]) is None and replay.window([1, 2]) is None
    journal.append([key(3)], second, [record(3, 2)])
    assert replay.window([3, 4]) is None  # request 4 was never answered
    journal.append([key(4)], second, [record(4, 3)])
    assert replay.window([3, 4]) is None  # what a call journals itself is not replayed within it
    assert [p for p, _ in journal.replay(keys).window([3, 4])] == [[3], [4]]
    journal.append([key(0), key(2)], first, [record(0, 4), record(2, 4)])  # request 0 in two batches
    assert journal.replay(keys).window(window) is None  # never answered twice


def test_an_answer_with_a_unicode_line_separator_stays_one_line(tmp_path):
    odd = "a\u2028b\u2029c\x85d\re"  # JSON leaves these unescaped; str.splitlines breaks at each
    AnswerJournal(tmp_path, 0, SETTINGS).append([key(0)], WINDOW, [record(0, answer=odd)])
    (batch,) = AnswerJournal(tmp_path, 0, SETTINGS).batches.values()
    assert batch.sample_records()[0].answer == odd


def test_an_append_needs_one_record_per_row(tmp_path):
    journal = AnswerJournal(tmp_path, 0, SETTINGS)
    with pytest.raises(ValueError, match="one record per row expected, got 2 rows and 1 records"):
        journal.append([key(0), key(1)], WINDOW, [record(0)])
    assert not rank_file(tmp_path, 0).exists()


def test_appends_reach_the_kernel_at_once_and_the_disk_at_a_bounded_interval(tmp_path, monkeypatch):
    import globalcom2.answer_journal as answer_journal

    synced = []
    monkeypatch.setattr(
        answer_journal.os, "fsync", lambda fd: synced.append(os.readlink(f"/proc/self/fd/{fd}"))
    )
    journal = AnswerJournal(tmp_path, 0, SETTINGS)
    journal.append([key(0)], WINDOW, [record(0)])
    ours = str(rank_file(tmp_path, 0))
    assert len(rank_file(tmp_path, 0).read_text().splitlines()) == 1  # readable before any fsync
    assert ours not in synced  # the interval has not passed
    monkeypatch.setattr(answer_journal, "FSYNC_INTERVAL_S", 0.0)
    journal.append([key(1)], WINDOW, [record(1, 1)])
    assert synced.count(ours) == 1
    journal.close()
    assert synced.count(ours) == 2 and len(AnswerJournal(tmp_path, 0, SETTINGS).batches) == 2


def test_a_second_run_on_a_rank_another_run_is_writing_is_refused_naming_it(tmp_path):
    first = AnswerJournal(tmp_path, 0, SETTINGS)
    first.append([key(0)], WINDOW, [record(0)])  # the first run is inside a generate_until call
    holder = rf"another run \(pid {os.getpid()} on .+ since .+\)"
    with pytest.raises(
        JournalInUseError, match=rf"rank0\.jsonl is being written by {holder}.*another folder"
    ):
        AnswerJournal(tmp_path, 0, SETTINGS)  # it would cut the first run's line in flight as a torn tail
    AnswerJournal(tmp_path, 1, SETTINGS).append([key(1)], WINDOW, [record(1)])  # another rank: its own file
    first.close()  # the call ends: the rank's file is free, and one process may evaluate into it again
    second = AnswerJournal(tmp_path, 0, SETTINGS)
    assert len(second.batches) == 1
    first.append([key(2)], WINDOW, [record(2, 1)])  # the first run's next call takes the rank again
    with pytest.raises(JournalInUseError, match=r"rank0\.jsonl is being written"):
        second.append([key(3)], WINDOW, [record(3, 2)])  # never two writers interleaving in one file
    first.close()
    assert len(AnswerJournal(tmp_path, 0, SETTINGS).batches) == 2


def test_a_killed_writer_holds_nothing_and_its_batches_are_read_back(tmp_path):
    writer = textwrap.dedent(
        f"""
        import sys
        sys.path[:0] = {[os.getcwd(), os.path.dirname(__file__)]!r}
        from test_answer_journal import SETTINGS, WINDOW, AnswerJournal, key, record
        journal = AnswerJournal({str(tmp_path)!r}, 0, SETTINGS)
        journal.append([key(0)], WINDOW, [record(0)])
        print("appended", flush=True)
        sys.stdin.read()  # hold the rank until killed
        """
    )
    process = subprocess.Popen(
        [sys.executable, "-c", writer], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert process.stdout.readline().strip() == "appended"
        with pytest.raises(JournalInUseError, match=rf"\(pid {process.pid} on "):
            AnswerJournal(tmp_path, 0, SETTINGS)
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
    (batch,) = AnswerJournal(tmp_path, 0, SETTINGS).batches.values()  # the kernel let go of the lock
    assert batch.rows == (key(0),)


def test_a_run_never_appends_after_lines_it_did_not_read(tmp_path):
    """Between two calls the rank is free: another run may write (or a kill may leave half a line) there."""
    first = AnswerJournal(tmp_path, 0, SETTINGS)
    first.append([key(0)], WINDOW, [record(0)])
    first.close()
    second = AnswerJournal(tmp_path, 0, SETTINGS)  # opened between the first run's calls
    first.append([key(1)], WINDOW, [record(1, 1)])
    first.close()
    whole = rank_file(tmp_path, 0).read_bytes()
    with pytest.raises(JournalInUseError, match=r"rank0\.jsonl holds \d+ bytes where this run left \d+"):
        second.append([key(2)], WINDOW, [record(2, 2)])
    with open(rank_file(tmp_path, 0), "ab") as handle:
        handle.write(b'{"rows": [["toy", "te')  # the first run killed in its next call
    with pytest.raises(JournalInUseError, match="start this run again"):
        first.append([key(3)], WINDOW, [record(3, 3)])  # its own file, but not as it left it
    assert rank_file(tmp_path, 0).read_bytes().startswith(whole)  # nothing glued onto the torn line
    resumed = AnswerJournal(tmp_path, 0, SETTINGS)  # a new run cuts the torn tail and reads both batches
    assert len(resumed.batches) == 2
    resumed.append([key(2)], WINDOW, [record(2, 2)])
    resumed.close()
    assert len(AnswerJournal(tmp_path, 0, SETTINGS).batches) == 3


def test_a_stale_folder_is_never_emptied_under_a_live_run(tmp_path):
    live = AnswerJournal(tmp_path, 0, SETTINGS)
    live.append([key(0)], WINDOW, [record(0)])  # inside a call
    with pytest.raises(JournalInUseError, match=r"rank0\.jsonl is being written by another run"):
        AnswerJournal(tmp_path, 1, {**SETTINGS, "code": "another"}, discard_stale=True)
    live.close()
    assert len(AnswerJournal(tmp_path, 0, SETTINGS).batches) == 1


def test_a_failed_fsync_at_close_still_lets_go_of_the_rank(tmp_path, monkeypatch):
    import globalcom2.answer_journal as answer_journal

    journal = AnswerJournal(tmp_path, 0, SETTINGS)
    journal.append([key(0)], WINDOW, [record(0)])

    def failing_fsync(fd):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(answer_journal.os, "fsync", failing_fsync)
    with pytest.raises(OSError, match="Input/output error"):
        journal.close()
    monkeypatch.undo()
    assert len(AnswerJournal(tmp_path, 0, SETTINGS).batches) == 1  # not "being written by another run"
