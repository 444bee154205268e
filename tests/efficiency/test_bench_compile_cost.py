"""The compile-cost benchmark: the real depths with narrowed widths, each run's warm-ups read back per variant."""

from __future__ import annotations

import json

from globalcom2.models import random_init
from globalcom2.perf import compile_cost, efficiency


def test_the_narrowed_model_keeps_every_depth_and_head_dimension(monkeypatch):
    monkeypatch.setitem(random_init.VICUNA, "7b", dict(random_init.VICUNA["7b"]))  # restored afterwards
    monkeypatch.setattr(random_init, "CLIP_L_336", dict(random_init.CLIP_L_336))
    real = random_init.llava_next_config_for("llava-hf/llava-v1.6-vicuna-7b-hf")
    compile_cost.narrow_random_init("7b")
    narrow = random_init.llava_next_config_for("llava-hf/llava-v1.6-vicuna-7b-hf")
    for part in ("text_config", "vision_config"):
        real_part, narrow_part = getattr(real, part), getattr(narrow, part)
        assert narrow_part.num_hidden_layers == real_part.num_hidden_layers
        assert narrow_part.hidden_size < real_part.hidden_size
        head = lambda c: c.hidden_size // c.num_attention_heads  # noqa: E731
        assert head(narrow_part) == head(real_part), part
    assert (real.text_config.num_hidden_layers, real.vision_config.num_hidden_layers) == (32, 24)


def test_a_child_runs_one_compiled_phase_of_the_efficiency_benchmark_on_the_narrowed_model(
    tmp_path, monkeypatch
):
    monkeypatch.setitem(random_init.VICUNA, "13b", dict(random_init.VICUNA["13b"]))
    monkeypatch.setattr(random_init, "CLIP_L_336", dict(random_init.CLIP_L_336))
    seen = {}

    def fake_main(argv):
        seen["argv"] = argv
        seen["width"] = random_init.llava_next_config_for(
            "llava-hf/llava-v1.6-vicuna-13b-hf"
        ).text_config.hidden_size

    monkeypatch.setattr(efficiency, "main", fake_main)
    compile_cost.main(["--size", "13b", "--variants", "vanilla@1", "fastv@0.1", "--child", str(tmp_path)])
    argv = seen["argv"]
    assert argv[argv.index("--random-init") + 1] == "13b" and "--compile" in argv
    assert argv[argv.index("--variants") + 1 : argv.index("--out")] == ["vanilla@1", "fastv@0.1"]
    assert seen["width"] == compile_cost.NARROW["language"]["hidden_size"]


def test_every_runs_warm_ups_are_tabulated_per_variant_with_their_frames(tmp_path, monkeypatch):
    """The cold run must come first and share its cache folder with the warm one, whose process then loads
    the model anew (reloaded); the table takes only the compiled phase's rows. (That the efficiency
    benchmark's own JSON reads so: test_bench_efficiency.py.)"""
    calls = []

    def fake_run(args, cache, outs):
        calls.append((cache, [out.name for out in outs]))
        records = []
        for out in outs:
            vanilla_s = {"cold": 180.0, "warm": 84.0, "reloaded": 2.0}[out.name]
            rows = [
                {"method": "vanilla", "retention_ratio": 1.0, "compile": "no", "warmup_s": 0.1},
                {"method": "vanilla", "retention_ratio": 1.0, "compile": "default", "warmup_s": vanilla_s,
                 "warmup_frames_compiled": 0 if out.name == "reloaded" else 130},
                {"method": "fastv", "retention_ratio": 0.1, "compile": "default", "warmup_s": 0.6,
                 "warmup_frames_compiled": 3},
            ]  # fmt: skip
            frames = {"frames_total": 133, "frames_compiled": 133, "graphs": 105 if out.name == "cold" else 0}
            records.append({"rows": rows, "dynamo_frames": {"sdpa default": frames}})
        return records

    monkeypatch.setattr(compile_cost, "run_once", fake_run)
    record = compile_cost.main(["--out", str(tmp_path)])
    assert calls[0][0] == calls[1][0] and [names for _, names in calls] == [["cold"], ["warm", "reloaded"]]
    assert record["rows"] == [
        {"method": "vanilla", "R": 1.0, "warm-up cold (s)": 180.0, "frames cold": 130, "warm-up warm (s)": 84.0,
         "frames warm": 130, "warm-up reloaded (s)": 2.0, "frames reloaded": 0, "eager warm-up reloaded (s)": 0.1},
        {"method": "fastv", "R": 0.1, "warm-up cold (s)": 0.6, "frames cold": 3, "warm-up warm (s)": 0.6,
         "frames warm": 3, "warm-up reloaded (s)": 0.6, "frames reloaded": 3, "eager warm-up reloaded (s)": None},
    ]  # fmt: skip
    assert "cold: 133 of 133 dynamo frames compiled, 105 graphs" in record["caption"]
    written = json.loads((tmp_path / "compile_cost_7b_cpu.json").read_text())
    assert written["rows"] == record["rows"] and written["narrowed"] == compile_cost.NARROW
    assert "| vanilla" in (tmp_path / "compile_cost_7b_cpu.md").read_text()


def test_a_child_runs_one_phase_per_folder_in_one_process_and_no_reuse_turns_sharing_off(
    tmp_path, monkeypatch
):
    from globalcom2.models import compiled

    seen = []
    monkeypatch.setattr(
        efficiency, "main", lambda argv: seen.append((argv[argv.index("--out") + 1], compiled.REUSE_GRAPHS))
    )
    monkeypatch.setitem(random_init.VICUNA, "7b", dict(random_init.VICUNA["7b"]))
    monkeypatch.setattr(random_init, "CLIP_L_336", dict(random_init.CLIP_L_336))
    monkeypatch.setattr(compiled, "REUSE_GRAPHS", True)  # restored afterwards
    compile_cost.main(["--child", str(tmp_path / "warm"), str(tmp_path / "reloaded")])
    assert seen == [(str(tmp_path / "warm"), True), (str(tmp_path / "reloaded"), True)]
    seen.clear()
    compile_cost.main(["--no-reuse", "--child", str(tmp_path / "warm")])
    assert seen == [(str(tmp_path / "warm"), False)]


def test_the_no_reuse_baseline_is_forwarded_and_written_apart(tmp_path, monkeypatch):
    forwarded = []

    def fake_run(args, cache, outs):
        forwarded.append(args.forwarded)
        rows = [{"method": "vanilla", "retention_ratio": 1.0, "compile": "default", "warmup_s": 50.0,
                 "warmup_frames_compiled": 120}]  # fmt: skip
        frames = {"frames_total": 120, "frames_compiled": 120, "graphs": 96}
        return [{"rows": rows, "dynamo_frames": {"sdpa default": frames}} for _ in outs]

    monkeypatch.setattr(compile_cost, "run_once", fake_run)
    record = compile_cost.main(["--no-reuse", "--out", str(tmp_path)])
    assert all("--no-reuse" in argv for argv in forwarded) and len(forwarded) == 2
    assert "share no code" in record["caption"]
    assert (tmp_path / "compile_cost_7b_cpu_no_reuse.json").is_file()
    assert not (tmp_path / "compile_cost_7b_cpu.json").exists()
