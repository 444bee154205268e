"""``python -m globalcom2.perf.divprune_lockstep``: both ways timed, their positions checked equal."""

from __future__ import annotations

import json

import pytest

from globalcom2.perf import divprune_lockstep


@pytest.mark.slow
def test_the_bench_times_both_ways_and_names_the_default(tmp_path):
    record = divprune_lockstep.main(
        ["--repeats", "4", "--warmup", "0", "--width", "8", "--out", str(tmp_path)]
    )
    names = [row["variant"] for row in record["rows"]]
    assert len(names) == 2 * len(divprune_lockstep.CALL_SIZES) * len(divprune_lockstep.RATIOS)
    assert "16 image(s), R=0.1, lockstep" in names and "16 image(s), R=0.1, one at a time" in names
    assert all(row["median (ms)"] > 0 for row in record["rows"])
    assert (
        record["default"] == "one at a time"
    )  # on a CPU (globalcom2.methods.divprune.LOCKSTEP_DEVICE_TYPES)
    saved = json.loads((tmp_path / "divprune_lockstep_cpu.json").read_text())
    assert saved["rows"] == record["rows"] and "same positions both ways (checked)" in saved["caption"]


def test_a_lockstep_that_kept_other_positions_would_be_caught(monkeypatch):
    """The bench refuses to time two ways that disagree (here: lockstep made to drop each image's last pick)."""
    from globalcom2.methods import divprune

    real = divprune.DivPrune.select_images

    def off_by_one(self, features, contexts, lockstep=None):
        kept = real(self, features, contexts, lockstep)
        return [k[:-1] if lockstep and k is not None else k for k in kept]

    monkeypatch.setattr(divprune.DivPrune, "select_images", off_by_one)
    monkeypatch.setattr(divprune_lockstep, "CALL_SIZES", (2,))
    with pytest.raises(AssertionError, match="lockstep keeps other positions than alone"):
        divprune_lockstep.check_same_positions(divprune_lockstep.torch.device("cpu"), 8)
