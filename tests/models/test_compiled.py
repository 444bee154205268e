"""Compile mode (``globalcom2.models.compiled``): the same answers as eager, hooks kept outside, loud refusals."""

from __future__ import annotations

import pytest
import torch
from helpers import generate_steps, prompt_inputs

from globalcom2 import attach
from globalcom2.models import compiled
from globalcom2.models.compiled import compile_model, compile_problem, resolve_compile

STEPS = 4


@pytest.fixture(scope="module")
def prompts(tiny, images):
    processor = tiny[1]
    return [
        prompt_inputs(processor, images[(672, 672)], "What is in the image?"),
        prompt_inputs(processor, images[(800, 600)], "Which colour is on the left side of it?"),
    ]


@pytest.mark.slow
@pytest.mark.parametrize(
    ("method", "params"),
    [("vanilla", {}), ("globalcom2", {"retention_ratio": 0.25}), ("fastv", {"retention_ratio": 0.25})],
)
def test_compiled_prefill_equals_eager(model, prompts, method, params):
    """Greedy answers identical, per-step logits within float reassociation, on prompts of two lengths."""
    with attach(model, method, **params):
        eager = [generate_steps(model, inputs, STEPS) for inputs in prompts]
        with compile_model(model) as handle:
            assert handle.mode == "default"
            compiled_runs = [generate_steps(model, inputs, STEPS) for inputs in prompts]
    for (tokens, logits), (compiled_tokens, compiled_logits) in zip(eager, compiled_runs, strict=True):
        assert torch.equal(tokens, compiled_tokens)
        torch.testing.assert_close(compiled_logits, logits, atol=1e-4, rtol=1e-4)


@pytest.mark.slow
def test_remove_restores_the_eager_forwards_and_hooked_layers_stay_eager(model, prompts):
    layers = [*model.model.vision_tower.encoder.layers, *model.model.language_model.layers]
    with attach(model, "globalcom2", retention_ratio=0.5) as globalcom2, torch.inference_mode():
        model(**prompts[0])
        eager_stats, eager_scores_layer = globalcom2.stats[-1], model.model.vision_tower.encoder.layers[-1]
    with compile_model(model) as handle:
        assert all("forward" in vars(layer) for layer in layers)
        with pytest.raises(ValueError, match="already compiled"):
            compile_model(model)
        with attach(model, "globalcom2", retention_ratio=0.5) as globalcom2, torch.inference_mode():
            # the [CLS] capture hooks the last CLIP layer's projections: that layer runs eager, so the capture
            # sees every view and the selection is the eager one
            assert compiled._has_hooks(
                [m for m in eager_scores_layer.modules() if m is not eager_scores_layer]
            )
            model(**prompts[0])
            assert globalcom2.stats[-1] == eager_stats
    assert handle.active is False
    assert not any("forward" in vars(layer) for layer in layers)


def test_compile_settings_are_checked_with_the_valid_choices(monkeypatch):
    assert resolve_compile(False, "cuda") is None and resolve_compile(None, "cpu") is None
    assert resolve_compile(True, "cuda:0") == "reduce-overhead" and resolve_compile(True, "cpu") == "default"
    assert resolve_compile("max-autotune", "cpu") == "max-autotune"
    with pytest.raises(ValueError, match="compile must be true, false or one of default, reduce-overhead"):
        resolve_compile("fast", "cpu")
    assert "CUDA graphs, which need a CUDA device" in compile_problem("cpu", "reduce-overhead")
    assert compile_problem("cpu", "default") is None
    monkeypatch.setattr(compiled.shutil, "which", lambda name: None)
    assert "needs a C++ compiler" in compile_problem("cpu", "default")


def test_a_missing_backend_is_refused_before_anything_is_compiled(model, monkeypatch):
    monkeypatch.setattr(compiled.shutil, "which", lambda name: None)
    with pytest.raises(RuntimeError, match=r"torch.compile on CPU needs a C\+\+ compiler"):
        compile_model(model)
    assert not any("forward" in vars(layer) for layer in model.model.language_model.layers)
    with pytest.raises(RuntimeError, match="CUDA graphs"):
        compile_model(model, "reduce-overhead")


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["default", "reduce-overhead"])
def test_compiled_prefill_equals_eager_on_cuda(mode, images):
    from globalcom2.models.loader import load_tiny_llava_next

    model, processor = load_tiny_llava_next(seed=0, device="cuda", dtype="bfloat16")
    inputs = prompt_inputs(processor, images[(672, 672)]).to("cuda")
    inputs["pixel_values"] = inputs["pixel_values"].to(torch.bfloat16)
    with attach(model, "globalcom2", retention_ratio=0.25):
        tokens, logits = generate_steps(model, inputs, STEPS)
        with compile_model(model, mode):
            for _ in range(2):  # the second call replays (CUDA graphs under reduce-overhead)
                compiled_tokens, compiled_logits = generate_steps(model, inputs, STEPS)
    assert torch.equal(tokens, compiled_tokens)
    torch.testing.assert_close(compiled_logits.float(), logits.float(), atol=0.1, rtol=0.05)
