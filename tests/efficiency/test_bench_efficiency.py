"""``make bench-efficiency``: the interleaved Tables 8/9 protocol writes a complete, consistent table."""

from __future__ import annotations

import argparse
import json
import re
import types

import pandas as pd
import pytest
import torch
from helpers import dynamo_eager_backend, shrink_random_init_7b

from globalcom2.data import demo
from globalcom2.efficiency.profile import Measurement
from globalcom2.perf import efficiency
from globalcom2.perf.efficiency import main, parse_variant, phases, warmup_calls
from globalcom2.prompts import vicuna_v1_prompt
from globalcom2.protocol.vicuna_length import (
    PREFIX_TOKENS,
    VICUNA_TEXT_TOKENS,
    fit_text_tokens,
    vicuna_text_tokens,
)

VARIANTS = ["vanilla@1", "globalcom2@0.5", "globalcom2@0.1", "random@0.25", "fastv@0.25", "sparsevlm@0.25"]
STAGE_COLUMNS = ["vision ms", "compression ms", "LLM prefill ms", "decode ms"]


def run_bench(tmp_path, device: str, *extra: str) -> tuple[pd.DataFrame, dict]:
    args = ["--images", "2", "--new-tokens", "2", "--device", device, "--out", str(tmp_path), *extra]
    main([*args, "--variants", *VARIANTS])
    stem = tmp_path / f"tiny_{device}"
    assert stem.with_suffix(".md").read_text().startswith("**Efficiency, tiny")
    return pd.read_csv(stem.with_suffix(".csv")), json.loads(stem.with_suffix(".json").read_text())


def check_table(table: pd.DataFrame) -> None:
    assert list(zip(table["method"], table["R"], strict=True)) == [parse_variant(v) for v in VARIANTS]
    vanilla = table.iloc[0]
    assert vanilla["visual tokens (layer mean)"] == 2928  # 672x672: thumbnail, 2x2 crops, 48 separators
    for ratio in (
        "prefill speed-up (x)",
        "LLM prefill speed-up (x)",
        "FLOPs ratio (full)",
        "throughput gain (x)",
    ):
        assert vanilla[ratio] == 1.0
    globalcom2 = table[table["method"] == "globalcom2"].sort_values("R")
    assert globalcom2["visual tokens (layer mean)"].is_monotonic_increasing
    assert globalcom2["TFLOPs (full)"].is_monotonic_increasing
    compressed = table.iloc[1:]
    assert (compressed["visual tokens (layer mean)"] < 2928).all()
    assert (compressed["TFLOPs (full)"] < vanilla["TFLOPs (full)"]).all()
    assert (compressed["KV cache (MB)"] < vanilla["KV cache (MB)"]).all()
    assert (compressed["FLOPs ratio (full)"] > 1).all() and (compressed["FLOPs ratio (paper)"] > 1).all()
    # every stage is measured, and the LLM prefill is a part of the whole prefill
    assert (table[STAGE_COLUMNS] >= 0).all().all() and (table["LLM prefill ms"] > 0).all()
    assert (table["LLM prefill ms"] + table["vision ms"] <= table["prefill ms"]).all()
    assert (table["prefill p25 ms"] <= table["prefill ms"]).all() and (
        table["prefill ms"] <= table["prefill p75 ms"]
    ).all()
    reads = "host reads (sdpa, eager)"  # counted once per variant, in eager mode: the column says where
    assert (table[reads] >= vanilla[reads]).all()
    assert (table[reads] <= vanilla[reads] + 9).all()  # 3 a stage at most (SparseVLM: 3 stages)


def test_variant_parsing_fails_loudly():
    assert parse_variant("fastv@0.1") == ("fastv", 0.1)
    for bad, message in [
        ("fastv", "not METHOD@R"),
        ("foo@0.5", "unknown method 'foo'; valid: "),
        ("random@1.5", "(0, 1]"),
    ]:
        with pytest.raises(argparse.ArgumentTypeError, match=re.escape(message)):
            parse_variant(bad)
    with pytest.raises(SystemExit):
        main(["--variants", "globalcom2@0.5"])  # no vanilla to compare with


def test_cpu_table_is_complete_and_marks_memory_unavailable(tmp_path):
    table, record = run_bench(tmp_path, "cpu")
    check_table(table)
    assert set(table["peak allocated (GiB)"]) == {"n/a (CPU)"}
    assert record["provenance"]["hardware"]["cuda_available"] == torch.cuda.is_available()
    assert record["settings"]["images"] == 2 and record["settings"]["dtype"] == "float32"
    assert record["ceilings"] is None and "roofline floor ms" not in table  # not measured on CPU by default
    for row in record["rows"]:  # the stages of each row's medians are all there
        assert {"vision_ms", "compression_ms", "llm_prefill_ms", "decode_ms"} <= set(row)


