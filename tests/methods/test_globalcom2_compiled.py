"""GlobalCom²'s selection in a compiled model: the fixed-shape functions under ``torch.compile`` select what
eager selects, and a model compiled by ``compile_model`` hands its mode to the method."""

from __future__ import annotations

import pytest
import torch
from helpers import dynamo_eager_backend, prompt_inputs

from globalcom2 import attach
from globalcom2.anyres import packed_layout
from globalcom2.methods import globalcom2 as globalcom2_module
from globalcom2.methods.base import ImageContext
from globalcom2.methods.globalcom2 import GlobalCom2, compiled_selection
from globalcom2.models import compiled
from globalcom2.models.base import LLAVA_V16_GRID_PINPOINTS as PINPOINTS

#: Square, letterboxed both ways, a wide grid and an odd size: each a geometry of its own.
SIZES = [(672, 672), (600, 1000), (1000, 600), (336, 1344), (500, 700)]


def select(method: GlobalCom2, size, scores, compile_mode=None) -> torch.Tensor:
    layout = packed_layout(size, PINPOINTS)
    features = torch.zeros(layout.num_tokens, 1, device=scores.device)
    ctx = ImageContext(layout=layout, pixel_values=features, vision_scores=scores, compile_mode=compile_mode)
    return method.select(features, ctx)


def scores_for(size, seed: int, device="cpu") -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    views = packed_layout(size, PINPOINTS).num_views
    return (3 * torch.randn(views, 576, generator=generator) + 1).to(device)


def test_a_compiled_model_hands_its_mode_to_the_selection(model, processor, images, monkeypatch):
    """``compile_model`` marks the model, the hook puts the mode in every ``ImageContext``, and GlobalCom²
    runs its compiled selection in that mode; eager again once the handle is removed. (torch.compile is
    replaced by the function itself: the plumbing is what is tested, the slow test below the numerics.)"""
    monkeypatch.setattr(compiled.torch, "compile", lambda fn, mode, dynamic: fn)
    asked = []

    def spy(layout, mode):
        asked.append((layout, mode))
        return globalcom2_module.clean_selection

    monkeypatch.setattr(globalcom2_module, "compiled_selection", spy)
    inputs = prompt_inputs(processor, images[(672, 672)])
    with attach(model, "globalcom2", retention_ratio=0.25) as handle, torch.inference_mode():
        model(**inputs)
        with compiled.compile_model(model) as compiled_handle:
            assert compiled.compile_mode_of(model) == "default" == compiled_handle.mode
            model(**inputs)
        assert compiled.compile_mode_of(model) is None
        model(**inputs)
    assert asked == [("clean", "default")]
    assert handle.stats[0] == handle.stats[1] == handle.stats[2]


@pytest.mark.parametrize("layout", ["clean", "reference"])
def test_the_compiled_selection_is_whole_graphs_without_a_break(layout, monkeypatch):
    """Under dynamo (its ``eager`` backend: the same frames and graph breaks as inductor's, no kernels built),
    the selection is one graph per geometry: a graph break would split it into pieces, each entered from
    Python with guards of its own, which is the launch and host time the compiled selection is there to
    save (``math.isqrt`` of a symbolic size once cut it into six)."""
    from torch._dynamo.utils import counters

    dynamo_eager_backend(monkeypatch)
    torch._dynamo.reset()
    compiled_selection.cache_clear()
    counters.clear()
    try:
        method = GlobalCom2(retention_ratio=0.25, layout=layout)
        for index, size in enumerate(SIZES):
            scores = scores_for(size, seed=index)
            assert torch.equal(select(method, size, scores, "default"), select(method, size, scores))
        assert dict(counters["graph_break"]) == {}
        assert counters["frames"]["total"] == counters["frames"]["ok"] > 0
    finally:
        torch._dynamo.reset()
        compiled_selection.cache_clear()


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["clean", "reference"])
def test_the_inductor_compiled_selection_selects_what_eager_selects(layout):
    """Every geometry and ratio (0.05 leaves some crops none), through one compiled function (dynamic
    shapes): the same sources, position for position. Exact on these scores with the pinned torch; a
    reassociated norm could in principle swap two tokens whose scores tie to rounding (the CUDA test below
    allows for it)."""
    torch._dynamo.reset()
    compiled_selection.cache_clear()
    for ratio in (0.25, 0.1, 0.05):
        method = GlobalCom2(retention_ratio=ratio, layout=layout)
        for index, size in enumerate(SIZES):
            scores = scores_for(size, seed=index)
            assert torch.equal(select(method, size, scores, "default"), select(method, size, scores))
    compiled_selection.cache_clear()


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["default", "reduce-overhead"])
def test_the_compiled_selection_selects_what_eager_selects_on_cuda(mode):
    """On CUDA, fp16 scores as CLIP gives them. Under CUDA graphs each geometry is warmed up, recorded and
    replayed (three passes over all sizes), and every source is compared only after all of them ran: a
    replayed output that the next image's replay overwrote would differ (the method clones it).

    The kept count is the host's, so it must be equal; the positions may differ where two tokens' holistic
    scores are within rounding of each other at a crop's threshold, since inductor may sum the norms in
    another order than eager (``compiled_selection``). Such a swap moves a token or two of an image; a wrong
    geometry or an overwritten replay moves most of them, so at most 1 % may differ."""
    compiled_selection.cache_clear()
    method = GlobalCom2(retention_ratio=0.25)
    inputs = [(size, scores_for(size, seed=index, device="cuda").half()) for index, size in enumerate(SIZES)]
    eager = [select(method, size, scores) for size, scores in inputs]
    runs = [[select(method, size, scores, mode) for size, scores in inputs] for _ in range(3)]
    for sources in runs:
        for size, got, want in zip(SIZES, sources, eager, strict=True):
            assert got.shape == want.shape, size
            moved = want.numel() - torch.isin(got, want).sum().item()
            assert moved <= 0.01 * want.numel(), f"{size}: {moved} of {want.numel()} positions differ"
    compiled_selection.cache_clear()
