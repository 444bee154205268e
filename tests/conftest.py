"""Shared fixtures: the tiny offline LLaVA-NeXT, deterministic synthetic images, offline environment."""

from __future__ import annotations

import os

# Never reach a hub from the tests: everything is built in code or generated.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np
import pytest
import torch
from PIL import Image

from globalcom2.models.tiny import build_tiny_llava_next

# (width, height) in pixels: one per AnyRes canvas family, plus a letterboxed one.
IMAGE_SIZES = [(336, 336), (672, 672), (1008, 336), (336, 1008), (800, 600)]


def synthetic_image(width: int, height: int, seed: int = 0) -> Image.Image:
    """Smooth colour gradients plus noise: every crop differs, so every token carries information."""
    rng = np.random.default_rng(seed + 7919 * width + height)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    base = np.stack(
        [np.sin(x / (17 + seed)), np.cos(y / (23 + seed)), np.sin((x + y) / (31 + seed))], axis=-1
    )
    pixels = 127.5 * (base + 1) + rng.normal(0, 25, size=(height, width, 3))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


@pytest.fixture(scope="session")
def tiny():
    """``(model, processor)``: the tiny LLaVA-NeXT (seed 0, fp32, SDPA, CPU), shared by the session.

    Tests must leave it unmodified (attachments removed); ``test_attach`` checks that removal restores it.
    """
    return build_tiny_llava_next(seed=0)


@pytest.fixture(scope="session")
def images() -> dict[tuple[int, int], Image.Image]:
    return {size: synthetic_image(*size) for size in IMAGE_SIZES}


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield
