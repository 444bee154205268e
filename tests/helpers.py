"""Test helpers: generation with per-step logits, explicit (hook-free) shortened references, and
``python -m globalcom2.run`` as a subprocess."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
from PIL import Image
from transformers.modeling_outputs import BaseModelOutputWithPooling

from globalcom2.prompts import vicuna_v1_prompt

CONFIGS = Path(__file__).resolve().parents[1] / "configs"  # the Hydra configs of this checkout


def compose_eval(tmp_path: Path, *overrides: str):
    """The ``eval`` config of this checkout with ``overrides``, its results under ``tmp_path / "results"``."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        return compose(
            config_name="eval", overrides=[f"paths.results_dir={tmp_path / 'results'}", *overrides]
        )


def compose_cell(tmp_path: Path, *overrides: str):
    """:func:`compose_eval` for one cell of the tiny model, ``random``, on the demo benchmark, plus ``overrides``."""
    return compose_eval(tmp_path, "model=tiny", "benchmark=demo", "method=random", *overrides)


def run_globalcom2(
    results: Path, *arguments: str, timeout: int = 600, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    """``python -m globalcom2.run <arguments>`` in its own process, the way users and Slurm run it, writing
    under ``results``; the caller checks the exit status."""
    return subprocess.run(
        [sys.executable, "-m", "globalcom2.run", *arguments],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {}), "GLOBALCOM2_RESULTS": str(results)},
        timeout=timeout,
    )


def cached_hub_dataset(
    cache: Path, repo: str, config: str, commit: str, rows: dict[str, list], split: str, mtime: float
) -> Path:
    """A hub dataset's configuration as ``datasets`` caches a download of it at ``commit``
    (``<cache>/<owner>___<name>/<config>/0.0.0/<commit>/``, its ``dataset_info.json`` and Arrow file),
    built by ``datasets``' own Parquet builder from ``rows`` (column to values; an ``image`` column of PIL
    images is stored as ``datasets.Image``). ``mtime``: the folder's modification time, which decides which
    copy ``datasets`` loads offline. Returns the folder."""
    import datasets
    from datasets.naming import camelcase_to_snakecase
    from datasets.packaged_modules.parquet.parquet import Parquet

    owner, name = repo.split("/")
    staging = cache.parent / f".staging-{commit}"
    features = datasets.Dataset.from_dict(rows).features
    if "image" in rows:
        features["image"] = datasets.Image()
    parquet = staging / "rows.parquet"
    staging.mkdir(parents=True)
    datasets.Dataset.from_dict(rows, features=features).to_parquet(str(parquet))
    builder = Parquet(
        cache_dir=str(staging / "built"),
        dataset_name=name,
        config_name=config,
        hash=commit,
        data_files={split: [str(parquet)]},
    )
    builder.download_and_prepare()
    folder = cache / f"{owner}___{camelcase_to_snakecase(name)}" / config / "0.0.0" / commit
    folder.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(builder.cache_dir, folder)
    shutil.rmtree(staging)
    os.utime(folder, (mtime, mtime))
    return folder


def fake_hub_repo(cache: Path, repo: str, snapshots: dict[str, Path | None], main: str) -> Path:
    """A hub repository as huggingface_hub's cache holds it (``models--owner--name/snapshots/<commit>/`` and
    ``refs/main``): each commit's snapshot is a copy of its folder (``None``: a bare ``config.json``).
    Returns the repository's cache folder; point ``huggingface_hub.constants.HF_HUB_CACHE`` at ``cache``."""
    repo_folder = cache / f"models--{repo.replace('/', '--')}"
    for commit, folder in snapshots.items():
        snapshot = repo_folder / "snapshots" / commit
        if folder is None:
            snapshot.mkdir(parents=True)
            (snapshot / "config.json").write_text("{}")
        else:
            shutil.copytree(folder, snapshot)
    (repo_folder / "refs").mkdir(parents=True, exist_ok=True)
    (repo_folder / "refs" / "main").write_text(main)
    return repo_folder