def test_vicuna_text_length_and_ceilings(tmp_path):
    """With --vicuna-text (on by default for --random-init) every prompt has the text length Vicuna's tokenizer
    gives it; with --measure-ceilings every row gets a roofline floor from its FLOPs under a causal kernel."""
    table, record = run_bench(tmp_path, "cpu", "--vicuna-text", "--measure-ceilings")
    questions = [item.question for item in demo.generate_items("efficiency", size=2)]
    expected = sum(vicuna_text_tokens(q) for q in questions) / 2
    assert (table["text tokens"] == expected).all() and 45 < expected < 60
    ceilings = record["ceilings"]
    assert ceilings["matmul_tflops"] > 0 and ceilings["bandwidth_tb_s"] > 0
    for row, floor in zip(record["rows"], table["roofline floor ms"], strict=True):
        assert (
            row["tflops_causal"] < row["tflops_full"]
        )  # the causal kernel skips the scores above the diagonal
        flops = (row["tflops_causal"] + row["tflops_vision"]) * 1e12
        expected = 1e3 * max(
            record["weight_bytes"] / (ceilings["bandwidth_tb_s"] * 1e12),
            flops / (ceilings["matmul_tflops"] * 1e12),
        )
        assert floor == pytest.approx(expected)
    assert (table["prefill / floor"] == table["prefill ms"] / table["roofline floor ms"]).all()


def test_phases_put_the_eager_rows_first():
    assert phases(["sdpa", "eager"], ["default"]) == [("sdpa", None), ("eager", None), ("sdpa", "default")]
    assert phases(["sdpa"], ["default", "reduce-overhead"]) == [
        ("sdpa", None),
        ("sdpa", "default"),
        ("sdpa", "reduce-overhead"),
    ]
    assert phases(["sdpa"], []) == [("sdpa", None)]


def test_cuda_graph_phases_warm_every_prompt_twice_and_the_others_once():
    """Under CUDA graphs each new sequence length records on its second call, so a timed call that met a
    new length would time the recording; without them one call per variant compiles for every length."""
    assert warmup_calls("reduce-overhead", "cuda", 5) == (5, 2)
    assert warmup_calls("max-autotune", "cuda:0", 3) == (3, 2)
    assert warmup_calls("default", "cuda", 5) == (1, 1)
    assert warmup_calls(None, "cuda", 5) == (1, 1)
    assert warmup_calls("default", "cpu", 5) == (1, 1)


def test_compile_modes_are_parsed_and_checked():
    args = efficiency.parse_args(["--device", "cpu", "--compile"])
    assert args.compile_mode == ["default"]
    assert efficiency.parse_args(["--device", "cpu"]).compile_mode == []
    with pytest.raises(SystemExit):
        efficiency.parse_args(["--device", "cpu", "--compile-mode", "default"])  # without --compile
    with pytest.raises(SystemExit):
        efficiency.parse_args(["--device", "cpu", "--compile", "--compile-mode", "reduce-overhead"])


def test_a_failed_phase_keeps_the_rows_measured_before_it_and_fails_loudly(tmp_path, monkeypatch):
    """A compile backend that breaks (on a GPU lent for minutes) must not lose the eager rows."""

    def broken_compile(model, mode):
        raise RuntimeError("inductor exploded")

    monkeypatch.setattr(efficiency, "compile_problem", lambda device, mode: None)
    monkeypatch.setattr(efficiency, "compile_model", broken_compile)
    with pytest.raises(SystemExit, match="1 of 2 phases failed"):
        run_bench(tmp_path, "cpu", "--compile")
    stem = tmp_path / "tiny_cpu"
    record = json.loads(stem.with_suffix(".json").read_text())
    assert record["complete"] is True
    assert record["failures"] == [
        {"attn_implementation": "sdpa", "compile": "default", "error": "RuntimeError: inductor exploded"}
    ]
    assert {row["compile"] for row in record["rows"]} == {"no"} and len(record["rows"]) == len(VARIANTS)
    check_table(pd.read_csv(stem.with_suffix(".csv")))
    assert "FAILED: sdpa default" in stem.with_suffix(".md").read_text()


