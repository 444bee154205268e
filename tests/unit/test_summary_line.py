"""The console digest of a finished cell (``globalcom2.run.summary_line``)."""

from __future__ import annotations

from types import SimpleNamespace

from globalcom2.run import summary_line


def _record(unread: dict[str, int]) -> SimpleNamespace:
    return SimpleNamespace(
        paper_metrics={"POPE": {"value": 85.123}},
        metrics={},
        efficiency={"prefill_ms": {"median": 12.34}, "tflops": {"full": 1.5}},
        wall_s=42.0,
        samples={"samples": 10, "unread_answers": unread},
    )


def test_answers_the_protocol_could_not_read_are_named_in_the_digest():
    assert summary_line(_record({})) == "POPE=85.12 | prefill 12.3 ms | TFLOPs(full) 1.5000 | 42 s"
    line = summary_line(_record({"pope_adv_local": 3, "scienceqa_img_local": 1}))
    assert line.endswith(
        "| unread answers, scored as the protocol's default: pope_adv_local 3, scienceqa_img_local 1"
    )
