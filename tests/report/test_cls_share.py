"""The [CLS]-share measurement (``make cls-share``): real attention, the right patches, a JSON record."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from globalcom2 import load_llava_next
from globalcom2.data.demo import generate_items, render
from globalcom2.methods.globalcom2 import GlobalCom2
from globalcom2.report import cls_share
from globalcom2.training.targets import view_labels

REPO = Path(__file__).resolve().parents[2]


def test_the_share_is_of_the_layer_globalcom2_reads():
    assert cls_share.SCORE_LAYER == GlobalCom2(retention_ratio=0.25).vision_score_layer == -1


def test_thumbnail_share_against_uniform_and_concentrated_attention():
    on_shape = torch.zeros(576, dtype=torch.bool)
    on_shape[:36] = True
    assert cls_share.thumbnail_share(torch.full((576,), 0.5), on_shape) == pytest.approx(36 / 576)
    concentrated = torch.zeros(576)
    concentrated[:36] = 1.0
    assert cls_share.thumbnail_share(concentrated, on_shape) == 1.0


def test_the_share_is_the_last_layer_cls_attention_on_the_thumbnail_shapes():
    """Recomputed from CLIP's own eager attention probabilities, not from the capture under test."""
    model, processor = load_llava_next("tiny", attn_implementation="eager")
    result = cls_share.measure(model, processor, "tiny", items=2)
    expected, patches = [], []
    for item in generate_items("test", size=2):
        pixels = processor.image_processor(images=render(item), return_tensors="pt")["pixel_values"][0]
        with torch.no_grad():
            attentions = model.model.vision_tower(
                pixels, output_attentions=True
            ).attentions  # L x [V, h, T, T]
        cls_row = attentions[-1][0, :, 0, 1:].mean(0)  # thumbnail: [576] mean over heads, [CLS] key dropped
        on_shape = view_labels(item, processor.image_processor).obj[0] >= 0
        expected.append(float(cls_row[on_shape].sum() / cls_row.sum()))
        patches.append(float(on_shape.float().mean()))
    assert result.attention_share == pytest.approx(sum(expected) / 2, rel=1e-5)
    assert result.patch_share == pytest.approx(sum(patches) / 2)
    assert 0 < result.patch_share < 0.5


def test_cls_share_cli_on_three_items_of_the_random_tiny_model(tmp_path, capsys):
    out = tmp_path / "cls_share" / "cls_share.json"
    cls_share.main(["--items", "3", "--pretrained", "tiny", "--out", str(out)])
    record = json.loads(out.read_text())
    (row,) = record["models"]
    assert row["pretrained"] == "tiny" and row["items"] == 3 == record["items"]
    assert record["score_layer"] == -1 and "git" in record["provenance"]
    assert 0 < row["attention_share"] < 1 and math.isfinite(row["attention_share"])
    assert 0 < row["patch_share"] < 1
    assert row["ratio"] == pytest.approx(row["attention_share"] / row["patch_share"])
    printed = capsys.readouterr().out
    assert "| tiny | 3 |" in printed and f"{row['ratio']:.2f}" in printed
    assert not list(out.parent.glob(".*")), "the JSON is written atomically (no temporary file left)"


def test_a_missing_checkpoint_fails_before_any_model_loads(tmp_path, monkeypatch):
    loaded = []
    monkeypatch.setattr(cls_share, "load_llava_next", lambda name: loaded.append(name))
    with pytest.raises(SystemExit, match=r"cls-share: .*no such checkpoint folder"):
        cls_share.main(["--pretrained", "tiny", str(tmp_path / "nope"), "--out", str(tmp_path / "out.json")])
    assert not loaded and not (tmp_path / "out.json").exists()
    other = tmp_path / "bert"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(SystemExit, match=r"cls-share: .*bert"):  # one line, not a traceback
        cls_share.main(["--pretrained", str(other), "--out", str(tmp_path / "out.json")])
    assert not loaded


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_make_cls_share_runs_the_module_into_results(tmp_path):
    done = subprocess.run(
        ["make", "-n", "cls-share", f"RESULTS={tmp_path}", "ARGS=--items 3"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert (
        f"-m globalcom2.report.cls_share --out {tmp_path}/cls_share/cls_share.json --items 3" in done.stdout
    )
    phony = " ".join((REPO / "Makefile").read_text().split("help:")[0].split())
    assert "cls-share" in phony.split(".PHONY:")[1]
    assert (
        subprocess.run(["make", "help"], cwd=REPO, capture_output=True, text=True).stdout.count("cls-share")
        == 1
    )
