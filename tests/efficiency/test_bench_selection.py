"""``make bench-globalcom2``: every variant is timed, interleaved, and written with its provenance."""

from __future__ import annotations

import json

import pytest
import torch

from globalcom2.perf.globalcom2_selection import TARGETS, main
from globalcom2.perf.timing import time_interleaved
from globalcom2.perf.variant_table import summarise


def test_writes_every_row_and_the_target_verdict(tmp_path):
    from globalcom2.methods.globalcom2 import compiled_selection

    # graphs an earlier test compiled for the selection would be reused, and counted as no frame
    torch._dynamo.reset()
    compiled_selection.cache_clear()
    record = main(["--repeats", "4", "--warmup", "1", "--out", str(tmp_path)])
    names = [row["variant"] for row in record["rows"]]
    target_row, target_ms = TARGETS["cpu"]
    assert names[0].startswith("calibration") and {row for row, _ in TARGETS.values()} <= set(names)
    assert {"[CLS] scores only, tiny d=64", "[CLS] scores only, CLIP-L d=1024"} <= set(names)
    assert sum(name.startswith("scores + selection") for name in names) == 6 + 2  # 2 layouts x 3 cases,
    # and the 672x672 clean selection compiled in the default mode at both widths (no CUDA graphs on a CPU)
    assert [name for name in names if "compiled" in name] == [
        "scores + selection, 672x672, tiny d=64, clean, compiled (default)",
        "scores + selection, 672x672, CLIP-L d=1024, clean, compiled (default)",
    ]
    assert all(row["p25 (ms)"] > 0 for row in record["rows"])
    target = next(row for row in record["rows"] if row["variant"] == target_row)
    assert record["target"] == {"row": target_row, "ms": target_ms, "met": target["median (ms)"] <= target_ms}
    assert "inputs in float32" in record["caption"]
    # the compiled rows time whole graphs: every frame compiled, none split by a graph break
    frames = record["dynamo_frames"]
    assert frames["frames_total"] == frames["frames_compiled"] > 0 and frames["graph_breaks"] == 0, frames
    assert f"{frames['graphs']} graphs, 0 graph breaks" in record["caption"]
    written = json.loads((tmp_path / "globalcom2_selection_cpu.json").read_text())
    assert written["rows"] == record["rows"] and written["settings"]["repeats"] == 4
    assert "torch" in written["provenance"]["versions"]
    assert (tmp_path / "globalcom2_selection_cpu.md").read_text().startswith("**GlobalCom² per image")


def test_rows_report_the_quartiles_of_the_timings_in_milliseconds():
    """Interpolated between the sorted timings, never outside them: two timings of 50 and 100 ms have a
    p25 of 62.5, where ``statistics.quantiles``' default method extrapolated to 37.5."""
    rows = summarise({"a": [0.005, 0.001, 0.003, 0.002, 0.004], "b": [0.010] * 4, "c": [0.050, 0.100]})
    assert rows[0] == {"variant": "a", "median (ms)": pytest.approx(3.0), "p25 (ms)": pytest.approx(2.0),
                       "p75 (ms)": pytest.approx(4.0)}  # fmt: skip
    assert [rows[1][k] for k in ("p25 (ms)", "median (ms)", "p75 (ms)")] == pytest.approx([10.0] * 3)
    assert [rows[2][k] for k in ("p25 (ms)", "median (ms)", "p75 (ms)")] == pytest.approx([62.5, 75.0, 87.5])


def test_variants_are_timed_round_robin_after_the_warmup():
    calls = []
    samples = time_interleaved(
        {name: (lambda name=name: calls.append(name)) for name in "abc"}, repeats=2, warmup=2
    )
    rounds = [calls[i : i + 3] for i in range(0, len(calls), 3)]
    assert rounds == [list("abc"), list("bca"), list("cab"), list("abc")], (
        "every round calls every variant once, the order rotated so none always follows the same one"
    )
    assert [len(v) for v in samples.values()] == [2, 2, 2], "warm-up rounds are not recorded"


def test_too_few_repeats_fail_loudly(tmp_path):
    with pytest.raises(SystemExit):
        main(["--repeats", "2", "--out", str(tmp_path)])


@pytest.mark.gpu
def test_runs_on_cuda(tmp_path):
    record = main(["--repeats", "4", "--warmup", "1", "--device", "cuda", "--out", str(tmp_path)])
    assert (tmp_path / "globalcom2_selection_cuda.json").exists()
    assert record["provenance"]["hardware"]["gpu"] and "cuda" in record["caption"]
    assert record["target"]["row"] == TARGETS["cuda"][0] and "inputs in bfloat16" in record["caption"]


def test_interleaved_timing_waits_for_the_device_under_test_only(monkeypatch):
    """A CPU benchmark on a GPU machine waits for no GPU; a CUDA one starts each call on its own idle device
    (``cuda:1`` too, not whichever device is current) and times it with events recorded there."""
    log = []

    class FakeEvent:
        def __init__(self, enable_timing):
            assert enable_timing
            self.at = None

        def record(self):
            log.append(("record", current[-1]))
            self.at = len(log)

        def synchronize(self):
            log.append("wait")

        def elapsed_time(self, other):
            return 2.5  # ms

    class FakeDevice:
        def __init__(self, device):
            self.device = device

        def __enter__(self):
            current.append(self.device)

        def __exit__(self, *exc):
            current.pop()

    current = ["cuda:0"]
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: log.append(("sync", device)))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "Event", FakeEvent)
    monkeypatch.setattr(torch.cuda, "device", FakeDevice)
    time_interleaved({"a": lambda: None, "b": lambda: None}, repeats=2, warmup=1)
    assert log == []
    samples = time_interleaved({"a": lambda: log.append("call")}, repeats=2, warmup=1, device="cuda:1")
    one_call = [("sync", torch.device("cuda:1")), ("record", torch.device("cuda:1")), "call",
                ("record", torch.device("cuda:1")), "wait"]  # fmt: skip
    assert log == one_call * 3 and samples == {"a": [0.0025, 0.0025]}
