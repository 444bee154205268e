"""``load_llava_next`` refuses what ``from_pretrained`` would load silently wrong."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import LlavaNextForConditionalGeneration

from globalcom2.models import loader
from globalcom2.models.base import UnsupportedModelError
from globalcom2.models.loader import IncompleteCheckpointError, load_llava_next
from globalcom2.models.preload import checkpoint_config
from globalcom2.models.random_init import size_from_name
from globalcom2.models.tiny_trained import CHECKPOINT_DIR


@pytest.fixture
def folder(tmp_path):
    copy = tmp_path / "ckpt"
    shutil.copytree(CHECKPOINT_DIR, copy)
    return copy


def test_a_checkpoint_missing_weights_is_refused_naming_them(folder):
    weights = load_file(folder / "model.safetensors")
    dropped = [
        key
        for key in weights
        if key.endswith("image_newline") or key == "language_model.model.layers.0.self_attn.q_proj.weight"
    ]
    assert len(dropped) == 2, dropped
    save_file({k: v for k, v in weights.items() if k not in dropped}, folder / "model.safetensors")
    with pytest.raises(
        IncompleteCheckpointError, match=r"lacks 2 and mis-shapes 0 .*image_newline.*at random"
    ):
        load_llava_next(folder)


def test_the_complete_checkpoint_loads_its_own_weights(folder):
    model, processor = load_llava_next(folder)
    (saved,) = [v for k, v in load_file(folder / "model.safetensors").items() if k.endswith("image_newline")]
    assert torch.equal(model.model.image_newline, saved)
    assert processor.tokenizer.padding_side == "left"


@pytest.mark.parametrize(
    "absent",
    [
        ("processor_config.json", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja"),
        ("processor_config.json",),  # AutoProcessor then falls back to a bare tokenizer
    ],
)
def test_a_checkpoint_without_its_processor_fails_before_any_weight_loads(folder, monkeypatch, absent):
    for name in absent:
        (folder / name).unlink()

    def no_weights(*args, **kwargs):
        raise AssertionError("weights loaded before the processor was found")

    monkeypatch.setattr(loader.LlavaNextForConditionalGeneration, "from_pretrained", no_weights)
    with pytest.raises(FileNotFoundError, match=r"cannot load a LLaVA-NeXT checkpoint from .*ckpt"):
        load_llava_next(folder)


def test_a_folder_whose_only_bin_is_a_training_state_has_no_weights(folder):
    (folder / "model.safetensors").unlink()
    (folder / "training_args.bin").write_bytes(b"not a model")
    with pytest.raises(FileNotFoundError, match=r"config\.json but no weights \(none of model\.safetensors"):
        checkpoint_config(str(folder))


@pytest.mark.parametrize("text_type", ["mistral", "qwen2"])
def test_a_llava_next_checkpoint_on_another_language_model_is_refused(folder, text_type):
    config = json.loads((folder / "config.json").read_text())
    config["text_config"]["model_type"] = text_type  # llava-v1.6-mistral-7b-hf, llava-next-72b-hf
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(UnsupportedModelError, match=rf"a '{text_type}' language model .* supported are"):
        checkpoint_config(str(folder))


@pytest.mark.parametrize(
    ("name", "size"),
    [("llava-hf/llava-v1.6-vicuna-7b-hf", "7b"), ("llava-hf/llava-v1.6-vicuna-13b-hf", "13b")],
)
def test_random_init_builds_the_vicuna_it_is_named_for(name, size):
    assert size_from_name(name) == size


@pytest.mark.parametrize(
    "name",
    [
        "llava-hf/llava-v1.6-mistral-7b-hf",
        "meta-llama/Llama-2-13b-hf",
        "vicuna",
        "lmsys/vicuna-7b-v1.5",  # the language model alone
        "liuhaotian/llava-v1.5-vicuna-7b-lora",  # LLaVA 1.5, no AnyRes
    ],
)
def test_random_init_refuses_a_name_that_is_not_vicuna_7b_or_13b(name):
    with pytest.raises(ValueError, match=r"Vicuna 7B or 13B.*valid: llava-hf/llava-v1.6-vicuna-7b-hf"):
        size_from_name(name)


def test_the_transformers_pin_is_the_one_the_package_declares():
    import tomllib

    from globalcom2.models.base import SUPPORTED_TRANSFORMERS
    from globalcom2.paths import PROJECT_ROOT

    pyproject = tomllib.loads((PROJECT_ROOT / "pyproject.toml").read_text())
    assert f"transformers{SUPPORTED_TRANSFORMERS}" in pyproject["project"]["dependencies"]


@pytest.mark.parametrize(
    "version", ["5.17.0", "5.26.0", "5.26.0.dev0", "5.23.0rc1", "6.0.0", "not-a-version"]
)
def test_another_transformers_release_is_refused_at_load_and_at_attach(version, monkeypatch):
    import transformers

    from globalcom2 import attach
    from globalcom2.models.base import UnsupportedTransformersError

    model, _ = load_llava_next("tiny")
    monkeypatch.setattr(transformers, "__version__", version)

    def no_weights(*args, **kwargs):
        raise AssertionError("weights loaded before the release was checked")

    monkeypatch.setattr(loader.LlavaNextForConditionalGeneration, "from_pretrained", no_weights)
    message = rf"transformers {version} is installed; this harness needs transformers>=5\.23,<5\.26"
    with pytest.raises(UnsupportedTransformersError, match=message):
        load_llava_next("tiny")
    with pytest.raises(UnsupportedTransformersError, match=message):
        attach(model, "random", retention_ratio=0.5)


@pytest.mark.parametrize("version", ["5.23.0", "5.25.1.dev0", "5.24.0rc2", "5.25.0"])
def test_a_release_or_source_build_inside_the_range_is_taken(version):
    from globalcom2.models.base import check_transformers_version

    check_transformers_version(version)


@pytest.mark.parametrize(
    ("config_entry", "named"),
    [
        ({"dtype": "bfloat16"}, "bfloat16"),
        ({"torch_dtype": "float16"}, "float16"),  # how older checkpoints (llava-hf's) name it
        ({"dtype": {"": "bfloat16", "vision_config": "float32"}}, "bfloat16"),  # per module: the "" entry's
        ({"dtype": {"text_config": "float16"}}, "float32"),  # per module without "": the default dtype
        ({"dtype": "float64"}, None),  # not a dtype a cell can name: left to transformers
        ({}, None),  # named by no config: transformers takes the weights' own, which no config read knows
    ],
)
def test_auto_dtype_names_what_transformers_loads_for_auto(folder, config_entry, named):
    """``auto_dtype`` is what a cell's identity holds for ``dtype=auto``: it must be what transformers' own
    ``dtype="auto"`` loads, or ``None`` where it cannot say beforehand."""
    config_file = folder / "config.json"
    raw = json.loads(config_file.read_text())
    for key in ("dtype", "torch_dtype"):
        raw.pop(key, None)
    config_file.write_text(json.dumps({**raw, **config_entry}))
    assert loader.auto_dtype(str(folder)) == named
    by_transformers = LlavaNextForConditionalGeneration.from_pretrained(folder, dtype="auto").dtype
    assert named is None or by_transformers == getattr(torch, named)
    for dtype in ("auto", None):  # and the loader loads what transformers would
        assert load_llava_next(folder, dtype=dtype)[0].dtype == by_transformers, dtype


def test_the_loader_loads_auto_in_the_dtype_auto_dtype_names(folder, monkeypatch):
    """The identity holds ``auto_dtype``'s answer, read from the config by ``config_dtype``, so the load must
    use that reading of the config, not ask transformers again."""
    monkeypatch.setattr(loader, "config_dtype", lambda config: "bfloat16")  # the config says float32
    assert loader.auto_dtype(folder) == "bfloat16"  # the identity's answer comes from the same reading
    assert load_llava_next(folder, dtype="auto")[0].dtype == torch.bfloat16
    assert load_llava_next(folder, dtype="float32")[0].dtype == torch.float32  # an explicit dtype is kept


def test_auto_names_the_dtype_of_the_shipped_and_random_weights_and_nothing_it_cannot_read(tmp_path):
    assert loader.auto_dtype("tiny-trained") == "float32"
    assert loader.auto_dtype("tiny") == "float32"  # the built folder's config, not the in-memory one
    assert loader.auto_dtype("llava-hf/llava-v1.6-vicuna-7b-hf", random_init=True) == "float16"
    assert loader.auto_dtype(str(tmp_path / "absent")) is None  # the load reports it
    broken = tmp_path / "broken"
    shutil.copytree(CHECKPOINT_DIR, broken)
    raw = json.loads((broken / "config.json").read_text())
    (broken / "config.json").write_text(json.dumps({**raw, "dtype": "auto"}))  # no config can hold it
    assert loader.auto_dtype(str(broken)) is None
