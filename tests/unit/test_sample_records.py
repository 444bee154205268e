"""Per-sample records: stats -> rows, visual-token counts, summaries, atomic JSONL."""

from __future__ import annotations

import pandas as pd
import pytest

from globalcom2 import sample_records as sr
from globalcom2.efficiency.summary import EFFICIENCY_METRICS, efficiency_value, latency_summary
from globalcom2.efficiency.table import efficiency_display
from globalcom2.methods.base import ImageStats, LayerStats


def image(before: int, kept: int, separators: int = 24) -> ImageStats:
    return ImageStats("random", (336, 672), before, before - separators, kept, separators)


def record(**overrides) -> sr.SampleRecord:
    base = dict(
        task="t", split="test", doc_id=0, rank=0, batch_id=0, batch_size=1, method="random", method_params={},
        attn_implementation={}, num_images=1, image_sizes=[[336, 672]], prompt_tokens=1200, llm_prompt_tokens=400,
        visual_tokens_before=1176, visual_tokens_llm_input=376, visual_tokens_after=376.0, output_tokens=2,
        output_token_ids=[5, 6], answer="yes", empty_answer=False, stop_reason="eos", preprocess_s=0.5,
        prefill_s=1.0, total_s=2.0, peak_memory_bytes=None, peak_memory_note="cpu", clock="perf_counter",
    )  # fmt: skip
    return sr.SampleRecord(**{**base, **overrides})


def test_per_image_stats_are_split_by_images_per_row():
    stats = [image(1176, 288), image(2928, 720), image(2328, 576)]
    rows = sr.assign_stats(stats, [1, 0, 2])
    assert rows == [[stats[0]], [], stats[1:]]
    assert sr.visual_token_counts(rows[2]) == (2928 + 2328, 720 + 576 + 48, 720.0 + 576 + 48)
    assert sr.visual_token_counts([]) == (0, 0, 0.0)


def test_per_row_stats_of_in_llm_methods():
    stats = [LayerStats("fastv", 2928, (2928, 2928, 732, 732), (2969, 2969, 773, 773))]
    (row,) = sr.assign_stats(stats, [1])
    assert sr.visual_token_counts(row) == (2928, 2928, 1830.0)
    assert sr.stat_to_dict(stats[0])["equivalent_visual_tokens"] == 1830.0
    assert sr.stat_to_dict(image(1176, 288))["tokens_after"] == 312  # the property is recorded too


@pytest.mark.parametrize(("stats", "rows"), [([image(1176, 288)], [1, 1]), ([], [1])])
def test_stats_that_do_not_match_the_batch_are_an_error(stats, rows):
    with pytest.raises(RuntimeError):
        sr.assign_stats(stats, rows)


def test_summary_counts_calls_once_and_reports_empty_answers():
    records = [
        record(doc_id=0, batch_id=0, batch_size=2),
        record(doc_id=1, batch_id=0, batch_size=2, answer="", empty_answer=True),
        record(doc_id=2, batch_id=1, total_s=1.0, prefill_s=0.5, peak_memory_note=None, peak_memory_bytes=10),
    ]
    summary = sr.summarize(records)
    assert summary["samples"] == 3 and summary["empty_answers"] == 1 and summary["generate_calls"] == 2
    assert not {k for k in summary if "_s" in k or "memory" in k}, "latency is summarised once, in efficiency"
    latency = latency_summary(records)
    assert latency["generate_calls"] == 2
    assert latency["throughput_samples_per_s"] == pytest.approx(3 / (2.0 + 1.0))
    assert latency["throughput_samples_per_s_end_to_end"] == pytest.approx(3 / (2.0 + 1.0 + 0.5 + 0.5))
    assert latency["prefill_ms"]["mean"] == pytest.approx(750.0)
    assert latency["peak_memory_gib"]["max"] == pytest.approx(10 / 2**30)


def test_a_data_parallel_cells_throughput_is_the_sum_of_its_processes_rates():
    """Two ranks, each 10 one-sample calls of 1 s at the same time: the cell does 2 samples/s. Summing the
    ranks' seconds reported 1 sample/s, one process's rate, as the cell's."""
    records = [
        record(doc_id=10 * rank + i, rank=rank, batch_id=i, total_s=1.0, preprocess_s=0.0)
        for rank in (0, 1)
        for i in range(10)
    ]
    latency = latency_summary(records)
    assert latency["processes"] == 2 and latency["timed_calls"] == 20
    assert latency["throughput_samples_per_s"] == pytest.approx(2.0)
    assert latency["throughput_samples_per_s_end_to_end"] == pytest.approx(2.0)
    assert latency["total_ms"]["median"] == pytest.approx(1000.0)  # latency stays per call


def test_the_first_measured_call_is_reported_apart_and_kept_out_of_the_statistics():
    stages = {"vision": 0.1, "compression": 0.0, "llm_prefill": 0.3, "decode": 0.5, "other": 0.1}
    records = [
        record(doc_id=0, batch_id=0, prefill_s=5.0, total_s=9.0, first_call=True, stages_s=stages),
        record(doc_id=1, batch_id=1, prefill_s=0.4, total_s=1.0, stages_s=stages),
        record(doc_id=2, batch_id=2, prefill_s=0.6, total_s=1.0, stages_s=stages),
    ]
    latency = latency_summary(records)
    assert latency["first_call"] == {"calls": 1, "prefill_ms": 5000.0, "total_ms": 9000.0}
    assert latency["timed_calls"] == 2 and latency["prefill_ms"]["median"] == pytest.approx(500.0)
    assert latency["throughput_samples_per_s"] == pytest.approx(2 / 2.0)
    assert latency["stages_ms"]["llm_prefill"]["median"] == pytest.approx(300.0)
    assert set(latency["stages_ms"]) == set(stages)


