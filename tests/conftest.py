"""Shared fixtures: the tiny offline LLaVA-NeXT, deterministic synthetic images, offline environment."""

from __future__ import annotations

import os

# Never reach a hub from the tests: everything is built in code or generated.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch
from helpers import synthetic_image
from PIL import Image

from globalcom2.models.loader import load_tiny_llava_next

# (width, height) in pixels: one per AnyRes canvas family, plus a letterboxed one.
IMAGE_SIZES = [(336, 336), (672, 672), (1008, 336), (336, 1008), (800, 600)]


@pytest.fixture(scope="session")
def tiny():
    """``(model, processor)``: the tiny LLaVA-NeXT (seed 0, fp32, SDPA, CPU), shared by the session.

    Tests must leave it unmodified (attachments removed); ``test_attach`` checks that removal restores it.
    """
    return load_tiny_llava_next(seed=0)


@pytest.fixture(scope="session")
def images() -> dict[tuple[int, int], Image.Image]:
    return {size: synthetic_image(*size) for size in IMAGE_SIZES}


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield


@pytest.fixture
def model(tiny):
    """The shared tiny model; afterwards it must be unmodified (no method attached, no hook left)."""
    model, _ = tiny
    yield model
    assert type(model.model).__name__ == "LlavaNextModel", "a test left a method attached"
    assert all(not layer._forward_pre_hooks for layer in model.model.language_model.layers), (
        "hooks left behind"
    )


@pytest.fixture
def processor(tiny):
    return tiny[1]
