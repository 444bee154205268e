"""``make train-tiny``: train the tiny LLaVA-NeXT on the demo benchmark's ``train`` split, so it can see.

The demo is only informative when vanilla answers correctly and the thumbnail's [CLS] attention, which
GlobalCom² reads, points at content. A random model has neither. The recipe follows LLaVA's stages, at a
size a 2-core CPU trains:

1. **Vision pre-training** (the CLIP tower alone). Real CLIP gets a content-seeking [CLS] from contrastive
   training; LLaVA's own loss never reaches that token (features come from layer -2, [CLS] dropped). Here
   the last layer's [CLS] (``pooler_output``) predicts which (shape, colour) pairs the view shows (an
   18-way multi-label head), and every patch of the feature layer (-2) predicts the colour and kind of the
   object it shows and whether it holds most of that object (dense heads), with labels from the
   generator (:mod:`globalcom2.training.targets`). The heads are discarded; the tower is then frozen. Its
   result is saved and reused while its config is unchanged (:func:`vision_stage`).
2. **Alignment** (projector, row-separator embedding and LLM; tower frozen, features cached). LLaVA
   aligns a projector to a *pretrained* LLM on captions. Our LLM starts from scratch, so this stage trains
   it too, on the benchmark's question/answer pairs, on every shape's patches and no background
   (:func:`curriculum`: the shapes the conversation asks about always, the other shapes ramping back in
   over ``distractors_ramp``). Kept tokens keep their original position ids, so the geometry the model
   learns is the full sequence's. Without it, a model that sees all ~2,000 tokens from step one learns
   only the answer priors (measured while the first recipe was built).
3. **Sampled background** (same parameters): every shape and a ``keep_background`` sample of the
   background patches and row separators, each kept one weighing in attention as the tokens it stands for
   (:func:`sampled_background_bias`), at a fifth of the full sequence's cost.
4. **Instruction tuning** (same parameters) on the full, unmodified visual sequence: exactly what the
   model sees at inference.

Every image carries its own question first and ``extra_questions`` more as further Vicuna turns
(``... ASSISTANT: red</s>USER: How many ...``), so one pass over the cached features trains several
answers. The loss is on the answer tokens and their ``</s>`` and, with ``data.grounding``, on the answer's
first token at the question's shape word (:func:`conversation`).

The one declared retrain (the committed checkpoint's ``training_record.json``, ``retrain``) changed stages
2-4 only, judged on the ``validation`` split alone: every turn trained at every step (the first recipe
trained the first turn only while distractors were dropped), grounding targets, a long no-background
alignment instead of a ramp that reached the background before the distractors were all back, and the
re-weighted background sample instead of a 15 % unweighted one.

Seeded and deterministic on one machine for a fixed ``threads``. Progress (losses, first-token accuracy per
question type on items of the demo's ``validation`` split) is printed as it goes. At the end the checkpoint
is written atomically with ``save_pretrained``, loaded back through :func:`load_llava_next`, and evaluated
with ``generate`` on the ``validation`` split, by which a recipe is judged. The ``test`` split is never read
here: it is scored once the recipe is frozen (:mod:`globalcom2.training.evaluate`). ``training_record.json``
beside the weights records the config, data seeds and hashes, losses, accuracies with their best-constant
baselines, git SHA, versions, hardware and wall time.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
import transformers
from omegaconf import DictConfig, OmegaConf
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import LlavaNextForConditionalGeneration

from globalcom2.anyres import SEPARATOR, config_layout
from globalcom2.atomic import atomic_write_text, staged_folder
from globalcom2.data import demo
from globalcom2.models.tiny import tiny_processor
from globalcom2.models.tiny_trained import CHECKPOINT_DIR, tiny_trained_config, train_tokenizer
from globalcom2.paths import PROJECT_ROOT
from globalcom2.prompts import VICUNA_V1_SYSTEM, vicuna_v1_prompt
from globalcom2.provenance import git_state, hardware, package_versions
from globalcom2.training import targets as targets_module
from globalcom2.training.evaluate import accuracy_by_type, write_record
from globalcom2.training.targets import (
    COLOR_NAMES,
    NO_OBJECT,
    asked_shapes,
    extra_questions,
    patch_targets,
    view_labels,
)

DEFAULT_CONFIG = PROJECT_ROOT / "configs" / "train" / "tiny_trained.yaml"
LANGUAGE_STAGES = ("align", "sampled", "tune")
VISION_STAGE_DIR = CHECKPOINT_DIR.parent / "tiny-trained-vision"
VISION_STAGE_WEIGHTS = "vision_tower.safetensors"
VISION_STAGE_RECORD = "vision_stage.json"
IGNORE = -100


def log(message: str) -> None:
    print(f"[train-tiny {time.strftime('%H:%M:%S')}] {message}", flush=True)


# ----------------------------------------------------------------------------------------------- data


def demo_corpus() -> list[str]:
    """Every prompt and answer the demo generator can produce, rendered as the model sees them.

    The tokenizer is learnt on this, so it depends on the generator's vocabulary alone, not on a sample.
    """
    corpus = []
    for kind in demo.SHAPES:
        questions = [f"What color is the {kind}?"]
        for color in COLOR_NAMES:
            questions += [
                f"How many {color} {kind}s are there?",
                f"Is the {color} {kind} on the left or the right side of the image?",
                f"Is the {color} {kind} at the top or the bottom of the image?",
            ]
        corpus += [vicuna_v1_prompt(q + demo.ANSWER_INSTRUCTION).replace("<image>\n", "") for q in questions]
    answers = [*COLOR_NAMES, *map(str, range(1, 6)), "left", "right", "top", "bottom"]
    corpus += [f"ASSISTANT: {a}" for a in answers]
    return corpus


@dataclass
class Conversation:
    """Token ids of one training sequence around its image: ``prefix <image> turns``."""

    prefix: list[int]  # <s> system USER:
    turns: list[int]  # \nQ1 ... ASSISTANT: A1</s>USER: Q2 ... ASSISTANT: A2</s>
    turn_labels: list[int]  # the answer tokens and their </s> (and grounding targets); IGNORE elsewhere
    first_turn_length: int  # tokens of the first question and its answer
    first_answer: int  # index in ``turns`` of the first answer's first token
    first_question_type: str
    questions: list[str]  # every turn's question, the image's own first


def shape_word_ids(tokenizer) -> set[int]:
    """Token ids of the shape words a question names (" triangle", " circles", ...): one token each."""
    words = [f" {kind}{plural}" for kind in demo.SHAPES for plural in ("", "s")]
    ids = [tokenizer(word, add_special_tokens=False)["input_ids"] for word in words]
    if any(len(i) != 1 for i in ids):
        raise ValueError(f"every shape word must be one token; got {dict(zip(words, ids, strict=True))}")
    return {i[0] for i in ids}


def conversation(
    tokenizer, item: demo.DemoItem, extra: list[tuple[str, str]], grounding: bool = False
) -> Conversation:
    """The Vicuna-v1 conversation of ``item`` (its own question first), split at the image.

    With ``grounding``, each answer's first token is also the target at the question's shape word
    (``... the triangle`` -> ``red``), the token whose own embedding can query the image for it. The
    answer position then needs one hop (copy from the shape word, a fixed offset back) instead of two.
    Only positions whose outputs are otherwise untrained get this target; inference never reads them.
    """
    prefix = tokenizer(f"{VICUNA_V1_SYSTEM} USER: ", add_special_tokens=True)["input_ids"]
    shape_words = shape_word_ids(tokenizer) if grounding else set()
    turns: list[int] = []
    labels: list[int] = []
    first_turn_length = first_answer = 0
    for number, (question, answer) in enumerate([(item.question, item.answer), *extra]):
        lead = "\n" if number == 0 else "USER: "
        asked = tokenizer(f"{lead}{question}{demo.ANSWER_INSTRUCTION} ASSISTANT:", add_special_tokens=False)
        asked_ids = asked["input_ids"]
        answered = tokenizer(f" {answer}</s>", add_special_tokens=False)["input_ids"]
        asked_labels = [IGNORE] * len(asked_ids)
        if grounding:
            (word,) = [i for i, token in enumerate(asked_ids) if token in shape_words]
            asked_labels[word + 1] = answered[0]  # label k is predicted at position k - 1
        if number == 0:
            first_answer, first_turn_length = len(asked_ids), len(asked_ids) + len(answered)
        turns += asked_ids + answered
        labels += asked_labels + answered
    questions = [item.question, *(question for question, _ in extra)]
    return Conversation(prefix, turns, labels, first_turn_length, first_answer, item.question_type, questions)


@dataclass
class CachedImage:
    """One training image, ready for the language-model stages."""

    features: torch.Tensor  # [V, 576, D_vision] float16, CLIP layer -2 without [CLS]
    view: torch.Tensor  # [N] packed position -> view (SEPARATOR for row separators)
    token: torch.Tensor  # [N] packed position -> patch index within its view
    shape: torch.Tensor  # [N] packed position -> index of the shape it shows, NO_OBJECT if none
    asked: torch.Tensor  # [N] bool: the patch shows a shape one of the conversation's questions is about
    conversation: Conversation


def packed_shapes(item: demo.DemoItem, image_processor, view, token) -> torch.Tensor:
    """``[N]``: the shape each packed position shows (``NO_OBJECT`` for background and separators)."""
    obj = view_labels(item, image_processor).obj  # [V, 576]
    patch = view != SEPARATOR
    shape = torch.full_like(view, NO_OBJECT)
    shape[patch] = obj[view[patch], token[patch]]
    return shape


# ---------------------------------------------------------------------------------------------- model


def pixel_values_of(image_processor, item: demo.DemoItem) -> torch.Tensor:
    """``[V, 3, 336, 336]``: the views of ``item``'s image, as the processor makes them."""
    return image_processor(demo.render(item), return_tensors="pt")["pixel_values"][0]


