"""Which visual tokens survive: GlobalCom² vs random vs FastV on one image (the paper's qualitative figure).

``make visualize [IMAGE=path] [R=0.25] [PRETRAINED=tiny-trained]`` (``python -m globalcom2.report.visualize``)
draws, for each method, the thumbnail's 24x24 grid and the crops' unpadded token grid over the image,
dimming the tokens the method drops. Pre-LLM methods are asked directly (their ``select``, with the [CLS]
scores they use); FastV decides inside the LLM, so a read-only pre-hook on decoder layer K reads the
position ids of the rows that reach it (FastV keeps original positions, so they name the surviving prompt
positions).

By default the model is the trained tiny LLaVA-NeXT (``tiny-trained``) and the image is demo ``test`` item
:data:`DEMO_INDEX` (a colour question on a 1008x336 canvas, asked as the demo task asks it, which is what
FastV's text-guided choice reads), so the figure shows what a model that answers the demo's questions
attends to. ``--pretrained tiny`` gives the random-weight model: its selections show the mechanics only.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import torch
from matplotlib.patches import Rectangle
from PIL import Image

from globalcom2 import attach, load_llava_next
from globalcom2.anyres import SEPARATOR, PackedLayout, config_layout
from globalcom2.data.demo import ANSWER_INSTRUCTION, DEFAULT_SEED, DEFAULT_SIZE, make_item, render
from globalcom2.methods.direct import pre_llm_sources
from globalcom2.prompts import vicuna_v1_prompt
from globalcom2.report.plots import save, style

DEMO_INDEX = 9  # demo test item 9: "What color is the square?" (purple), 1008x336 canvas, 7 shapes, 3 crops
DEFAULT_PRETRAINED = "tiny-trained"
OUT_DIR = Path("results/visualize")
GENERIC_QUESTION = "Describe the image."


def pre_llm_kept(model: Any, method: Any, inputs: dict, layout: PackedLayout) -> torch.Tensor:
    """``[N]`` bool over the packed positions a pre-LLM method keeps for the (single) image of ``inputs``."""
    kept = torch.zeros(layout.num_tokens, dtype=torch.bool)
    kept[pre_llm_sources(model, method, inputs)[0].cpu()] = True
    return kept


def fastv_kept(model: Any, inputs: dict, ratio: float, K: int = 2) -> torch.Tensor:
    """``[N]`` bool over the packed positions whose rows reach decoder layer ``K`` under FastV."""
    seen: dict[str, torch.Tensor] = {}

    def read_positions(module: Any, args: tuple, kwargs: dict) -> None:
        seen.setdefault("positions", kwargs["position_ids"].detach().cpu())

    with attach(model, "fastv", retention_ratio=ratio, K=K):
        handle = model.model.language_model.layers[K].register_forward_pre_hook(
            read_positions, with_kwargs=True
        )
        try:
            with torch.no_grad():
                model(**inputs)
        finally:
            handle.remove()
    image = (
        (inputs["input_ids"][0] == model.config.image_token_id).nonzero().squeeze(1)
    )  # [N] prompt positions
    kept_positions = set(seen["positions"][0].tolist())  # FastV keeps original position ids
    return torch.tensor([int(p) in kept_positions for p in image.tolist()])


def token_boxes(layout: PackedLayout, size: tuple[int, int]) -> np.ndarray:
    """``[N, 5]`` (view kind, x0, y0, x1, y1) in image pixels for every packed position (kind 0 thumbnail,
    1 crop, -1 separator). The unpadded crop region covers the whole image, so it maps linearly onto it."""
    width, height = size
    side = layout.side
    (r0, r1), (c0, c1) = layout.valid_rows, layout.valid_cols
    boxes = np.zeros((layout.num_tokens, 5))
    for index, (view, token) in enumerate(zip(layout.view.tolist(), layout.token.tolist(), strict=True)):
        if view == SEPARATOR:
            boxes[index, 0] = -1
        elif view == 0:
            row, col = divmod(token, side)
            boxes[index] = (
                0,
                col * width / side,
                row * height / side,
                (col + 1) * width / side,
                (row + 1) * height / side,
            )
        else:
            crop_row, crop_col = divmod(view - 1, layout.grid[1])
            row = crop_row * side + token // side - r0
            col = crop_col * side + token % side - c0
            sx, sy = width / (c1 - c0), height / (r1 - r0)
            boxes[index] = (1, col * sx, row * sy, (col + 1) * sx, (row + 1) * sy)
    return boxes


def draw(
    image: Image.Image, selections: dict[str, torch.Tensor], layout: PackedLayout, ratio: float, out: Path
) -> list[Path]:
    """A (2 x methods) grid: thumbnail tokens above, crop tokens below; dropped tokens dimmed."""
    boxes = token_boxes(layout, image.size)
    with style():
        figure, axes = plt.subplots(2, len(selections), figsize=(3.6 * len(selections), 6.4), squeeze=False)
        for column, (name, kept) in enumerate(selections.items()):
            for row, kind in enumerate((0, 1)):
                ax = axes[row, column]
                ax.imshow(image)
                mask = boxes[:, 0] == kind
                for (_, x0, y0, x1, y1), keep in zip(
                    boxes[mask], kept[torch.from_numpy(mask)].tolist(), strict=True
                ):
                    if not keep:
                        ax.add_patch(
                            Rectangle((x0, y0), x1 - x0, y1 - y0, color="black", alpha=0.6, linewidth=0)
                        )
                share = 100.0 * float(kept[torch.from_numpy(mask)].float().mean())
                ax.set_title(
                    f"{name}: {'thumbnail' if kind == 0 else 'crops'} ({share:.0f}% kept)", fontsize=8
                )
                ax.axis("off")
        figure.suptitle(f"kept visual tokens at R = {ratio} (dimmed: dropped)", fontsize=9)
        figure.tight_layout()
        return save(figure, out.parent, out.name)


def demo_image(index: int = DEMO_INDEX) -> tuple[Image.Image, str]:
    """Demo ``test`` item ``index`` rendered, and its question with the demo task's answer instruction."""
    if not 0 <= index < DEFAULT_SIZE["test"]:
        raise ValueError(f"demo test items are 0..{DEFAULT_SIZE['test'] - 1}, got {index}")
    item = make_item(DEFAULT_SEED["test"], index)
    return render(item), item.question + ANSWER_INSTRUCTION


