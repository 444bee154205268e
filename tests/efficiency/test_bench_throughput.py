"""The throughput and batch-effect benchmark: real globalcom2.run cells read back into rows."""

from __future__ import annotations

import json
import os
import platform

import pytest

from globalcom2.perf import throughput
from globalcom2.sample_records import SampleRecord


def record(doc_id: int, batch_id: int, prompt_tokens: int, tokens: list[int]) -> SampleRecord:
    return SampleRecord(
        task="toy",
        split="test",
        doc_id=doc_id,
        rank=0,
        batch_id=batch_id,
        batch_size=2,
        method="vanilla",
        method_params={},
        attn_implementation="sdpa",
        num_images=1,
        image_sizes=[[336, 336]],
        prompt_tokens=prompt_tokens,
        llm_prompt_tokens=prompt_tokens,
        visual_tokens_before=0,
        visual_tokens_llm_input=0,
        visual_tokens_after=0,
        output_tokens=len(tokens),
        output_token_ids=tokens,
        answer="",
        empty_answer=False,
        stop_reason="eos",
        preprocess_s=0.0,
        prefill_s=None,
        total_s=None,
        peak_memory_bytes=None,
        peak_memory_note=None,
        clock=None,
    )


def test_padded_share_counts_the_slots_of_each_batch():
    records = [record(0, 0, 10, []), record(1, 0, 6, []), record(2, 1, 8, []), record(3, 1, 8, [])]
    assert throughput.padded_share(records) == pytest.approx(1 - 32 / 36)


def test_the_mean_text_length_is_unknown_when_a_record_lacks_it():
    """A cell stored before text tokens were recorded has ``None`` there: the mean is unknown, not
    pulled towards 0."""
    from dataclasses import replace

    counted = [replace(record(i, 0, 10, []), text_tokens=n) for i, n in enumerate((48, 50))]
    assert throughput.mean_text_tokens(counted) == 49
    assert throughput.mean_text_tokens([*counted, record(2, 0, 10, [])]) is None
    assert throughput.mean_text_tokens([]) is None


def test_bad_arguments_are_refused():
    with pytest.raises(SystemExit):
        throughput.parse_args(["--mode", "batch-effect", "--batch-sizes", "4", "8"])
    with pytest.raises(SystemExit):
        throughput.parse_args(["--variants", "nonsense@0.5"])
    with pytest.raises(SystemExit):
        throughput.parse_args(["--batch-sizes", "0"])
    for bad in ("0", "17", "two"):  # the harness's own bounds (1 to 16), refused before any cell runs
        with pytest.raises(SystemExit):
            throughput.parse_args(["--prefetch-threads", bad])


def test_each_prefetch_thread_count_is_a_cell_of_its_own_and_a_serial_cell_runs_once(tmp_path):
    args = throughput.parse_args(
        ["--variants", "vanilla@1", "--batch-sizes", "4", "--prefetch-threads", "1", "auto"]
    )
    settings = throughput.settings_of(args)  # --prefetch both: with and without the background threads
    assert [(s.prefetch, s.threads) for s in settings] == [(True, 1), (True, None), (False, None)]
    assert len({s.experiment for s in settings}) == 3  # each in its own experiment folder
    assert [s.experiment for s in settings] == [
        "throughput_b4_prefetch_t1",
        "throughput_b4_prefetch",
        "throughput_b4_serial",
    ]
    overrides = [throughput.cell_overrides(s, args, tmp_path) for s in settings]
    assert ["prefetch_threads=1" in o for o in overrides] == [True, False, False]
    assert ["prefetch_threads=auto" in o for o in overrides] == [False, True, True]


@pytest.mark.slow
def test_batch_effect_of_real_cells_is_none_in_fp32(tmp_path):
    """Two real cells (batch 1 and 3, fp32) through globalcom2.run: the batch-effect row finds every answer
    unchanged and no metric moved (the exactness claim), and the throughput rows carry every stage."""
    args = [
        "--mode", "batch-effect", "--model", "tiny", "--benchmark", "demo", "--limit", "6",
        "--variants", "globalcom2@0.25", "--batch-sizes", "1", "3",
        "--results-dir", str(tmp_path / "cells"), "--out", str(tmp_path / "out"),
    ]  # fmt: skip
    payload = throughput.main(args)
    (row,) = payload["rows"]
    assert (row["method"], row["batch"], row["samples"]) == ("globalcom2", 3, 6)
    assert row["answers changed"] == 0 and row["first token changed"] == 0
    assert row["metric changes"] and all(delta == 0 for delta in row["metric changes"].values())
    written = json.loads((tmp_path / "out" / "tiny_cpu_batch_effect.json").read_text())
    assert written["rows"] == payload["rows"] and written["provenance"]["versions"]
    cpu = f"CPU ({platform.machine()}, {os.cpu_count()} cores)"  # not the GPU a CPU run's machine may have
    assert written["title"].endswith(f"cpu ({cpu}), torch.float32"), written["title"]

    # the same cells as a throughput table (no re-run: the cells are read from their folder)
    cells = {}
    for size in (1, 3):
        setting = throughput.Setting("globalcom2", 0.25, size, None)
        cell = throughput.find_cell(tmp_path / "cells", setting)
        cells[size] = throughput.throughput_row(setting, cell, throughput.read_records(cell))
    for size, row in cells.items():
        assert (
            row["samples"] == 6 and row["timed batches"] == 6 // size - 1
        )  # the first batch is reported apart
        assert row["samples/s (loop)"] > 0 and row["generate_s"] > 0 and row["loop_s"] > 0
        assert row["lmms_eval_s"] is not None and row["lmms_eval_s"] >= 0
        split = [row[f"{name}_s"] for name in ("vision", "compression", "llm_prefill", "decode", "other")]
        assert all(part > 0 for part in split[:4]), split  # GlobalCom² compresses: every stage took time
        assert sum(split) == pytest.approx(row["generate_s"], rel=1e-6)  # the stages split generate's time
    assert cells[1]["padded share"] == 0
    assert {row["batches that compiled"] for row in cells.values()} == {0}  # eager: nothing compiles
    # batch 3 of 6 samples leaves one timed batch: the table's title says its samples/s rests on little
    assert throughput.few_timed_batches(list(cells.values())) == [3]
    assert throughput.few_timed_batches(payload["rows"]) == []  # batch-effect rows count answers, not time