def test_a_compiled_phase_records_what_dynamo_compiled(tmp_path, monkeypatch):
    """dynamo runs a frame it gives up on (a recompile limit, an error) eager without a word, and the row
    would time eager layers under a compiled label: each compiled phase records its frames and graphs, and
    the caption says how many compiled. (The eager backend: dynamo's frames are what is counted.)"""
    from globalcom2.methods.globalcom2 import compiled_selection

    dynamo_eager_backend(monkeypatch)
    torch._dynamo.reset()
    compiled_selection.cache_clear()
    args = ["--images", "1", "--new-tokens", "2", "--device", "cpu", "--out", str(tmp_path), "--compile"]
    try:
        main([*args, "--variants", "vanilla@1", "globalcom2@0.1"])
    finally:
        compiled_selection.cache_clear()
    record = json.loads((tmp_path / "tiny_cpu.json").read_text())
    frames = record["dynamo_frames"]["sdpa default"]
    assert frames["frames_total"] > 0 and frames["frames_compiled"] == frames["frames_total"]
    assert (
        f"default: {frames['frames_compiled']} of {frames['frames_total']} dynamo frames compiled"
        in (record["caption"])
    )
    assert "RAN EAGER" not in record["caption"]
    # the warm-up met every graph the one image needs: no timed call compiled
    assert {(row["timed_calls_retimed"], row["timed_calls_compiling"]) for row in record["rows"]} == {(0, 0)}
    assert "compiled and were re-run" not in record["caption"]
    fallback = {"frames_total": 10, "frames_compiled": 7, "graphs": 7}
    assert efficiency.compile_note("default", fallback, cuda=False).endswith("(THE REST RAN EAGER)")
    assert "peak reserved" in efficiency.compile_note("reduce-overhead", fallback, cuda=True)
    # graphs that CUDA graphs did not replay are named: such a row is not what its label says
    assert ", 0 skipped by CUDA graphs" in efficiency.compile_note("reduce-overhead", fallback, cuda=True)
    skipped = efficiency.compile_note("reduce-overhead", {**fallback, "cudagraph_skips": 2}, cuda=True)
    assert "2 skipped by CUDA graphs (THOSE RAN WITHOUT REPLAY)" in skipped
    assert "skipped by CUDA graphs" not in efficiency.compile_note("default", fallback, cuda=True)
    assert frames["cudagraph_skips"] == 0
    # graph breaks are counted and named (a frame split into pieces, each entered from Python): none in the
    # tiny model's compiled layers or GlobalCom²'s compiled selection
    assert frames["graph_breaks"] == 0
    assert f"dynamo frames compiled, {frames['graphs']} graphs, 0 graph breaks" in record["caption"]
    # each variant's warm-up (a compiled phase's compilation) is timed, printed and in its row and table
    assert all(row["warmup_s"] > 0 for row in record["rows"])
    assert "warm-up (s)" in (tmp_path / "tiny_cpu.md").read_text()
    # what make bench-compile-cost reads of this JSON: the compiled phase's warm-ups, and its frames
    from globalcom2.perf import compile_cost

    tabulated = compile_cost.rows_of({"cold": record, "warm": record})
    assert [(row["method"], row["R"]) for row in tabulated] == [("vanilla", 1.0), ("globalcom2", 0.1)]
    assert all(row["warm-up cold (s)"] > 0 for row in tabulated) and compile_cost.frames_of(record) == frames
    # each variant's warm-up names the frames it compiled past the ones before it: they add up to the phase's
    assert sum(row["frames cold"] for row in tabulated) == frames["frames_compiled"]
    assert tabulated[0]["frames cold"] > 0


def fake_measurement(compiled: bool) -> Measurement:
    return Measurement(
        prefill_s=9.0 if compiled else 0.1,
        total_s=10.0 if compiled else 0.2,
        peak_memory_bytes=None,
        peak_memory_note="cpu",
        clock="perf_counter",
        device="cpu",
        forward_calls=2,
        compiled=compiled,
    )


@pytest.mark.parametrize(
    ("flags", "kept", "retimed", "still"),
    [
        ([False], 0, 0, False),  # a cached call is the sample
        ([True, False], 1, 1, False),  # a call that compiled was a warm-up: the re-run is the sample
        ([True, True, False], 2, 2, False),
        ([True, True, True, False], 2, 2, True),  # it gives up after RETIMES re-runs, and says so
    ],
)
def test_a_timed_call_that_compiled_is_run_again(monkeypatch, flags, kept, retimed, still):
    calls = iter(flags)
    made = []

    def run_variant(model, inputs, method, ratio, profiler, new_tokens):
        made.append(fake_measurement(next(calls)))
        return made[-1], [len(made)]

    monkeypatch.setattr(efficiency, "run_variant", run_variant)
    measurement, stats, n_retimed, compiling = efficiency.timed_call(None, {}, "vanilla", 1.0, None, 2)
    assert efficiency.RETIMES == 2
    assert measurement is made[kept] and stats == [kept + 1] and len(made) == kept + 1
    assert (n_retimed, compiling) == (retimed, still)


