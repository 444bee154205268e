"""``make visualize``: by default a demo test item and the trained tiny model; an image file when given."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
from PIL import Image

from globalcom2.data.demo import ANSWER_INSTRUCTION, make_item
from globalcom2.report import visualize

REPO = Path(__file__).resolve().parents[2]


def test_the_default_demo_item_is_a_colour_question_on_a_high_resolution_canvas():
    image, question = visualize.demo_image()
    item = make_item(0, visualize.DEMO_INDEX)  # the test split's seed
    assert item.question_type == "color" and (item.width, item.height) in {(1008, 336), (672, 672)}
    assert image.size == (item.width, item.height)
    assert question == item.question + ANSWER_INSTRUCTION  # as the demo task asks it
    with pytest.raises(ValueError, match=r"demo test items are 0\.\.299"):
        visualize.demo_image(300)


def test_without_an_image_the_cli_draws_the_demo_item_with_the_trained_model(monkeypatch):
    calls = []
    monkeypatch.setattr(visualize, "visualize", lambda *args: calls.append(args) or [])
    visualize.main([])
    visualize.main(["--image", __file__, "--ratio", "0.5", "--pretrained", "tiny"])  # any existing file
    (image, ratio, out, pretrained, question), from_file = calls
    assert isinstance(image, Image.Image) and (ratio, pretrained) == (0.25, "tiny-trained")
    assert out == Path(f"results/visualize/demo_test_{visualize.DEMO_INDEX}_tiny-trained_r0.25")
    assert question.startswith("What color is the")
    assert from_file[1:4] == (0.5, Path(f"results/visualize/{Path(__file__).stem}_tiny_r0.5"), "tiny")
    assert from_file[4] == visualize.GENERIC_QUESTION


def test_visualize_renders_the_demo_item(tmp_path):
    paths = visualize.main(["--pretrained", "tiny", "--out", str(tmp_path / "demo_test_9")])
    assert [p.name for p in paths] == ["demo_test_9.png", "demo_test_9.pdf"]
    assert all(p.stat().st_size > 10_000 for p in paths)


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_make_visualize_defaults_to_the_demo_item_and_the_trained_model(tmp_path):
    def dry_run(*variables: str) -> str:
        done = subprocess.run(
            ["make", "-n", "visualize", f"RESULTS={tmp_path}", *variables],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 0, done.stderr
        return " ".join(done.stdout.split())

    default = dry_run()
    assert '--pretrained "tiny-trained"' in default
    assert f'--demo-index 9 --out "{tmp_path}/visualize/demo_test_9_tiny-trained_r0.25"' in default
    assert "--image" not in default
    given = dry_run("IMAGE=x.png", "PRETRAINED=tiny")
    assert f'--image "x.png" --out "{tmp_path}/visualize/x_tiny_r0.25"' in given
    assert '--pretrained "tiny"' in given and "--demo-index" not in given