def dynamo_eager_backend(monkeypatch) -> None:
    """``torch.compile`` with dynamo's ``eager`` backend, for the test: the frames, guards and graph breaks of
    inductor's compilation, no kernels built. Every caller passes ``mode`` and ``dynamic`` by keyword
    (``globalcom2.models.compiled``, ``globalcom2.methods.globalcom2.compiled_selection``)."""
    real_compile = torch.compile
    monkeypatch.setattr(
        torch, "compile", lambda fn, mode, dynamic: real_compile(fn, backend="eager", dynamic=dynamic)
    )


def prompt_inputs(processor, images, question="What is in the image?"):
    """Processor inputs for one Vicuna-v1 prompt with one or several images."""
    images = images if isinstance(images, list) else [images]
    text = vicuna_v1_prompt(question, num_images=len(images))
    return processor(images=images, text=text, return_tensors="pt")


def sync_budget_params(name: str) -> dict:
    """A method's parameters in the host-sync budget tests (CPU counter and CUDA detector alike): R = 0.25,
    as ``make bench-host-syncs`` counts them."""
    from globalcom2.perf.host_syncs import method_params

    return method_params(name)


def generate_steps(model, inputs, steps: int = 4, **kwargs):
    """Greedy-generate exactly ``steps`` tokens; return ``(new tokens [B, steps], logits [steps, B, V])``.

    The ``<image>`` placeholder is never generated: the tiny random model could emit it, and a cache-free
    step would then read it as an image slot (a real checkpoint never emits it).
    """
    kwargs.setdefault("suppress_tokens", [model.config.image_token_id])
    out = model.generate(
        **inputs,
        max_new_tokens=steps,
        min_new_tokens=steps,
        do_sample=False,
        output_logits=True,
        return_dict_in_generate=True,
        **kwargs,
    )
    prompt_length = inputs["input_ids"].shape[1]
    return out.sequences[:, prompt_length:], torch.stack(out.logits)


def assert_batch_equals_single_runs(
    model, processor, rows, texts, steps: int = 3, atol: float = 1e-4
) -> None:
    """Generate ``texts`` (with ``rows[i]``, the images of prompt ``i``) as one left-padded batch and each prompt
    alone: the same tokens, and step logits within ``atol`` (a batch row and the prompt alone run through
    different kernels; the unmodified tiny model already differs by up to 1.7e-5 there)."""
    processor.tokenizer.padding_side = "left"
    flat = [image for row in rows for image in row]
    batch = processor(images=flat or None, text=texts, padding=True, return_tensors="pt")
    assert int((batch["attention_mask"] == 0).sum()) > 0, "the batch must be left-padded"
    tokens, logits = generate_steps(model, batch, steps=steps)
    for index, (row, text) in enumerate(zip(rows, texts, strict=True)):
        alone = processor(images=row or None, text=text, return_tensors="pt")
        row_tokens, row_logits = generate_steps(model, alone, steps=steps)
        torch.testing.assert_close(logits[:, index : index + 1], row_logits, atol=atol, rtol=0)
        assert torch.equal(tokens[index : index + 1], row_tokens)


def decoder_config(num_layers: int) -> SimpleNamespace:
    """The least of a LLaVA-NeXT config a method's depth checks read: ``text_config.num_hidden_layers``."""
    return SimpleNamespace(text_config=SimpleNamespace(num_hidden_layers=num_layers))


def shortened_inputs(model, inputs, sources):
    """Batch-1 inputs for the *unmodified* model: each image's placeholder run cut to its kept length and
    its features passed pre-gathered through ``mm_encoder_outputs``."""
    with torch.no_grad():
        features = model.model.get_image_features(inputs["pixel_values"], inputs["image_sizes"]).pooler_output
    kept = [feats.index_select(0, src) for feats, src in zip(features, sources, strict=True)]
    return inputs_with_features(model, inputs, kept)