def test_a_later_call_that_compiled_is_reported_apart_and_kept_out_of_the_statistics():
    """Under compile=true a batch of a shape the warm-up missed compiles inside its timed call: its seconds
    are compilation, so they stay out of the latency and throughput figures, counted apart."""
    records = [
        record(doc_id=0, batch_id=0, prefill_s=5.0, total_s=9.0, first_call=True),
        record(doc_id=1, batch_id=1, prefill_s=0.4, total_s=1.0),
        record(doc_id=2, batch_id=2, prefill_s=30.0, total_s=40.0, compiled_in_call=True),
        record(doc_id=3, batch_id=3, prefill_s=0.6, total_s=1.0),
    ]
    latency = latency_summary(records)
    assert latency["compiled_calls"] == {"calls": 1, "prefill_ms": 30000.0, "total_ms": 40000.0}
    assert latency["first_call"]["calls"] == 1 and latency["timed_calls"] == 2
    assert latency["prefill_ms"]["median"] == pytest.approx(500.0) and latency["prefill_ms"]["p90"] < 1000
    assert latency["throughput_samples_per_s"] == pytest.approx(2 / 2.0)
    assert latency_summary(records[:2])["compiled_calls"] is None
    # the efficiency table shows the count where some call compiled, and no column where none did
    rows = [
        {"method": name, "method_name": name, "retention_ratio": 1.0,
         "compiled_calls": efficiency_value(latency_summary(cell), EFFICIENCY_METRICS["compiled_calls"])}
        for name, cell in (("vanilla", records), ("random", records[:2]))
    ]  # fmt: skip
    shown = efficiency_display(pd.DataFrame(rows))
    assert shown["later calls that compiled"].tolist()[0] == 1 and pd.isna(
        shown["later calls that compiled"][1]
    )
    assert "later calls that compiled" not in efficiency_display(pd.DataFrame(rows[1:]))
    # records written before the field existed read back as calls that did not compile
    data = records[1].to_dict()
    del data["compiled_in_call"]
    assert sr.SampleRecord.from_dict(data).compiled_in_call is False


def test_jsonl_round_trip_is_sorted_and_leaves_no_temporary_files(tmp_path):
    path = tmp_path / "sub" / "records.jsonl"
    records = [record(task="b", doc_id=1), record(task="a", doc_id=3), record(task="a", doc_id=2)]
    sr.write_jsonl(path, records)
    assert [(r.task, r.doc_id) for r in sr.read_jsonl(path)] == [("a", 2), ("a", 3), ("b", 1)]
    assert [p.name for p in path.parent.iterdir()] == ["records.jsonl"]


@pytest.mark.parametrize(
    "stats",
    [
        [ImageStats("random", (336, 672), 1176, 1152, 288, 24)],
        [LayerStats("fastv", 2928, (2928, 732), (2969, 773), (1,), (1,), (2969,))],
    ],
    ids=["image", "layer"],
)
def test_stats_stay_typed_through_the_jsonl(tmp_path, stats):
    path = tmp_path / "records.jsonl"
    sr.write_jsonl(path, [record(compression=stats)])
    (back,) = sr.read_jsonl(path)
    assert back.compression == stats and type(back.compression[0]) is type(stats[0])


@pytest.mark.parametrize(
    ("line", "error"), [("{not json", "JSONDecodeError"), ('{"surprise": 1}', "TypeError")]
)
def test_a_damaged_records_file_names_its_line(tmp_path, line, error):
    path = tmp_path / "records.jsonl"
    sr.write_jsonl(path, [record()])
    path.write_text(path.read_text() + line + "\n")
    with pytest.raises(ValueError, match=rf"records\.jsonl:2: not a sample record \({error}"):
        sr.read_jsonl(path)


def test_untagged_stats_fail_with_what_to_do():
    with pytest.raises(ValueError, match="re-run the cell"):
        sr.stat_from_dict({"method": "random", "tokens_before": 3})


def test_latency_percentiles_are_interpolated_and_name_their_count():
    """p90 is interpolated like the quartiles (a nearest rank rounded half to even gave the 5th of 6 values),
    and every statistic says over how many calls it is; the LLM forward is summarised beside the stages."""
    records = [
        record(doc_id=i, batch_id=i, prefill_s=float(i), total_s=float(i) + 1, llm_forward_s=i / 10)
        for i in range(1, 7)
    ]
    latency = latency_summary(records)
    assert latency["prefill_ms"]["p90"] == pytest.approx(5500.0)
    assert latency["prefill_ms"]["n"] == 6 and latency["timed_calls"] == 6
    assert latency["llm_forward_ms"]["median"] == pytest.approx(350.0)
    assert latency_summary(records[:1])["prefill_ms"]["p90"] == pytest.approx(1000.0)
    # a record from before the LLM forward was measured leaves the figure out, never 0
    assert (
        latency_summary([record(doc_id=0, batch_id=0, prefill_s=1.0, total_s=2.0)])["llm_forward_ms"] is None
    )
