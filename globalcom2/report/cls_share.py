"""How much of the thumbnail's [CLS] attention falls on the demo's shapes, against a uniform spread.

GlobalCom² keeps the thumbnail tokens the last CLIP layer's [CLS] query attends to most, and gives each
crop a budget from the same map. That only helps if the [CLS] looks at the objects the questions ask
about. This tool measures it on the demo benchmark's ``test`` items, where the generator knows which
patch shows a shape (:func:`globalcom2.training.targets.view_labels`, thumbnail = view 0):

* ``attention_share``: the share of the thumbnail's [CLS] attention that falls on shape patches;
* ``patch_share``: the share of thumbnail patches that show a shape, i.e. what a uniform attention gives;
* ``ratio = attention_share / patch_share``: 1 is chance; a model whose [CLS] seeks the shapes is well
  above it. Both shares are means over the items (ratio of means, so items with tiny shapes weigh by
  their patch count, not as noisy per-item ratios).

The scores come from GlobalCom²'s own capture (:func:`globalcom2.methods.direct.image_features_and_scores`
at the method's ``score_layer``, -1 by default), with one difference, forced by the question: GlobalCom²
ranks by head-averaged *pre-softmax logits*, which have no share (they can be negative); here each head's
softmax over the 577 keys is averaged over heads and renormalised over the 576 patches, so the [CLS]'s
attention to itself does not count. Softmax is monotone per head, so a patch with a high logit in every
head has a high share too.

    python -m globalcom2.report.cls_share [--items 300] [--pretrained tiny tiny-trained] [--out PATH]
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from globalcom2 import load_llava_next
from globalcom2.atomic import atomic_write_json
from globalcom2.data.demo import DEFAULT_SEED, DEFAULT_SIZE, generate_items, render
from globalcom2.methods.direct import image_features_and_scores
from globalcom2.methods.globalcom2 import GlobalCom2
from globalcom2.models.preload import checkpoint_config
from globalcom2.provenance import provenance
from globalcom2.training.targets import MIN_COVERED_PIXELS, view_labels

DEFAULT_MODELS = ("tiny", "tiny-trained")
DEFAULT_OUT = Path("results/cls_share/cls_share.json")
SPLIT = "test"
# The layer GlobalCom² reads its [CLS] scores from, taken from the method itself (its default score_layer).
SCORE_LAYER = GlobalCom2(retention_ratio=1.0).score_layer
SCORE_KIND = "softmax"  # a share needs probabilities; see the module docstring


@dataclass(frozen=True)
class ClsShare:
    """The [CLS] attention share on shapes of one model over ``items`` demo items."""

    pretrained: str
    items: int
    attention_share: float  # mean over items of the [CLS] attention on shape patches / on all patches
    patch_share: float  # mean over items of the fraction of thumbnail patches that show a shape
    ratio: float | None  # attention_share / patch_share (None when no item has a shape patch)
    items_without_shape_patch: int  # items whose shapes are all too small to label a thumbnail patch


def thumbnail_share(scores: torch.Tensor, on_shape: torch.Tensor) -> float:
    """Share of the attention ``scores`` (``[576]``, non-negative) that falls on ``on_shape`` (``[576]`` bool)."""
    scores = scores.double()
    return float(scores[on_shape].sum() / scores.sum())


def measure(model: Any, processor: Any, pretrained: str, items: int) -> ClsShare:
    """:class:`ClsShare` of ``model`` over the first ``items`` demo ``test`` items."""
    attention, patches, without = [], [], 0
    for item in generate_items(SPLIT, size=items):
        inputs = processor.image_processor(images=render(item), return_tensors="pt").to(model.device)
        _, scores = image_features_and_scores(model, inputs, SCORE_LAYER, SCORE_KIND)
        views = scores[0]  # [V, 576], thumbnail first
        labels = view_labels(item, processor.image_processor).obj  # [V, 576], -1 = no shape
        if labels.shape != views.shape:
            raise RuntimeError(
                f"demo item {item.index}: the labels cover {tuple(labels.shape)} (views, patches), the vision "
                f"tower scored {tuple(views.shape)}; the label and model geometries disagree"
            )
        on_shape = labels[0] >= 0  # [576] thumbnail patches that show a shape
        without += not bool(on_shape.any())
        attention.append(thumbnail_share(views[0].cpu(), on_shape))
        patches.append(float(on_shape.double().mean()))
    attention_share, patch_share = sum(attention) / len(attention), sum(patches) / len(patches)
    return ClsShare(
        pretrained=pretrained,
        items=items,
        attention_share=attention_share,
        patch_share=patch_share,
        ratio=attention_share / patch_share if patch_share > 0 else None,
        items_without_shape_patch=without,
    )


def check_checkpoints(names: Sequence[str]) -> None:
    """Raise ``FileNotFoundError`` for the first checkpoint that is missing (``ValueError``, e.g.
    ``UnsupportedModelError``, for one that is no LLaVA-NeXT AnyRes), before any model loads.

    ``tiny-trained`` before it is committed, or a mistyped folder, would otherwise fail after minutes of
    measuring the models listed before it.
    """
    for name in names:
        checkpoint_config(name)


def table(results: Sequence[ClsShare]) -> str:
    """A Markdown table of the results."""
    lines = [
        "| model | items | [CLS] attention on shapes (%) | shape patches (%) | ratio (1 = uniform) |",
        "|---|---:|---:|---:|---:|",
    ]
    for r in results:
        lines.append(
            f"| {r.pretrained} | {r.items} | {100 * r.attention_share:.2f} | {100 * r.patch_share:.2f} | "
            f"{'n/a' if r.ratio is None else f'{r.ratio:.2f}'} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--items", type=int, default=DEFAULT_SIZE[SPLIT], help="demo test items (default: all 300)"
    )
    parser.add_argument(
        "--pretrained",
        nargs="+",
        default=list(DEFAULT_MODELS),
        help="models: tiny, tiny-trained or checkpoint folders (default: tiny tiny-trained)",
    )
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"JSON output (default {DEFAULT_OUT})")
    args = parser.parse_args(argv)
    if not 1 <= args.items <= DEFAULT_SIZE[SPLIT]:
        parser.error(f"--items must be in [1, {DEFAULT_SIZE[SPLIT]}], got {args.items}")
    try:
        check_checkpoints(args.pretrained)
    except (FileNotFoundError, ValueError) as err:  # ValueError: not LLaVA-NeXT AnyRes, or not a name at all
        raise SystemExit(f"cls-share: {err}") from None
    results = []
    for name in args.pretrained:
        model, processor = load_llava_next(name)
        model.eval()
        results.append(measure(model, processor, name, args.items))
        print(f"{name}: done", flush=True)
    record = {
        "split": SPLIT,
        "seed": DEFAULT_SEED[SPLIT],
        "items": args.items,
        "score_layer": SCORE_LAYER,
        "attention": "per-head softmax over the 577 keys, mean over heads, renormalised over the 576 patches",
        "shape_patch": f"thumbnail patch with >= {MIN_COVERED_PIXELS} of its 14x14 pixels on one shape",
        "models": [asdict(r) for r in results],
        "provenance": provenance(),
    }
    atomic_write_json(args.out, record)
    print(table(results))
    print(f"written: {args.out}")
    return record


if __name__ == "__main__":
    main()
