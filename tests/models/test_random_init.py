import pytest

from globalcom2.anyres import packed_layout
from globalcom2.models.random_init import build_random_llava_next
from globalcom2.prompts import vicuna_v1_prompt


@pytest.mark.parametrize(
    ("size", "params", "layers", "width"), [("7b", 7.063e9, 32, 4096), ("13b", 13.351e9, 40, 5120)]
)
def test_real_size_architecture_on_meta(size, params, layers, width, images):
    model, processor = build_random_llava_next(size, device="meta", dtype="float16")
    assert abs(sum(p.numel() for p in model.parameters()) - params) < 1e6  # llava-v1.6-vicuna-{7,13}b
    text, vision = model.config.text_config, model.config.vision_config
    assert (text.num_hidden_layers, text.hidden_size, text.vocab_size) == (layers, width, 32064)
    assert (vision.num_hidden_layers, vision.hidden_size, vision.image_size, vision.patch_size) == (
        24,
        1024,
        336,
        14,
    )
    assert model.config.text_config._attn_implementation == "sdpa"
    inputs = processor(images=images[(800, 600)], text=vicuna_v1_prompt("Q"), return_tensors="pt")
    placeholders = int((inputs["input_ids"] == model.config.image_token_id).sum())
    assert placeholders == packed_layout((600, 800), model.config.image_grid_pinpoints).num_tokens


def test_unknown_size():
    with pytest.raises(ValueError, match="unknown LLaVA-NeXT size '70b'; valid: 7b, 13b"):
        build_random_llava_next("70b", device="meta")


@pytest.mark.gpu
def test_a_random_model_built_on_cuda_is_seeded_and_leaves_the_callers_cuda_rng_alone():
    """The weights come from the CUDA generator, seeded for the build; the caller's CUDA RNG state is
    restored (``torch.manual_seed`` inside the build used to reseed every CUDA generator for good)."""
    import torch

    torch.cuda.manual_seed(123)
    before = torch.cuda.get_rng_state()
    model, _ = build_random_llava_next("7b", device="cuda", seed=0)
    assert torch.equal(torch.cuda.get_rng_state(), before)
    first = model.lm_head.weight[:2, :8].float().cpu()
    del model
    torch.cuda.empty_cache()
    again, _ = build_random_llava_next("7b", device="cuda", seed=0)
    assert torch.equal(again.lm_head.weight[:2, :8].float().cpu(), first)