def inputs_with_features(model, inputs, features):
    """Batch-1 inputs for the *unmodified* model that feed it ``features`` (one ``[M_i, D]`` per image) in
    place of each image's own: its placeholder run cut to ``M_i``, the features through ``mm_encoder_outputs``."""
    assert inputs["input_ids"].shape[0] == 1
    image_id = model.config.image_token_id
    with torch.no_grad():
        original = model.model.get_image_features(inputs["pixel_values"], inputs["image_sizes"]).pooler_output
    ids, out, i, image = inputs["input_ids"][0].tolist(), [], 0, 0
    while i < len(ids):
        if ids[i] == image_id:
            out += [image_id] * features[image].shape[0]
            i += original[image].shape[0]
            image += 1
        else:
            out.append(ids[i])
            i += 1
    return {
        "input_ids": torch.tensor([out]),
        "mm_encoder_outputs": {"image": BaseModelOutputWithPooling(pooler_output=list(features))},
    }


def synthetic_image(width: int, height: int, seed: int = 0) -> Image.Image:
    """Smooth colour gradients plus noise: every crop differs, so every token carries information."""
    rng = np.random.default_rng(seed + 7919 * width + height)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    base = np.stack(
        [np.sin(x / (17 + seed)), np.cos(y / (23 + seed)), np.sin((x + y) / (31 + seed))], axis=-1
    )
    pixels = 127.5 * (base + 1) + rng.normal(0, 25, size=(height, width, 3))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def write_llava15_checkpoint(path):
    """The config of a tiny LLaVA-1.5 checkpoint (``model_type: llava``, no AnyRes): what an entry point must
    refuse before it loads any weight. No weights are written; a loader that got past the config would
    fail differently."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    config = LlavaConfig(
        vision_config=CLIPVisionConfig(
            hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=336
        ),
        text_config=LlamaConfig(
            hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, vocab_size=300
        ),
    )
    config.architectures = ["LlavaForConditionalGeneration"]
    config.save_pretrained(path)
    return path


# Three prompts of different lengths and canvases: their batch is left-padded, and its longest row is not.
PADDED_BATCH_IMAGES = [(400, 300), (640, 480), (336, 700)]
PADDED_BATCH_QUESTIONS = ["What is it?", "What colour is the big shape on the left side?", "Count."]


def batch_and_single_runs(model, processor, method: str | None, invariant: bool, device: str = "cpu"):
    """4 greedy steps of a left-padded batch of three prompts and of each prompt alone, with ``method`` attached
    at R = 0.25 (``None``: the unmodified model) and under the batch-invariant mode if ``invariant``:
    ``(batch tokens [3, 4], batch logits [4, 3, V], [(tokens [1, 4], logits [4, 1, V]) per prompt])``."""
    import contextlib

    from globalcom2 import attach
    from globalcom2.models.batch_invariant import batch_invariant

    images = [synthetic_image(w, h, seed=i) for i, (w, h) in enumerate(PADDED_BATCH_IMAGES)]
    texts = [vicuna_v1_prompt(q) for q in PADDED_BATCH_QUESTIONS]
    processor.tokenizer.padding_side = "left"
    method_ctx = attach(model, method, retention_ratio=0.25) if method else contextlib.nullcontext()
    mode = batch_invariant() if invariant else contextlib.nullcontext()
    with torch.inference_mode(), mode, method_ctx:
        batch = processor(images=images, text=texts, padding=True, return_tensors="pt").to(device)
        assert int((batch["attention_mask"] == 0).sum()) > 0, "the batch must be left-padded"
        tokens, logits = generate_steps(model, batch, steps=4)
        alone = []
        for image, text in zip(images, texts, strict=True):
            single = processor(images=image, text=text, return_tensors="pt").to(device)
            alone.append(generate_steps(model, single, steps=4))
    return tokens, logits, alone


def shrink_random_init_7b(monkeypatch) -> None:
    """``random_init`` 7B with its widths and depths cut down, for the CPU: the 7B's geometry (CLIP at 336 px,
    AnyRes, the byte-level processor) and code path, at the tiny model's cost."""
    from globalcom2.models import random_init

    monkeypatch.setitem(
        random_init.VICUNA,
        "7b",
        {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4},
    )
    monkeypatch.setattr(
        random_init,
        "CLIP_L_336",
        {**random_init.CLIP_L_336, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
         "num_attention_heads": 2, "projection_dim": 32},
    )  # fmt: skip
