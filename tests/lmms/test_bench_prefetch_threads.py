"""The batch-preparation benchmark: the plugin's own feeder, drained at several thread counts, into a table."""

from __future__ import annotations

import json

import pytest

from globalcom2.lmms import prefetch_threads


def test_every_thread_count_is_timed_and_written_with_its_rounds(tmp_path):
    argv = ["--samples", "6", "--rounds", "2", "--threads", "1", "3", "--out", str(tmp_path)]
    record = prefetch_threads.main(argv)
    assert [row["threads"] for row in record["rows"]] == [1, 3]
    one, three = record["rows"]
    assert one["speed-up vs 1"] == 1.0
    assert three["speed-up vs 1"] == pytest.approx(three["samples/s"] / one["samples/s"])
    for row in record["rows"]:
        assert 0 < row["min"] <= row["samples/s"] <= row["max"] and row["processor ms per batch"] > 0
    assert {key: len(rounds) for key, rounds in record["rounds"].items()} == {"1": 2, "3": 2}
    written = json.loads((tmp_path / "prefetch_threads_cpu.json").read_text())
    assert written["rows"] == record["rows"] and written["provenance"]["versions"]
    assert (
        "6 samples of the demo generator's efficiency split"
        in (tmp_path / "prefetch_threads_cpu.md").read_text()
    )


def test_the_requests_repeat_the_split_and_carry_their_own_documents():
    requests, task_dict = prefetch_threads.requests_for("efficiency", 35)  # the split has 30 items
    docs = task_dict[prefetch_threads.TASK]["efficiency"]
    assert len(requests) == len(docs) == 35
    assert [r.args[3] for r in requests] == list(range(35))
    assert docs[30]["question"] == docs[0]["question"] and docs[30]["image"].size == (672, 672)
    context, _, visuals, doc_id, task, split = requests[7].args
    assert (context, visuals(docs[doc_id]), task, split) == (
        docs[7]["question"], [docs[7]["image"]], prefetch_threads.TASK, "efficiency",
    )  # fmt: skip


@pytest.mark.parametrize(
    "argv", [["--threads", "0"], ["--samples", "0"], ["--rounds", "0"], ["--pretrained", "llava-hf/x"]]
)
def test_bad_arguments_are_refused(argv):
    with pytest.raises(SystemExit):
        prefetch_threads.parse_args(argv)