class VisionHeads(nn.Module):
    """Training-only heads on the CLIP tower: dense (feature layer) and [CLS] (last layer)."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.objectness = nn.Linear(width, 2)  # none / shape
        self.color = nn.Linear(width, len(COLOR_NAMES))  # on shape patches only
        self.kind = nn.Linear(width, len(demo.SHAPES))  # on shape patches only
        self.centre = nn.Linear(width, 2)  # holds most of its shape
        self.where = nn.Linear(width, 2)  # (row, column) of the patch in its view, in [0, 1]
        self.present = nn.Linear(width, len(COLOR_NAMES) * len(demo.SHAPES))


def visual_sequence(model, image: CachedImage, keep: torch.Tensor) -> torch.Tensor:
    """``[K, D_text]``: the packed visual embeddings at packed positions ``keep`` (``[K]``, ascending).

    What ``LlavaNextModel.get_image_features`` + ``pack_image_features`` give, restricted to ``keep`` (the
    projector acts per token; separators are ``image_newline``), up to the float16 the features are cached
    in (:func:`cache_images`; about 1e-2 on the tiny model, exact to 1e-5 from float32 features);
    ``tests/training`` checks both.
    """
    view, token = image.view[keep], image.token[keep]
    separator = view == SEPARATOR
    feats = image.features[view.clamp(min=0), token.clamp(min=0)].float()  # [K, D_vision]
    projected = model.model.multi_modal_projector(feats)  # [K, D_text]
    newline = model.model.image_newline.to(projected.dtype).expand_as(projected)
    return torch.where(separator[:, None], newline, projected)


def curriculum_keep(image: CachedImage, keep_distractors: float, keep_background: float, rng) -> torch.Tensor:
    """``[K]`` ascending packed positions to keep: the asked shapes' patches always, other shapes' patches
    with probability ``keep_distractors``, background patches and separators with ``keep_background``."""
    n = image.view.numel()
    if keep_distractors >= 1.0 and keep_background >= 1.0:
        return torch.arange(n)
    coin = torch.from_numpy(rng.random(n))
    distractor = (image.shape != NO_OBJECT) & ~image.asked
    background = image.shape == NO_OBJECT
    keep = image.asked | (distractor & (coin < keep_distractors)) | (background & (coin < keep_background))
    return torch.nonzero(keep).squeeze(1)


def sampled_background_bias(background: torch.Tensor, keep_background: float) -> torch.Tensor:
    """``[K]`` attention-logit bias of kept visual tokens: ``log(1 / keep_background)`` on background patches
    and separators (``background``, ``[K]`` bool) when only that fraction of them is kept, else 0.

    Each kept background token then weighs in every softmax as the ``1 / keep_background`` tokens it was
    sampled from (an importance-sampling estimate of the full sum, in numerator and denominator). Without
    it, a model trained on a thinned background learns attention mass ratios that the full background at
    inference dilutes: count collapsed from 13/20 to 3/20 when an earlier recipe did that (its notes).
    """
    if not 0.0 < keep_background < 1.0:
        return torch.zeros(background.shape)
    return background.float() * math.log(1.0 / keep_background)


def additive_mask(padding: torch.Tensor, biases: list[torch.Tensor]) -> torch.Tensor:
    """``[B, 1, L, L]`` float mask: causal, padding (``padding``, ``[B, L]``, 1 = real) and a per-key bias
    (``biases``, one ``[length_b]`` per row); transformers passes a 4-D mask to attention as is."""
    batch, length = padding.shape
    blocked = torch.finfo(torch.float32).min
    key = torch.full((batch, length), blocked)
    for b, bias in enumerate(biases):
        key[b, : bias.numel()] = bias
    causal = torch.full((length, length), blocked).triu(1)  # [L, L]
    return (causal[None] + key[:, None, :]).clamp(min=blocked)[:, None]  # [B, 1, L, L]


def batch_loss(
    model,
    images: list[CachedImage],
    rng: np.random.Generator,
    keep_distractors: float = 1.0,
    keep_background: float = 1.0,
):
    """Mean cross-entropy of the answer tokens of ``images``' conversations, and whether the argmax at the
    first answer token of each is right (for accuracy).

    Every turn is trained, whatever the curriculum drops: the shapes every question asks about are always
    kept. Background kept with probability ``keep_background`` in (0, 1) stands for all of it
    (:func:`sampled_background_bias`).
    """
    embed = model.get_input_embeddings()
    rows, positions, labels, biases, first = [], [], [], [], []
    for image in images:
        conv = image.conversation
        n = image.view.numel()
        keep = curriculum_keep(image, keep_distractors, keep_background, rng)
        text_length = len(conv.turns)
        p = len(conv.prefix)
        rows.append(
            torch.cat(
                [
                    embed(torch.tensor(conv.prefix)),
                    visual_sequence(model, image, keep),
                    embed(torch.tensor(conv.turns)),
                ]
            )
        )
        positions.append(torch.cat([torch.arange(p), p + keep, p + n + torch.arange(text_length)]))
        visual_bias = sampled_background_bias(image.shape[keep] == NO_OBJECT, keep_background)
        biases.append(torch.cat([torch.zeros(p), visual_bias, torch.zeros(text_length)]))
        labels.append(torch.tensor([IGNORE] * (p + keep.numel()) + conv.turn_labels))
        first.append(p + keep.numel() + conv.first_answer - 1)  # the position predicting the first answer
    length = max(r.shape[0] for r in rows)
    width = rows[0].shape[1]
    batch = len(rows)
    inputs = torch.zeros(batch, length, width)
    mask = torch.zeros(batch, length, dtype=torch.long)
    pos = torch.zeros(batch, length, dtype=torch.long)
    target = torch.full((batch, length), IGNORE, dtype=torch.long)
    for b, (row, position, label) in enumerate(zip(rows, positions, labels, strict=True)):
        inputs[b, : row.shape[0]] = row  # right padding: positions of real tokens are unchanged
        mask[b, : row.shape[0]] = 1
        pos[b, : row.shape[0]] = position
        target[b, : row.shape[0]] = label
    if any(bias.any() for bias in biases):
        mask = additive_mask(mask, biases)
    hidden = model.model.language_model(inputs_embeds=inputs, attention_mask=mask, position_ids=pos)
    logits = model.lm_head(hidden.last_hidden_state)  # [B, L, vocab]
    shifted = target[:, 1:]
    loss = F.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]), shifted.reshape(-1), ignore_index=IGNORE
    )
    first = torch.tensor(first)  # [B]
    predicted = logits[torch.arange(batch), first].argmax(-1)
    expected = shifted[torch.arange(batch), first]
    return loss, predicted == expected


def cosine_lr(step: int, total: int, warmup: int, peak: float, floor_fraction: float = 0.05) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (floor_fraction + (1 - floor_fraction) * 0.5 * (1 + math.cos(math.pi * progress)))


# --------------------------------------------------------------------------------------------- stages


def train_vision(model, image_processor, items, cfg: DictConfig, rng: np.random.Generator) -> dict[str, Any]:
    """Stage 1: the CLIP tower with dense and [CLS] heads; returns the loss history."""
    tower = model.model.vision_tower
    width = model.config.vision_config.hidden_size
    heads = VisionHeads(width)
    params = list(tower.parameters()) + list(heads.parameters())
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    order = np.concatenate([rng.permutation(len(items)) for _ in range(cfg.epochs)])
    batches = [order[i : i + cfg.images_per_batch] for i in range(0, len(order), cfg.images_per_batch)]
    history = []
    tower.train()
    for step, batch in enumerate(batches):
        for group in optimizer.param_groups:
            group["lr"] = cosine_lr(step, len(batches), cfg.warmup_steps, cfg.lr)
        pixels, targets = [], []
        for i in batch:
            pixels.append(pixel_values_of(image_processor, items[i]))
            targets.append(patch_targets(items[i], view_labels(items[i], image_processor)))
        pixel_values = torch.cat(pixels)  # [sum V, 3, 336, 336]
        target = {k: torch.cat([t[k] for t in targets]) for k in targets[0]}
        out = tower(pixel_values, output_hidden_states=True)
        # The heads read the raw feature-layer output, exactly what the projector reads, so what they learn
        # to decode is linearly there for the language model too.
        dense = out.hidden_states[model.config.vision_feature_layer][:, 1:]  # [sum V, 576, width]
        cls = out.pooler_output  # [sum V, width]: post-layernorm [CLS] of the last layer
        shape = target["kind"] > 0  # [sum V, 576]; ~1 % of the patches
        # Colour and kind are learnt on shape patches alone: averaged with the ~99 % background patches, a
        # kind head at chance still shows a small loss (the first version of this stage did exactly that).
        side = int(dense.shape[1] ** 0.5)
        grid = torch.stack(torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij"), -1)
        where = (grid.reshape(-1, 2).float() / (side - 1)).expand(dense.shape[0], -1, -1)  # [sum V, 576, 2]
        balanced = torch.tensor([cfg.background_weight, 1.0])
        losses = {
            "object": F.cross_entropy(
                heads.objectness(dense).flatten(0, 1), shape.long().flatten(), weight=balanced
            ),
            "color": F.cross_entropy(heads.color(dense[shape]), target["color"][shape] - 1),
            "kind": F.cross_entropy(heads.kind(dense[shape]), target["kind"][shape] - 1),
            "centre": F.cross_entropy(
                heads.centre(dense).flatten(0, 1), target["centre"].flatten(), weight=balanced
            ),
            "where": F.mse_loss(heads.where(dense), where),
            "cls": F.binary_cross_entropy_with_logits(heads.present(cls), target["present"]),
        }
        # Kind is the slow one: alone, it sits at chance for ~200 steps before it drops (measured); the
        # other heads are learnt within 50 steps. Its weight keeps it from being drowned out meanwhile.
        assert tuple(losses) == VISION_LOSSES  # the names load_config accepts in vision.loss_weights
        loss = sum(cfg.loss_weights.get(name, 1.0) * value for name, value in losses.items())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 5.0)
        optimizer.step()
        history.append({k: round(float(v.detach()), 4) for k, v in losses.items()})
        if step % 25 == 0 or step == len(batches) - 1:
            log(
                f"vision step {step + 1}/{len(batches)}  "
                + "  ".join(f"{k} {v:.3f}" for k, v in history[-1].items())
            )
    tower.eval()
    for p in tower.parameters():
        p.requires_grad_(False)
    return {"steps": len(batches), "losses": history}


@torch.no_grad()
def cache_images(
    model, image_processor, tokenizer, items, extra: int, rng: np.random.Generator, grounding: bool = False
) -> list[CachedImage]:
    """Layer -2 CLIP features of every image (the tower is frozen from here on) and its conversation."""
    tower = model.model.vision_tower
    layer = model.config.vision_feature_layer
    cached = []
    for number, item in enumerate(items):
        out = tower(pixel_values_of(image_processor, item), output_hidden_states=True)
        features = out.hidden_states[layer][:, 1:].to(torch.float16)  # [V, 576, D]
        layout = config_layout(model.config, (item.height, item.width))
        conv = conversation(tokenizer, item, extra_questions(item, rng, extra), grounding)
        shape = packed_shapes(item, image_processor, layout.view, layout.token)
        about = sorted({k for question in conv.questions for k in asked_shapes(item, question)})
        asked = torch.isin(shape, torch.tensor(about))
        cached.append(CachedImage(features, layout.view, layout.token, shape, asked, conv))
        if number % 500 == 0:
            log(f"cached {number + 1}/{len(items)} images")
    return cached


@torch.no_grad()
def first_token_accuracy(model, images: list[CachedImage], batch_size: int = 6) -> dict[str, float]:
    """First-answer-token accuracy on the full visual sequence, per question type of the first turn (the
    cheap progress signal; the recipe is judged by ``generate`` on the validation split at the end)."""
    model.eval()
    hits: dict[str, list[bool]] = {}
    rng = np.random.default_rng(0)
    for i in range(0, len(images), batch_size):
        chunk = images[i : i + batch_size]
        _, correct = batch_loss(model, chunk, rng)
        for image, ok in zip(chunk, correct.tolist(), strict=True):
            hits.setdefault(image.conversation.first_question_type, []).append(ok)
    model.train()
    return {k: round(100 * float(np.mean(v)), 1) for k, v in sorted(hits.items())}


def curriculum(progress: float, cfg: DictConfig) -> tuple[float, float]:
    """``(keep_distractors, keep_background)`` at ``progress`` in [0, 1) of a stage.

    Distractor shapes come back linearly over ``distractors_ramp`` (fractions of the stage), then
    background patches and separators over the rest of the stage, up to ``keep_background_end``. A stage
    without a ``curriculum`` block sees every token.
    """
    if "keep_background" in cfg:  # a constant sample of the background, re-weighted
        return 1.0, float(cfg.keep_background)
    if "curriculum" not in cfg:
        return 1.0, 1.0
    start, stop = cfg.curriculum.distractors_ramp
    distractors = min(1.0, max(0.0, (progress - start) / (stop - start)))
    background = cfg.curriculum.keep_background_end * min(1.0, max(0.0, (progress - stop) / (1.0 - stop)))
    return distractors, background


def train_language(
    model, images, validation, cfg: DictConfig, stage: str, report_every: int, rng
) -> dict[str, Any]:
    """Stages 2 and 3: projector, separator embedding and LLM on the answers (tower frozen)."""
    params = [p for name, p in model.named_parameters() if not name.startswith("model.vision_tower.")]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0, betas=(0.9, 0.98))
    history, reports = [], []
    order: list[int] = []
    model.train()
    for step in range(cfg.steps):
        for group in optimizer.param_groups:
            group["lr"] = cosine_lr(step, cfg.steps, cfg.warmup_steps, cfg.lr)
        keep_distractors, keep_background = curriculum(step / cfg.steps, cfg)
        if len(order) < cfg.batch_size:
            order += rng.permutation(len(images)).tolist()
        batch, order = [images[i] for i in order[: cfg.batch_size]], order[cfg.batch_size :]
        loss, correct = batch_loss(model, batch, rng, keep_distractors, keep_background)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        history.append(
            {
                "loss": round(float(loss.detach()), 4),
                "first_token_acc": round(float(correct.float().mean()), 3),
            }
        )
        if step % 25 == 0 or step == cfg.steps - 1:
            recent = history[-25:]
            log(
                f"{stage} step {step + 1}/{cfg.steps}  keep: distractors {keep_distractors:.2f} "
                f"background {keep_background:.2f}  "
                f"loss {np.mean([h['loss'] for h in recent]):.3f}  "
                f"train first-token acc {100 * np.mean([h['first_token_acc'] for h in recent]):.0f}%"
            )
        if (step + 1) % report_every == 0 or step == cfg.steps - 1:
            accuracy = first_token_accuracy(model, validation)
            reports.append({"step": step + 1, "validation_first_token_accuracy": accuracy})
            log(f"{stage} step {step + 1}: validation first-token accuracy {accuracy}")
    return {"steps": cfg.steps, "losses": history, "validation": reports}


# ----------------------------------------------------------------------------------------------- main


def provenance() -> dict[str, Any]:
    """The project's provenance (:mod:`globalcom2.provenance`), flattened as the training record has it."""
    git = git_state()
    versions = package_versions()
    return {
        "git_sha": git["sha"],
        "git_dirty": git["dirty"],
        "python": platform.python_version(),
        "torch": versions["torch"],
        "transformers": versions["transformers"],
        "numpy": versions["numpy"],
        "hardware": hardware(),
    }