def test_the_caption_names_timed_calls_that_compiled():
    quiet = {("vanilla", 1.0): {"timed_calls_retimed": 0, "timed_calls_compiling": 0}}
    assert efficiency.timed_compile_note("sdpa", "default", quiet) == ""
    noisy = {
        **quiet,
        ("globalcom2", 0.1): {"timed_calls_retimed": 3, "timed_calls_compiling": 1},
        ("fastv", 0.25): {"timed_calls_retimed": 1, "timed_calls_compiling": 0},
    }
    note = efficiency.timed_compile_note("sdpa", "default", noisy)
    assert "sdpa default: timed calls that compiled and were re-run: globalcom2@0.1 3, fastv@0.25 1" in note
    assert note.endswith("(TIMES INCLUDE COMPILATION: globalcom2@0.1 1)")


def test_prompts_stay_on_the_host_and_each_memory_pass_runs_its_variants_largest_prompt(tiny, monkeypatch):
    """Only the prompt being run is on the device (a peak must not hold every image's pixels), and a row's
    peak memory comes from the prompt on which that variant did the most work, not from the first one."""
    model, processor = tiny
    items = demo.generate_items("efficiency", size=3)
    prompts = efficiency.build_prompts(processor, model, items, vicuna_text=False)
    assert {value.device.type for inputs in prompts for value in inputs.values()} == {"cpu"}
    moved = efficiency.on_device(prompts[0], "meta")
    assert {value.device.type for value in moved.values()} == {"meta"} and moved.keys() == prompts[0].keys()

    def costs(flops: float) -> tuple[Measurement, dict, int]:
        return fake_measurement(False), {"full_flops": flops}, 50

    measured = {
        ("vanilla", 1.0): [costs(5.0), costs(7.0), costs(6.0)],
        ("globalcom2", 0.1): [costs(2.0), costs(1.0), costs(3.0)],
    }
    ran = []

    def memory_pass(model, inputs, method, ratio, profiler, new_tokens):
        # on the CPU, .to("cpu") returns the host tensor itself: which prompt ran is a matter of identity
        index = next(
            i for i, prompt in enumerate(prompts) if prompt["pixel_values"] is inputs["pixel_values"]
        )
        ran.append((method, index))
        return fake_measurement(False)

    monkeypatch.setattr(efficiency, "memory_pass", memory_pass)
    profiler = types.SimpleNamespace(device=torch.device("cpu"))
    memory = efficiency.memory_passes(model, prompts, measured, profiler, 2)
    assert ran == [("vanilla", 1), ("globalcom2", 2)] and set(memory) == set(measured)


def test_the_table_is_written_after_each_phase_and_marked_partial_until_the_last(tmp_path, monkeypatch):
    written = []
    real_write = efficiency.write_outputs

    def spy(stem, caption, rows, failures, pending, record):
        real_write(stem, caption, rows, failures, pending, record)
        written.append((len(rows), json.loads(stem.with_suffix(".json").read_text())))

    monkeypatch.setattr(efficiency, "write_outputs", spy)
    run_bench(tmp_path, "cpu", "--attention", "sdpa", "eager")
    (first_rows, first), (last_rows, last) = written
    assert (first_rows, last_rows) == (len(VARIANTS), 2 * len(VARIANTS))
    assert first["complete"] is False and "PARTIAL, not yet measured: eager eager" in first["caption"]
    assert last["complete"] is True and "PARTIAL" not in last["caption"]


@pytest.mark.gpu
def test_gpu_table_reports_peak_memory(tmp_path):
    table, record = run_bench(tmp_path, "cuda", "--attention", "sdpa")
    check_table(table)
    peaks = pd.to_numeric(table["peak allocated (GiB)"])
    reserved = pd.to_numeric(table["peak reserved (GiB)"])
    assert (peaks > 0).all() and peaks.iloc[0] >= peaks.max() - 1e-6  # vanilla holds the most tokens
    assert (reserved >= peaks).all()  # the allocator holds at least what is live
    assert record["provenance"]["hardware"]["gpu"]


