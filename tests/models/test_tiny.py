import pytest
import torch
from transformers import LlavaNextForConditionalGeneration

from globalcom2.anyres import packed_layout
from globalcom2.models.base import LLAVA_V16_GRID_PINPOINTS
from globalcom2.models.loader import load_llava_next, resolve_checkpoint
from globalcom2.models.tiny import byte_level_tokenizer, save_tiny_llava_next
from globalcom2.prompts import vicuna_v1_prompt


def test_weights_are_a_function_of_the_seed(tmp_path):
    state = {}
    for name, seed in [("a", 0), ("b", 0), ("c", 1)]:
        save_tiny_llava_next(tmp_path / name, seed=seed)
        model, _ = load_llava_next(tmp_path / name)
        state[name] = model.state_dict()
    assert all(torch.equal(state["a"][k], state["b"][k]) for k in state["a"])
    assert not all(torch.equal(state["a"][k], state["c"][k]) for k in state["a"])


def test_building_leaves_the_global_rng_alone(tmp_path):
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    save_tiny_llava_next(tmp_path / "m", seed=5)
    assert torch.equal(torch.rand(3), expected)


def test_real_llava_next_geometry(tiny):
    model, processor = tiny
    assert isinstance(model, LlavaNextForConditionalGeneration)
    cfg = model.config
    assert (cfg.vision_config.image_size, cfg.vision_config.patch_size) == (336, 14)
    assert cfg.image_grid_pinpoints == LLAVA_V16_GRID_PINPOINTS
    assert (cfg.vision_feature_layer, cfg.vision_feature_select_strategy) == (-2, "default")
    assert model.model.image_newline.shape == (cfg.text_config.hidden_size,)
    assert processor.tokenizer.padding_side == "left"
    assert type(processor.image_processor).__name__ == "LlavaNextImageProcessorPil"
    # the plain PyTorch forwards: transformers 5.25 would swap hub kernels in by default (5.23 did not)
    assert model.use_kernels is False


def test_tiny_resolves_to_a_saved_checkpoint():
    path = resolve_checkpoint("tiny:0")
    assert resolve_checkpoint("tiny") == path
    assert (__import__("pathlib").Path(path) / "model.safetensors").exists()


def test_a_home_relative_folder_loads_from_the_folder_the_config_check_read(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    save_tiny_llava_next(tmp_path / "ckpt", seed=0)
    assert resolve_checkpoint("~/ckpt") == str(tmp_path / "ckpt")
    model, _ = load_llava_next("~/ckpt")  # transformers alone would take "~/ckpt" for a hub id
    assert model.config.model_type == "llava_next"


@pytest.mark.parametrize("size", [(336, 336), (672, 672), (1008, 336), (336, 1008), (800, 600)])
def test_placeholders_match_the_packed_layout(tiny, images, size):
    model, processor = tiny
    inputs = processor(images=images[size], text=vicuna_v1_prompt("Q?"), return_tensors="pt")
    placeholders = int((inputs["input_ids"] == model.config.image_token_id).sum())
    width, height = size
    assert placeholders == packed_layout((height, width), LLAVA_V16_GRID_PINPOINTS).num_tokens


def test_byte_level_tokenizer_round_trips_any_text():
    tokenizer = byte_level_tokenizer()
    text = "Is the 3rd shape red? 是的 — ✓ naïve\ttab"
    ids = tokenizer(text)["input_ids"]
    assert ids[0] == tokenizer.bos_token_id
    assert tokenizer.decode(ids, skip_special_tokens=True) == text
    assert len(ids) == 1 + len(text.encode("utf-8"))


def test_chat_template_renders_vicuna_v1(tiny):
    _, processor = tiny
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What color?"}]}]
    rendered = processor.apply_chat_template(messages, add_generation_prompt=True)
    assert rendered == vicuna_v1_prompt("What color?")
    assert vicuna_v1_prompt("Q", num_images=2).count("<image>\n") == 2


def test_a_changed_recipe_builds_another_cached_checkpoint(tmp_path, monkeypatch):
    """The cache is keyed by the recipe's content, not a version bumped by hand: a changed template (or any
    edit of the recipe's module) names another folder, never the older build."""
    import globalcom2.models.tiny as tiny

    first = tiny.tiny_checkpoint(0, cache_dir=tmp_path)
    assert tiny.recipe_digest() in first.name and tiny.tiny_checkpoint(0, cache_dir=tmp_path) == first
    monkeypatch.setattr(tiny, "VICUNA_V1_CHAT_TEMPLATE", tiny.VICUNA_V1_CHAT_TEMPLATE + " ")
    second = tiny.tiny_checkpoint(0, cache_dir=tmp_path)
    assert second != first and (second / "config.json").is_file()
    edited = tmp_path / "tiny_edited.py"
    edited.write_bytes(tiny.Path(tiny.__file__).read_bytes() + b"# edited\n")
    monkeypatch.setattr(tiny, "__file__", str(edited))
    assert tiny.tiny_checkpoint(0, cache_dir=tmp_path) not in (first, second)