def signature_hash(items: list[demo.DemoItem]) -> str:
    """Hash of the items' contents, in order: which data a run saw."""
    return hashlib.blake2b("".join(i.signature() for i in items).encode(), digest_size=8).hexdigest()


def recipe_hash(cfg: DictConfig) -> str:
    """Hash of the config and the recipe's source files: what 'frozen' refers to."""
    digest = hashlib.blake2b(digest_size=8)
    digest.update(json.dumps(OmegaConf.to_container(cfg), sort_keys=True).encode())
    for module in (
        "training/train_tiny.py",
        "training/targets.py",
        "models/tiny_trained.py",
        "data/demo.py",
    ):
        digest.update((PROJECT_ROOT / "globalcom2" / module).read_bytes())
    return digest.hexdigest()


def load_config(path: str | Path, overrides: list[str]) -> DictConfig:
    """The config at ``path`` with ``overrides``; every key, nested ones included, must be one the default
    config has (a typo such as ``vision.items=100`` would otherwise do nothing but change stage 1's reuse
    key, and so retrain it whole).

    Raises:
        ValueError: an unknown key, named with the valid keys at its level; or a value out of its range
            (:data:`VALUE_RANGES`), named with the range, before minutes of training end in a division by zero.
    """
    cfg = OmegaConf.merge(OmegaConf.load(path), OmegaConf.from_dotlist(overrides))
    _refuse_unknown_keys(cfg, OmegaConf.load(DEFAULT_CONFIG), "")
    _refuse_bad_values(cfg)
    return cfg


