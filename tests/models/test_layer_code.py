"""Which code objects compiled layers run (``globalcom2.models.layer_code``): the signature later models share
code by, the bounded store of shared copies, and the copies themselves."""

from __future__ import annotations

import torch
from transformers import LlavaNextForConditionalGeneration

from globalcom2.models.layer_code import SharedCode, compile_signature, layer_code
from globalcom2.models.tiny import INITIALIZER_RANGE, TEXT, VISION, byte_level_tokenizer, llava_v16_config


def tiny_model(decoder_layers: int = 2, seed: int = 0) -> LlavaNextForConditionalGeneration:
    torch.manual_seed(seed)
    config = llava_v16_config(
        byte_level_tokenizer(), VISION, {**TEXT, "num_hidden_layers": decoder_layers}, INITIALIZER_RANGE
    )
    return LlavaNextForConditionalGeneration(config).eval()


def test_the_signature_keeps_apart_what_the_layers_graphs_depend_on_and_nothing_else():
    model = tiny_model()
    signature = compile_signature(model, "default")
    same = tiny_model(seed=1)  # other weights
    same.config._name_or_path = "/elsewhere/tiny"
    same.config.text_config._name_or_path = same.config.vision_config._name_or_path = "/elsewhere/tiny"
    same.config.image_grid_pinpoints = [[336, 672], [672, 336]]  # the layout, which no layer reads
    assert compile_signature(same, "default") == signature
    assert compile_signature(model, "max-autotune-no-cudagraphs") != signature
    assert compile_signature(tiny_model(decoder_layers=3), "default") != signature
    mixed = tiny_model()
    mixed.set_attn_implementation({"text_config": "eager", "vision_config": "sdpa"})
    eager_text = compile_signature(mixed, "default")
    mixed.set_attn_implementation({"text_config": "sdpa", "vision_config": "eager"})
    eager_vision = compile_signature(mixed, "default")
    assert len({signature, eager_text, eager_vision}) == 3  # each part's own attention counts
    assert compile_signature(model.to(torch.bfloat16), "default") != signature


def test_the_store_keeps_the_most_recently_used_signatures():
    store = SharedCode(capacity=2)
    a = store.codes_for("a")
    a[("code", "slot")] = "copy"
    store.codes_for("b")
    assert store.codes_for("a") is a  # used again: now the most recent
    store.codes_for("c")  # drops b, the least recent
    assert "a" in store and "c" in store and "b" not in store and len(store) == 2
    assert store.codes_for("b") == {}  # b starts afresh
    store.forget("c")
    assert "c" not in store and "a" not in store  # a fell out when b came back
    store.clear()
    assert len(store) == 0


def test_a_copy_is_shared_through_its_codes_and_fresh_without_them():
    model = tiny_model()
    first, second = model.model.language_model.layers[:2]
    codes: dict = {}
    shared = [layer_code(layer.forward, "slot_forward", codes) for layer in (first, second)]
    assert shared[0].__func__.__code__ is shared[1].__func__.__code__
    assert shared[0].__self__ is first and shared[1].__self__ is second  # each bound to its own layer
    assert shared[0].__func__.__code__.co_name == "slot_forward"
    fresh = [layer_code(first.forward, "slot_forward", None) for _ in range(2)]
    assert fresh[0].__func__.__code__ is not fresh[1].__func__.__code__
    assert fresh[0].__func__.__code__ is not shared[0].__func__.__code__
    # the copy computes as the original
    hidden = torch.randn(1, 5, model.config.text_config.hidden_size)
    positions = model.model.language_model.rotary_emb(hidden, torch.arange(5)[None])
    with torch.inference_mode():
        expected = first(hidden, position_embeddings=positions)
        got = shared[0](hidden, position_embeddings=positions)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