def test_batches_that_compiled_are_left_out_of_the_row_and_counted(monkeypatch):
    """A batch that compiled inside its timed call (compile=true, a shape the warm-up missed) times the
    compilation: like the first batch, it stays out of the row's stage sums and samples/s."""
    import types

    from globalcom2.sample_records import SampleRecord

    def batch(batch_id: int, total_s: float, **flags) -> SampleRecord:
        return SampleRecord(
            task="t", split="s", doc_id=batch_id, rank=0, batch_id=batch_id, batch_size=1, method="vanilla",
            method_params={}, attn_implementation={}, num_images=1, image_sizes=[[336, 336]], prompt_tokens=10,
            llm_prompt_tokens=10, visual_tokens_before=5, visual_tokens_llm_input=5, visual_tokens_after=5.0,
            output_tokens=1, output_token_ids=[1], answer="a", empty_answer=False, stop_reason="eos",
            preprocess_s=0.1, prefill_s=total_s / 2, total_s=total_s, peak_memory_bytes=None,
            peak_memory_note="cpu", clock="perf_counter", load_s=0.1, wait_s=0.0, postprocess_s=0.1,
            loop_s=total_s + 0.2, **flags,
        )  # fmt: skip

    records = [
        batch(0, 50.0, first_call=True),
        batch(1, 1.0),
        batch(2, 40.0, compiled_in_call=True),
        batch(3, 1.0),
    ]
    cell = types.SimpleNamespace(record=types.SimpleNamespace(timings={}, run={}), path="cell")
    row = throughput.throughput_row(throughput.Setting("vanilla", 1.0, 1, None), cell, records)
    assert row["timed batches"] == 2 and row["batches that compiled"] == 1
    assert row["generate_s"] == pytest.approx(2.0) and row["loop_s"] == pytest.approx(2.4)
    assert row["samples/s (loop)"] == pytest.approx(2 / 2.4)


def test_a_failed_cell_costs_only_itself_and_the_table_is_rewritten_after_each_cell(tmp_path, monkeypatch):
    """On a GPU lent for minutes, a time limit or one failed cell must not lose the cells already run."""
    statuses = iter([0, 1, 0])
    written = []
    monkeypatch.setattr(throughput, "run_cell", lambda setting, args, results_dir: next(statuses))
    monkeypatch.setattr(throughput, "find_cell", lambda results_dir, setting: f"cell of {setting.batch_size}")
    monkeypatch.setattr(throughput, "read_records", lambda cell: [])
    monkeypatch.setattr(
        throughput,
        "write_tables",
        lambda args, cells, failures, pending, info, results_dir: written.append(
            (sorted(s.batch_size for s in cells), [f["exit"] for f in failures], pending)
        ),
    )
    argv = ["--variants", "vanilla@1", "--batch-sizes", "1", "4", "8", "--prefetch", "on"]
    with pytest.raises(SystemExit, match="1 of 3 cells failed"):
        throughput.main([*argv, "--results-dir", str(tmp_path)])
    assert written == [([1], [], 2), ([1], [1], 1), ([1, 8], [1], 0)]


def test_random_init_cells_on_the_efficiency_split_get_vicuna_length_prompts_unless_told_otherwise(tmp_path):
    """The byte-level text would make a random-initialised 7B's prompts about 150 tokens longer than a real
    checkpoint's; the efficiency split's prompts have recorded Vicuna counts, so its cells use them."""
    setting = throughput.Setting("vanilla", 1.0, 1, True, False)

    def overrides(*argv: str) -> list[str]:
        return throughput.cell_overrides(setting, throughput.parse_args(list(argv)), tmp_path)

    assert "model.vicuna_text=true" in overrides("--model", "llava_next_7b", "--random-init")
    assert "model.vicuna_text=true" not in overrides(
        "--model", "llava_next_7b", "--random-init", "--no-vicuna-text"
    )
    assert "model.vicuna_text=true" not in overrides(
        "--model", "llava_next_7b", "--random-init", "--benchmark", "demo"
    )
    assert "model.vicuna_text=true" not in overrides()  # the trained tiny model has its own tokenizer
    with pytest.raises(SystemExit):
        throughput.parse_args(["--vicuna-text"])