#: key -> (kind, lowest, highest, whether the lowest itself is allowed); ``None``: unbounded. A key absent from
#: a config (an optional block) is not checked.
VALUE_RANGES: dict[str, tuple[type, float | None, float | None, bool]] = {
    "seed": (int, 0, None, True),
    "threads": (int, 1, None, True),
    "data.train_items": (int, 1, None, True),
    "data.validation_items": (int, 1, None, True),
    "data.extra_questions": (int, 0, None, True),
    "vision.images": (int, 1, None, True),
    "vision.images_per_batch": (int, 1, None, True),
    "vision.epochs": (int, 1, None, True),
    "vision.lr": (float, 0, None, False),
    "vision.warmup_steps": (int, 0, None, True),
    "vision.background_weight": (float, 0, None, False),
    **{
        f"{stage}.{key}": spec
        for stage in ("align", "sampled", "tune")
        for key, spec in {
            "steps": (int, 1, None, True),
            "batch_size": (int, 1, None, True),
            "lr": (float, 0, None, False),
            "warmup_steps": (int, 0, None, True),
        }.items()
    },
    "align.curriculum.keep_background_end": (float, 0, 1, True),
    "sampled.keep_background": (float, 0, 1, False),  # 0 would keep no background at all, without a word
    "report.every": (int, 1, None, True),
    "report.progress_items": (int, 1, None, True),
}


