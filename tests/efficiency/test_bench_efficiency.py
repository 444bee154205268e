"""``make bench-efficiency``: the interleaved Tables 8/9 protocol writes a complete, consistent table."""

from __future__ import annotations

import argparse
import json
import re

import pandas as pd
import pytest
import torch

from globalcom2.perf.efficiency import main, parse_variant

VARIANTS = ["vanilla@1", "globalcom2@0.5", "globalcom2@0.1", "random@0.25", "fastv@0.25", "sparsevlm@0.25"]


def run_bench(tmp_path, device: str) -> tuple[pd.DataFrame, dict]:
    args = ["--images", "2", "--new-tokens", "2", "--device", device, "--out", str(tmp_path)]
    main([*args, "--variants", *VARIANTS])
    stem = tmp_path / f"tiny_{device}"
    assert stem.with_suffix(".md").read_text().startswith("**Efficiency, tiny")
    return pd.read_csv(stem.with_suffix(".csv")), json.loads(stem.with_suffix(".json").read_text())


def check_table(table: pd.DataFrame) -> None:
    assert list(zip(table["method"], table["R"], strict=True)) == [parse_variant(v) for v in VARIANTS]
    vanilla = table.iloc[0]
    assert vanilla["visual tokens (layer mean)"] == 2928  # 672x672: thumbnail, 2x2 crops, 48 separators
    assert vanilla["prefill speed-up (x)"] == 1.0 and vanilla["throughput gain (x)"] == 1.0
    globalcom2 = table[table["method"] == "globalcom2"].sort_values("R")
    assert globalcom2["visual tokens (layer mean)"].is_monotonic_increasing
    assert globalcom2["TFLOPs (full)"].is_monotonic_increasing
    compressed = table.iloc[1:]
    assert (compressed["visual tokens (layer mean)"] < 2928).all()
    assert (compressed["TFLOPs (full)"] < vanilla["TFLOPs (full)"]).all()
    assert (compressed["KV cache (MB)"] < vanilla["KV cache (MB)"]).all()
    assert (table["prefill (ms)"] > 0).all()


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
    assert set(table["peak memory (GB)"]) == {"n/a (CPU)"}
    assert record["provenance"]["hardware"]["cuda_available"] == torch.cuda.is_available()
    assert record["settings"]["images"] == 2 and record["settings"]["dtype"] == "float32"


@pytest.mark.gpu
def test_gpu_table_reports_peak_memory(tmp_path):
    table, record = run_bench(tmp_path, "cuda")
    check_table(table)
    peaks = pd.to_numeric(table["peak memory (GB)"])
    assert (peaks > 0).all() and peaks.iloc[0] >= peaks.max() - 1e-6  # vanilla holds the most tokens
    assert record["provenance"]["hardware"]["gpu"]
