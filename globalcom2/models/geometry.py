"""AnyRes geometry: transformers' (the default) or the original LLaVA code's (``protocol=llava``).

The two codebases agree on the arithmetic of LLaVA-NeXT's AnyRes and differ in two places:

* **Grid ties.** LLaVA reads ``image_grid_pinpoints`` as ``(width, height)`` (haotian-liu/LLaVA c121f043,
  ``llava/mm_utils.py`` ``select_best_resolution`` L23-37, fed PIL's ``(W, H)``); transformers reads the
  same list as ``(height, width)`` (``image_processing_utils.select_best_resolution``). The llava-v1.6
  candidates are symmetric, so only ties differ, and both keep the first candidate on a tie. Small images
  tie: LLaVA picks a portrait 2 x 1 grid, transformers a landscape 1 x 2 one (300 x 200 gives 976 visual
  tokens in LLaVA, 1464 in transformers). Swapping each pinpoint pair hands transformers the candidates
  in LLaVA's order; its arithmetic then picks LLaVA's grid, in the processor and the model alike.
* **Unpadding.** LLaVA truncates with ``int(x)`` (``llava/model/llava_arch.py`` ``unpad_image`` L100-128);
  transformers uses ``int(round(x, 7))`` in its processor's token count and in ``unpad_image``. Under the
  LLaVA geometry both use ``globalcom2.anyres.unpadded_region(..., rounding="llava")``: the processor
  through an override of ``_get_unpadded_features`` on this processor instance, the model through
  ``pack_image_features`` on this model instance, which routes transformers' module-level
  ``unpad_image`` to LLaVA's arithmetic for the duration of its own call. While one such call runs, another
  model packing in another thread of the process gets LLaVA's rounding too; the swap is counted, so it
  never outlives the last call that holds it.

Only the instances passed to :func:`apply_geometry` change. Every consumer of the layout reads it from the
model config (``image_grid_pinpoints`` and ``globalcom2.anyres.unpad_rounding``), so the processor, the
model, our ``anyres`` layout, the FLOPs and every method see one geometry.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager
from typing import Any

import torch
from transformers.models.llava_next import modeling_llava_next

from globalcom2.anyres import UNPAD_ROUNDING_ATTR, unpadded_region

GEOMETRIES = ("transformers", "llava")


def llava_order(pinpoints: list[list[int]]) -> list[list[int]]:
    """``[[h, w], ...]`` -> ``[[w, h], ...]``: LLaVA's candidate order, read as transformers reads it."""
    return [[int(b), int(a)] for a, b in pinpoints]


def apply_geometry(model: Any, processor: Any, geometry: str) -> None:
    """Give this model and processor ``geometry`` (``"transformers"`` leaves them untouched)."""
    if geometry not in GEOMETRIES:
        raise ValueError(f"geometry={geometry!r}; valid: {', '.join(GEOMETRIES)}")
    if geometry == "transformers":
        return
    if getattr(model.config, UNPAD_ROUNDING_ATTR, None) == "llava":
        raise RuntimeError("the LLaVA geometry is already applied to this model")
    apply_config_geometry(model.config, geometry)
    apply_processor_geometry(processor, model.config)
    model.model.__class__ = _llava_model_class(type(model.model))


def apply_processor_geometry(processor: Any, config: Any) -> None:
    """Make ``processor`` count tokens with ``config``'s geometry (after :func:`apply_config_geometry`)."""
    processor.image_processor.image_grid_pinpoints = config.image_grid_pinpoints
    if getattr(config, UNPAD_ROUNDING_ATTR, None) == "llava":
        processor.__class__ = _llava_processor_class(type(processor))


def apply_config_geometry(config: Any, geometry: str) -> Any:
    """The config side of :func:`apply_geometry` (also for checks that read a config without a model)."""
    if geometry == "llava":
        config.image_grid_pinpoints = llava_order(config.image_grid_pinpoints)
        setattr(config, UNPAD_ROUNDING_ATTR, "llava")
    return config


def _llava_unpad_image(tensor: torch.Tensor, original_size: Any) -> torch.Tensor:
    """transformers' ``unpad_image`` contract (``[C, H, W]`` features, ``(height, width)`` size) with
    LLaVA's truncating arithmetic."""
    if isinstance(original_size, (torch.Tensor,)):
        original_size = original_size.tolist()
    height, width = (int(v) for v in original_size)
    (r0, r1), (c0, c1) = unpadded_region((height, width), tuple(tensor.shape[1:]), rounding="llava")
    return tensor[:, r0:r1, c0:c1]


#: transformers' own ``unpad_image`` while swapped, and how many packs hold the swap (overlapping packs in two
#: threads: the last one out restores the original, so the swap can never outlive them).
_UNPAD_SWAP: dict[str, Any] = {"holders": 0, "original": None}
_UNPAD_LOCK = threading.Lock()


@contextmanager
def _llava_unpadding():
    with _UNPAD_LOCK:
        if _UNPAD_SWAP["holders"] == 0:
            _UNPAD_SWAP["original"] = modeling_llava_next.unpad_image
            modeling_llava_next.unpad_image = _llava_unpad_image
        _UNPAD_SWAP["holders"] += 1
    try:
        yield
    finally:
        with _UNPAD_LOCK:
            _UNPAD_SWAP["holders"] -= 1
            if _UNPAD_SWAP["holders"] == 0:
                modeling_llava_next.unpad_image = _UNPAD_SWAP["original"]


def _llava_model_class(base: type) -> type:
    def pack_image_features(self: Any, *args: Any, **kwargs: Any) -> Any:
        with _llava_unpadding():
            return base.pack_image_features(self, *args, **kwargs)

    return type(f"LlavaGeometry{base.__name__}", (base,), {"pack_image_features": pack_image_features})


def _llava_processor_class(base: type) -> type:
    def _get_unpadded_features(
        self: Any,
        height: int,
        width: int,
        patches_height: int,
        patches_width: int,
        scale_height: int,
        scale_width: int,
    ) -> tuple[int, int]:
        canvas = (patches_height * scale_height, patches_width * scale_width)
        (r0, r1), (c0, c1) = unpadded_region((height, width), canvas, rounding="llava")
        return (r1 - r0) * (c1 - c0), r1 - r0

    return type(f"LlavaGeometry{base.__name__}", (base,), {"_get_unpadded_features": _get_unpadded_features})