def visualize(
    image: str | Path | Image.Image,
    ratio: float,
    out: str | Path,
    pretrained: str = DEFAULT_PRETRAINED,
    question: str = GENERIC_QUESTION,
    **load_kwargs: Any,
) -> list[Path]:
    """Kept tokens of GlobalCom², random and FastV at ``ratio`` on one image; returns the PNG and PDF.

    Args:
        image: an image or the path of one.
        ratio: retention ratio R.
        out: output path without suffix (``.png`` and ``.pdf`` are written).
        pretrained: any name :func:`globalcom2.load_llava_next` takes.
        question: the prompt's text; only FastV's selection depends on it.
    """
    model, processor = load_llava_next(pretrained, **load_kwargs)
    if not isinstance(image, Image.Image):
        image = Image.open(image)
    image = image.convert("RGB")
    inputs = processor(images=image, text=vicuna_v1_prompt(question), return_tensors="pt").to(model.device)
    layout = config_layout(model.config, (image.height, image.width))
    selections = {}
    for name in ("globalcom2", "random"):
        with attach(model, name, retention_ratio=ratio) as handle:
            method = handle.method
        selections[name] = pre_llm_kept(model, method, inputs, layout)
    selections["fastv"] = fastv_kept(model, inputs, ratio)
    return draw(image, selections, layout, ratio, Path(out))


def default_out(image: Path | None, demo_index: int, ratio: float, pretrained: str) -> Path:
    """``results/visualize/<item>_<model>_r<R>``: the item (``demo_test_<index>`` or the image file's stem),
    the model (a folder's name) and the ratio, so that a figure of another ratio, model or image never
    overwrites this one."""
    item = image.stem if image is not None else f"demo_test_{demo_index}"
    return OUT_DIR / f"{item}_{Path(pretrained.rstrip('/')).name}_r{ratio}"


def main(argv: list[str] | None = None) -> list[Path]:
    parser = argparse.ArgumentParser(description="Kept-token overlay: GlobalCom² vs random vs FastV.")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--image", type=Path, help="an image file (default: a demo test item)")
    source.add_argument(
        "--demo-index", type=int, default=DEMO_INDEX, help=f"demo test item to draw (default {DEMO_INDEX})"
    )
    parser.add_argument("--ratio", type=float, default=0.25)
    parser.add_argument("--pretrained", default=DEFAULT_PRETRAINED)
    parser.add_argument("--out", type=Path, default=None, help="output path without suffix")
    args = parser.parse_args(argv)
    out = args.out or default_out(args.image, args.demo_index, args.ratio, args.pretrained)
    if args.image is not None:
        if not args.image.is_file():
            raise SystemExit(f"no image at {args.image}")
        image, question = args.image, GENERIC_QUESTION
    else:
        try:
            image, question = demo_image(args.demo_index)
        except ValueError as err:
            raise SystemExit(str(err)) from None
    paths = visualize(image, args.ratio, out, args.pretrained, question)
    for path in paths:
        print(path)
    return paths


if __name__ == "__main__":
    main()