#: key -> (its two values' names, lowest first value, highest second value or ``None``): increasing pairs.
PAIR_RANGES: dict[str, tuple[tuple[str, str], float, float | None]] = {
    "vision.shapes_per_image": (("low", "high"), 1, None),
    "align.curriculum.distractors_ramp": (("start", "end"), 0, 1),  # fractions of the stage
}


def _refuse_bad_values(cfg: DictConfig) -> None:
    """Every :data:`VALUE_RANGES` key present within its range and every :data:`PAIR_RANGES` key an
    increasing pair within its bounds; else ``ValueError`` naming the key, the value and what is valid."""
    for key, (kind, low, high, low_allowed) in VALUE_RANGES.items():
        value = OmegaConf.select(cfg, key, default=None)
        if value is None:
            continue
        wrong_type = isinstance(value, bool) or not isinstance(value, int if kind is int else (int, float))
        below = low is not None and (value < low if low_allowed else value <= low)
        if wrong_type or below or (high is not None and value > high):
            bounds = f"{'>=' if low_allowed else '>'} {low}" + (f" and <= {high}" if high is not None else "")
            raise ValueError(
                f"{key}={value!r}: must be {'an integer' if kind is int else 'a number'} {bounds}"
            )
    for key, (names, low, high) in PAIR_RANGES.items():
        pair = OmegaConf.select(cfg, key, default=None)
        if pair is None:
            continue
        values = list(pair) if not isinstance(pair, str | int | float) else [pair]
        ok = (
            len(values) == 2
            and all(isinstance(v, int | float) and not isinstance(v, bool) for v in values)
            and low <= values[0] < values[1]
            and (high is None or values[1] <= high)
        )
        if not ok:
            first, second = names
            valid = f"[{first}, {second}] with {low} <= {first} < {second}" + (f" <= {high}" if high else "")
            raise ValueError(f"{key}={values!r}: must be {valid}")