@pytest.mark.parametrize("question", sorted(VICUNA_TEXT_TOKENS))
def test_every_efficiency_prompt_is_cut_to_vicunas_length_on_both_sides_of_the_image(processor, question):
    """Every efficiency question, the long ones too: a question's bytes can outnumber its whole prompt's Vicuna
    count, which a cut before the image alone could not reach (the first H100 run failed on one)."""
    from helpers import synthetic_image

    image_token = processor.tokenizer.convert_tokens_to_ids("<image>")
    inputs = dict(
        processor(images=synthetic_image(672, 672), text=vicuna_v1_prompt(question), return_tensors="pt")
    )
    ids = inputs["input_ids"][0]
    target = vicuna_text_tokens(question)
    fitted = fit_text_tokens(inputs, image_token, target)
    new = fitted["input_ids"][0]
    is_image = new == image_token
    assert int((~is_image).sum()) == target < int((ids != image_token).sum())
    assert (
        int(is_image.float().argmax()) == PREFIX_TOKENS
    )  # BOS + system prompt + " USER: " in Vicuna's count
    assert int(is_image.sum()) == int((ids == image_token).sum()) == 2928
    first = int((ids == image_token).float().argmax())
    after = target - PREFIX_TOKENS
    assert new[0] == ids[0]  # BOS
    assert torch.equal(
        new[1:PREFIX_TOKENS], ids[first - PREFIX_TOKENS + 1 : first]
    )  # the end of the text before
    assert torch.equal(new[-after:], ids[-after:])  # the end of the prompt (" ASSISTANT:")
    assert fitted["attention_mask"].shape == fitted["input_ids"].shape


def test_fit_text_tokens_refuses_what_it_cannot_do(processor):
    from helpers import synthetic_image

    image_token = processor.tokenizer.convert_tokens_to_ids("<image>")
    question = "What color is the square?"
    inputs = dict(
        processor(images=synthetic_image(672, 672), text=vicuna_v1_prompt(question), return_tensors="pt")
    )
    ids = inputs["input_ids"][0]
    text, first = int((ids != image_token).sum()), int((ids == image_token).float().argmax())
    images = int((ids == image_token).sum())
    bare = fit_text_tokens(inputs, image_token, 1, prefix=1)["input_ids"][0]  # BOS and the image only
    assert bare[0] == ids[0] and int((bare == image_token).sum()) == images == bare.numel() - 1
    before_only = fit_text_tokens(inputs, image_token, 5, prefix=5)["input_ids"][0]
    assert torch.equal(before_only[1:5], ids[first - 4 : first]) and before_only[-1] == image_token
    with pytest.raises(ValueError, match="a side can only be cut"):
        fit_text_tokens(inputs, image_token, text + 1)
    with pytest.raises(ValueError, match="a side can only be cut"):
        fit_text_tokens(inputs, image_token, text, prefix=first + 1)
    no_image = {**inputs, "input_ids": inputs["input_ids"][:, :first]}
    with pytest.raises(ValueError, match="one image"):
        fit_text_tokens(no_image, image_token, 10)
    with pytest.raises(KeyError, match="no recorded Vicuna token count for 'Why\\?'"):
        vicuna_text_tokens("Why?")


def test_the_random_init_path_runs_end_to_end_on_a_shrunken_7b(tmp_path, monkeypatch):
    """``--random-init 7b`` as the GPU checklist runs it (five images, Vicuna-length prompts), on the CPU: the
    7B's geometry (CLIP at 336 px, AnyRes, the byte-level processor) with its widths and depths cut down.
    The first H100 run lost its efficiency step to a prompt that only this path builds."""
    shrink_random_init_7b(monkeypatch)
    argv = ["--random-init", "7b", "--device", "cpu", "--images", "5", "--new-tokens", "2"]
    main([*argv, "--out", str(tmp_path), "--variants", "vanilla@1", "globalcom2@0.1"])
    record = json.loads((tmp_path / "llava_next_7b_random_init_cpu.json").read_text())
    questions = [item.question for item in demo.generate_items("efficiency", size=5)]
    after_image = [len(f"\n{q} ASSISTANT:".encode()) for q in questions]  # byte-level tokens after the image
    assert any(
        n >= vicuna_text_tokens(q) for n, q in zip(after_image, questions, strict=True)
    )  # the hard case
    mean_text = sum(vicuna_text_tokens(q) for q in questions) / 5
    table = pd.read_csv(tmp_path / "llava_next_7b_random_init_cpu.csv")
    assert list(table["method"]) == ["vanilla", "globalcom2"] and (table["text tokens"] == mean_text).all()
    assert record["complete"] is True and not record["failures"]
