"""What can be checked about a model before any weight loads: the checkpoint's config, and the device.

Every entry point (``globalcom2.run``, the lmms-eval plugin and CLI, ``load_llava_next``) reads the
checkpoint's ``config.json`` through :func:`checkpoint_config` first. That is a few kilobytes, so a wrong
checkpoint (a LLaVA-1.5 model, a plain LLaMA) is refused in a second, with the type that was found and
the ones we support, instead of being loaded for minutes into a class that silently initialises the
missing parts at random (``LlavaNextForConditionalGeneration.from_pretrained`` accepts a ``llava``
checkpoint and draws a random ``image_newline``). The config is also what the model-dependent parameter
ranges are checked against (FastV's ``K`` against the decoder depth, GlobalCom²'s ``score_layer`` against
the vision tower's), through :meth:`globalcom2.methods.CompressionMethod.check_model_config`.

Whether the hub may be used is decided by :func:`globalcom2.hub.hub_offline`, the one reading of the
offline switches that ``make data`` shares.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from transformers import LlavaNextConfig

from globalcom2 import hub
from globalcom2.models.base import (
    SUPPORTED_CHECKPOINTS,
    TINY_TRAINED,
    check_config_type,
    check_llava_next_config,
    tiny_seed,
)
from globalcom2.models.random_init import llava_next_config_for
from globalcom2.models.tiny import byte_level_tokenizer, tiny_config
from globalcom2.models.tiny_trained import CHECKPOINT_DIR


def named_checkpoint(name: str) -> Path | None:
    """The folder of a checkpoint the project ships by name (``"tiny-trained"``), else ``None``."""
    if name != TINY_TRAINED:
        return None
    if not (CHECKPOINT_DIR / "config.json").is_file():
        raise FileNotFoundError(
            f"pretrained={name!r}: the trained tiny checkpoint is missing from {CHECKPOINT_DIR}; it is "
            "committed with the project, or rebuilt by `make train-tiny`"
        )
    return CHECKPOINT_DIR


def checkpoint_config(
    pretrained: str | Path,
    *,
    random_init: bool = False,
    keys: Mapping[str, str] | None = None,
    revision: str | None = None,
) -> LlavaNextConfig:
    """The config of the checkpoint ``pretrained`` names, read without loading any weight.

    Args:
        pretrained: a hub id (``llava-hf/llava-v1.6-vicuna-7b-hf``), a local folder, ``tiny[:seed]`` or
            ``tiny-trained``.
        random_init: the 7B/13B architecture named by ``pretrained`` is built, not read.
        keys: how the caller spells ``pretrained``, ``random_init`` and ``revision`` in messages.
        revision: a hub id's branch, tag or commit (``None``: ``main``); only for a hub id.

    Raises:
        FileNotFoundError: a missing folder, a folder without ``config.json`` or without weights, or a hub
            checkpoint (at ``revision``) that is not in the local cache while the hub is offline (or cannot
            be reached).
        ValueError: a name that is neither a folder nor a valid hub id, or a ``revision`` where there is none
            (:func:`check_revision`).
        UnsupportedModelError: the checkpoint is not LLaVA-NeXT with AnyRes crops.
    """
    name = str(pretrained)
    check_revision(name, revision, random_init=random_init, keys=keys)
    if random_init:
        return llava_next_config_for(name)
    if tiny_seed(name) is not None:
        return tiny_config(byte_level_tokenizer())
    named = named_checkpoint(name)
    config_file = named / "config.json" if named is not None else checkpoint_config_file(name, keys, revision)
    raw = json.loads(config_file.read_text(encoding="utf-8"))
    check_config_type(raw, name)
    config = LlavaNextConfig.from_dict(raw)
    check_llava_next_config(config, name)
    if config_file.parent.is_dir() and not _has_weights(config_file.parent) and _is_local(name):
        raise FileNotFoundError(
            f"checkpoint folder {name!r} has a config.json but no weights (none of {', '.join(WEIGHT_FILES)}); "
            "copy the whole checkpoint there, or pass a hub id"
        )
    return config


def check_revision(
    pretrained: str, revision: str | None, *, random_init: bool = False, keys: Mapping[str, str] | None = None
) -> None:
    """Refuse a revision where none exists: random weights, the project's own checkpoints (``tiny[:seed]``,
    ``tiny-trained``) and local folders. Reads nothing but whether ``pretrained`` is a folder.

    Raises:
        ValueError: naming the revision and why it cannot apply.
    """
    if revision is None:
        return
    keys = keys or {}
    spell = keys.get("revision", "revision")
    if not isinstance(revision, str) or not revision.strip():
        raise ValueError(f"{spell} must be a hub branch, tag or commit, got {revision!r}")
    if random_init:
        raise ValueError(
            f"{spell}={revision!r} with {keys.get('random_init', 'random_init')}=true: random weights come from "
            "no revision; drop one of them"
        )
    if tiny_seed(pretrained) is not None or pretrained == TINY_TRAINED:
        raise ValueError(
            f"{spell}={revision!r}: {keys.get('pretrained', 'pretrained')}={pretrained!r} is built or shipped by "
            "the project, not a hub repository; drop the revision"
        )
    if _is_local(pretrained):  # before its files are hashed for a cell's identity
        raise ValueError(
            f"{spell}={revision!r} names a hub revision, but {keys.get('pretrained', 'pretrained')}={pretrained!r} "
            "is a local folder, which has none; drop the revision, or pass the hub id"
        )


def _is_local(name: str) -> bool:
    """Whether ``pretrained`` names a local folder (not a hub id resolved through the cache)."""
    return Path(name).expanduser().is_dir()


#: The weight files ``from_pretrained`` looks for in a folder (one file, or an index naming the shards);
#: any other ``*.bin`` (``training_args.bin``, an optimiser state) is not a model.
WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)


def _has_weights(folder: Path) -> bool:
    return any((folder / name).is_file() for name in WEIGHT_FILES)


def checkpoint_config_file(
    name: str, keys: Mapping[str, str] | None = None, revision: str | None = None
) -> Path:
    """``config.json`` of a local folder, or of a hub checkpoint at ``revision`` resolved as
    ``from_pretrained`` resolves it (:func:`globalcom2.hub.hub_file`: the cache offline, the hub online).

    Raises:
        FileNotFoundError: a missing folder or one without ``config.json``; a hub checkpoint neither cached
            nor reachable, with the command that downloads it.
        ValueError: ``name`` is neither a folder nor a hub id (``owner/name``).
    """
    keys = keys or {}
    pretrained, random_init = keys.get("pretrained", "pretrained"), keys.get("random_init", "random_init")
    path = Path(name).expanduser()
    if path.exists() or name.startswith(("/", ".", "~")) or name.count("/") > 1:
        if not path.is_dir():
            raise FileNotFoundError(
                f"{pretrained}={name!r}: no such checkpoint folder. Pass an existing folder, a hub id "
                f"(e.g. {SUPPORTED_CHECKPOINTS[0]}) or 'tiny'."
            )
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"checkpoint folder {name!r} has no config.json")
        return path / "config.json"
    try:
        return hub.hub_file(name, "config.json", revision)
    except FileNotFoundError as err:
        # hub.hub_offline is looked up on the module at each call, so a replacement of it is seen here too
        if not hub.hub_offline():
            raise
        if revision is not None:
            raise FileNotFoundError(
                f"{err}. Download that revision first (`hf download {name} --revision {revision}` with network "
                f"access), or drop {keys.get('revision', 'revision')} to use the cached main"
            ) from None
        raise FileNotFoundError(
            f"{err}. Download it first (`hf download {name}` with network access), point {pretrained} at a "
            f"local folder, or set {random_init}=true to measure speed and memory with random weights."
        ) from None
    except ValueError as err:  # not owner/name
        raise ValueError(
            f"{pretrained}={name!r} is neither an existing folder nor a hub id (owner/name): {err}"
        ) from None


def check_device(device: str | torch.device | None, key: str = "device") -> torch.device | None:
    """``device`` as a ``torch.device`` that exists on this machine (``None`` stays ``None``: automatic);
    ``key`` is how the caller spells it in messages (``model.device`` in Hydra).

    Raises:
        ValueError: not a device string, or a CUDA/MPS device this machine does not have.
    """
    if device is None:
        return None
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"{key}={device!r} is not a device; valid: cpu, cuda, cuda:<index>, mps") from err
    if parsed.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ValueError(
                f"{key}={device!r} but this machine has no CUDA device (torch {torch.__version__}); "
                f"use {key}=cpu"
            )
        if parsed.index is not None and parsed.index >= count:
            raise ValueError(f"{key}={device!r} but this machine has {count} CUDA device(s)")
    elif parsed.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"{key}={device!r} but MPS is not available here; use {key}=cpu")
    elif parsed.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"{key}={device!r}: valid devices are cpu, cuda, cuda:<index>, mps")
    return parsed


def model_problems(
    pretrained: str | None,
    *,
    random_init: bool = False,
    device: str | None = None,
    method: Any = None,
    num_processes: int = 1,
    keys: Mapping[str, str] | None = None,
    revision: str | None = None,
) -> list[Exception]:
    """Everything the checkpoint's config and this machine show to be wrong before any weight loads: the
    device (with several processes on CUDA, one GPU each), the checkpoint (present, LLaVA-NeXT AnyRes), and
    ``method``'s parameters against the model (``CompressionMethod.check_model_config``). The one check
    that ``globalcom2.run``, the pre-flight and the plugin share; ``pretrained=None`` checks the device only.
    ``keys``: how the caller spells ``device``, ``pretrained`` and ``random_init`` in messages; ``revision``:
    the hub id's branch, tag or commit (:func:`checkpoint_config`).
    """
    import torch

    keys = keys or {}
    problems: list[Exception] = []
    try:
        if num_processes == 1:
            check_device(device, keys.get("device", "device"))
        elif device is not None and str(device).startswith("cuda"):
            check_device("cuda", keys.get("device", "device"))
            if torch.cuda.device_count() < num_processes:
                raise ValueError(
                    f"launcher.num_processes={num_processes} but this machine has "
                    f"{torch.cuda.device_count()} CUDA device(s): one process per GPU"
                )
    except ValueError as err:
        problems.append(err)
    if pretrained is not None:
        try:
            config = checkpoint_config(pretrained, random_init=random_init, keys=keys, revision=revision)
            if method is not None:
                method.check_model_config(config)
        except (FileNotFoundError, TypeError, ValueError) as err:
            problems.append(err)
    return problems