#: Stage 1's losses, the keys ``vision.loss_weights`` may weight (the default config names only ``kind``).
VISION_LOSSES = ("object", "color", "kind", "centre", "where", "cls")


def _refuse_unknown_keys(cfg: DictConfig, valid: DictConfig, prefix: str) -> None:
    if prefix == "vision.loss_weights.":
        valid = OmegaConf.create(dict.fromkeys(VISION_LOSSES, 1.0))
    unknown = sorted(set(cfg) - set(valid))
    if unknown:
        raise ValueError(
            f"unknown config keys {[prefix + str(k) for k in unknown]}; valid"
            f"{' under ' + prefix.rstrip('.') if prefix else ''}: {sorted(valid)}"
        )
    for key in cfg:
        if isinstance(cfg[key], DictConfig) and isinstance(valid[key], DictConfig) and len(valid[key]):
            _refuse_unknown_keys(cfg[key], valid[key], f"{prefix}{key}.")


def train(cfg: DictConfig) -> Path:
    """Run every stage and write the checkpoint; returns its folder."""
    wall = {}
    started = time.time()
    torch.set_num_threads(int(cfg.threads))
    torch.manual_seed(int(cfg.seed))
    out = Path(cfg.out) if cfg.out else CHECKPOINT_DIR

    tokenizer = train_tokenizer(demo_corpus())
    processor = tiny_processor(tokenizer)
    image_processor = processor.image_processor
    config = tiny_trained_config(tokenizer)
    model = LlavaNextForConditionalGeneration(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    log(
        f"model: vision {sum(p.numel() for p in model.model.vision_tower.parameters()):,} params, "
        f"language+projector {sum(p.numel() for n, p in model.named_parameters() if 'vision_tower' not in n):,}; "
        f"tokenizer {len(tokenizer)} tokens"
    )
    train_items = demo.generate_items("train", size=int(cfg.data.train_items))
    validation_items = demo.generate_items("validation", size=int(cfg.data.validation_items))
    signatures = {item.signature() for item in train_items}
    if any(item.signature() in signatures for item in validation_items):  # only past the default train size
        raise ValueError("a validation item equals a train item; lower data.train_items")
    progress_items = validation_items[: int(cfg.report.progress_items)]
    record: dict[str, Any] = {
        "name": "tiny-trained",
        "config": OmegaConf.to_container(cfg),
        "recipe_hash": recipe_hash(cfg),
        "data": {
            "generator": f"globalcom2.data.demo v{demo.DEMO_VERSION}",
            "train": {
                "seed": demo.DEFAULT_SEED["train"],
                "items": len(train_items),
                "signature_hash": signature_hash(train_items),
            },
            "validation": {
                "seed": demo.DEFAULT_SEED["validation"],
                "items": len(validation_items),
                "signature_hash": signature_hash(validation_items),
            },
            "test_seed_never_read": demo.DEFAULT_SEED["test"],
        },
        **provenance(),
    }

    t = time.time()
    record["vision"] = vision_stage(model, image_processor, cfg)
    wall["vision"] = round(time.time() - t, 1)

    # One generator per stage, so a reused stage 1 leaves every later draw as a trained one would.
    t = time.time()
    rng = np.random.default_rng([int(cfg.seed), 1])
    grounding = bool(cfg.data.grounding)
    cached = cache_images(
        model, image_processor, tokenizer, train_items, int(cfg.data.extra_questions), rng, grounding
    )
    progress = cache_images(model, image_processor, tokenizer, progress_items, 0, rng)
    wall["cache"] = round(time.time() - t, 1)

    for number, stage in enumerate(LANGUAGE_STAGES):
        t = time.time()
        rng = np.random.default_rng([int(cfg.seed), 2 + number])
        record[stage] = train_language(model, cached, progress, cfg[stage], stage, int(cfg.report.every), rng)
        wall[stage] = round(time.time() - t, 1)

    model.eval()
    record["wall_seconds"] = wall
    save_checkpoint(model, processor, out, record)
    t = time.time()
    # The recipe is judged here, on validation; the test split is scored only after the freeze
    # (globalcom2.training.evaluate --split test).
    record["validation"] = accuracy_by_type(out, validation_items)
    wall["validation"] = round(time.time() - t, 1)
    wall["total"] = round(time.time() - started, 1)
    log(f"validation accuracy (vanilla, generate): {record['validation']}")
    write_record(out, record)
    return out


def vision_stage_config(cfg: DictConfig, model_config: Any) -> dict[str, Any]:
    """What stage 1's result depends on: its own config (less ``checkpoint``), the seed and the threads; and
    what lies outside that config: the whole model's config (the training heads draw their initial weights
    after the language model is built, so its widths and vocabulary move them), the demo generator
    (``demo.generator_digest``: the crowded images), the source of this module and of ``targets`` (the
    stage's code and its labels, e.g. ``MIN_COVERED_PIXELS``), and the torch and transformers releases. A
    saved stage is reused only when all of it is equal; an edit anywhere in it trains the stage again (455 s
    on the 2-core CPU), never serves a stale tower."""
    vision = OmegaConf.to_container(cfg.vision)
    vision.pop("checkpoint", None)
    sources = hashlib.sha256()
    for path in (Path(__file__), Path(targets_module.__file__)):
        sources.update(path.read_bytes())
    model = json.dumps(model_config.to_dict(), sort_keys=True, default=str).encode()
    return {
        "seed": int(cfg.seed),
        "threads": int(cfg.threads),
        "vision": vision,
        "depends_on": {
            "model_config": hashlib.sha256(model).hexdigest()[:16],
            "demo_generator": demo.generator_digest(),
            "code": sources.hexdigest()[:16],
            "torch": torch.__version__,
            "transformers": transformers.__version__,
        },
    }


def vision_stage_folder(where: str | None) -> Path | None:
    """``vision.checkpoint`` as a folder: the committed one for ``default`` (or null), none for ``none``."""
    if where == "none":
        return None
    if where in (None, "default"):
        return VISION_STAGE_DIR
    return Path(where)


def vision_stage(model, image_processor, cfg: DictConfig) -> dict[str, Any]:
    """Stage 1, or its saved result when one with the same :func:`vision_stage_config` exists.

    Stage 1 is the one stage the language stages never change (its training steps took 455 s on the 2-core
    CPU, ``vision_stage.json``), so its output is kept, as LLaVA keeps its stage-1 projector for stage 2
    (``--pretrain_mm_mlp_adapter``, haotian-liu/LLaVA ``scripts/v1_5/finetune.sh``): the frozen tower's
    weights and the stage's record, in ``vision.checkpoint`` (default
    ``globalcom2/models/checkpoints/tiny-trained-vision``, committed). ``vision.checkpoint=none`` trains
    it again. The saved stage is reused only under an equal :func:`vision_stage_config`, which names what the
    stage depends on beyond its own settings (the training heads' initial weights, drawn after the whole
    model is built, depend on the language model's widths and vocabulary). The
    committed stage is rewritten only by a run that writes the committed checkpoint (``out: null``); an
    explicit ``vision.checkpoint`` folder is always written.
    """
    tower = model.model.vision_tower
    where = cfg.vision.checkpoint
    committed = where in (None, "default")
    folder = vision_stage_folder(where)
    wanted = vision_stage_config(cfg, model.config)
    if folder is not None and (folder / VISION_STAGE_RECORD).is_file():
        saved = json.loads((folder / VISION_STAGE_RECORD).read_text())
        if saved["stage_config"] == wanted:
            tower.load_state_dict(load_file(str(folder / VISION_STAGE_WEIGHTS)), strict=True)
            tower.eval().requires_grad_(False)
            log(f"stage 1 reused from {folder} (same stage config)")
            return {
                "reused_from": str(
                    folder.relative_to(PROJECT_ROOT) if folder.is_relative_to(PROJECT_ROOT) else folder
                ),
                **saved,
            }
        log(f"stage 1 at {folder} was trained with another config; training it again")
    crowded = [
        demo.make_crowded_item(demo.DEFAULT_SEED["train"], i, tuple(cfg.vision.shapes_per_image))
        for i in range(int(cfg.vision.images))
    ]
    started = time.time()
    result = train_vision(model, image_processor, crowded, cfg.vision, np.random.default_rng(int(cfg.seed)))
    stage = {
        "stage_config": wanted,
        **result,
        "wall_seconds": round(time.time() - started, 1),
        **provenance(),
    }
    if folder is not None and (cfg.out is None or not committed):
        with staged_folder(folder) as staging:
            save_file(
                {k: v.contiguous() for k, v in tower.state_dict().items()},
                str(staging / VISION_STAGE_WEIGHTS),
            )
            atomic_write_text(staging / VISION_STAGE_RECORD, json.dumps(stage, indent=1) + "\n")
        log(f"stage 1 written to {folder}")
    return stage


def save_checkpoint(model, processor, out: Path, record: dict[str, Any]) -> None:
    """Write weights, processor and the record to a sibling folder, then swap it into place."""
    with staged_folder(out) as staging:
        model.save_pretrained(staging)
        processor.save_pretrained(staging)
        write_record(staging, record)
    log(f"checkpoint written to {out}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default=str(DEFAULT_CONFIG))
    parser.add_argument("overrides", nargs="*", help="key=value, e.g. vision.images=100 out=/tmp/ckpt")
    args = parser.parse_args(argv)
    out = train(load_config(args.config, args.overrides))
    print(out)


if __name__ == "__main__":
    sys.exit(main())
