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
from pathlib import Path
from typing import Any

import torch
from transformers import LlavaNextConfig

from globalcom2.hub import hub_offline

SUPPORTED_MODEL_TYPE = "llava_next"
SUPPORTED_ARCHITECTURE = "LlavaNextForConditionalGeneration"
SUPPORTED_CHECKPOINTS = (
    "llava-hf/llava-v1.6-vicuna-7b-hf",
    "llava-hf/llava-v1.6-vicuna-13b-hf",
    "tiny (built in code, see globalcom2.models.tiny)",
    "tiny-trained (trained by `make train-tiny`, committed; see globalcom2.models.tiny_trained)",
)
TINY = "tiny"
TINY_TRAINED = "tiny-trained"


class UnsupportedModelError(ValueError):
    """The checkpoint is not a LLaVA-NeXT AnyRes model."""


def tiny_seed(name: str) -> int | None:
    """``"tiny"`` -> 0, ``"tiny:3"`` -> 3, anything else -> ``None``; ``"tiny:x"`` raises."""
    if name != TINY and not name.startswith(f"{TINY}:"):
        return None
    seed = name.partition(":")[2]
    if seed and not seed.isdigit():
        raise ValueError(
            f"pretrained={name!r}: the tiny model is 'tiny' or 'tiny:<seed>' with an integer seed"
        )
    return int(seed or 0)


def named_checkpoint(name: str) -> Path | None:
    """The folder of a checkpoint the project ships by name (``"tiny-trained"``), else ``None``."""
    if name != TINY_TRAINED:
        return None
    from globalcom2.models.tiny_trained import CHECKPOINT_DIR

    if not (CHECKPOINT_DIR / "config.json").is_file():
        raise FileNotFoundError(
            f"pretrained={name!r}: the trained tiny checkpoint is missing from {CHECKPOINT_DIR}; it is "
            "committed with the project, or rebuilt by `make train-tiny`"
        )
    return CHECKPOINT_DIR


def checkpoint_config(pretrained: str | Path, *, random_init: bool = False) -> LlavaNextConfig:
    """The config of the checkpoint ``pretrained`` names, read without loading any weight.

    Args:
        pretrained: a hub id (``llava-hf/llava-v1.6-vicuna-7b-hf``), a local folder, ``tiny[:seed]`` or
            ``tiny-trained``.
        random_init: the 7B/13B architecture named by ``pretrained`` is built, not read.

    Raises:
        FileNotFoundError: a missing folder, a folder without ``config.json``, or a hub checkpoint that is
            not in the local cache while the hub is offline (or cannot be reached).
        ValueError: a name that is neither a folder nor a valid hub id.
        UnsupportedModelError: the checkpoint is not LLaVA-NeXT with AnyRes crops.
    """
    name = str(pretrained)
    if random_init:
        from globalcom2.models.random_init import llava_next_config_for

        return llava_next_config_for(name)
    if tiny_seed(name) is not None:
        from globalcom2.models.tiny import byte_level_tokenizer, tiny_config

        return tiny_config(byte_level_tokenizer())
    named = named_checkpoint(name)
    config_file = named / "config.json" if named is not None else _config_file(name)
    raw = json.loads(config_file.read_text(encoding="utf-8"))
    check_config_type(raw, name)
    config = LlavaNextConfig.from_dict(raw)
    check_llava_next_config(config, name)
    return config


def _config_file(name: str) -> Path:
    """``config.json`` of a local folder or a hub checkpoint (cache first; the hub only when online)."""
    path = Path(name).expanduser()
    if path.exists() or name.startswith(("/", ".", "~")) or name.count("/") > 1:
        if not path.is_dir():
            raise FileNotFoundError(
                f"model.pretrained={name!r}: no such checkpoint folder. Pass an existing folder, a hub id "
                f"(e.g. {SUPPORTED_CHECKPOINTS[0]}) or 'tiny'."
            )
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"checkpoint folder {name!r} has no config.json")
        return path / "config.json"
    from huggingface_hub import hf_hub_download, try_to_load_from_cache
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(name)
    except HFValidationError as err:
        raise ValueError(
            f"model.pretrained={name!r} is neither an existing folder nor a hub id (owner/name): {err}"
        ) from None
    cached = try_to_load_from_cache(name, "config.json")
    if isinstance(cached, str):
        return Path(cached)
    if hub_offline():
        raise FileNotFoundError(
            f"checkpoint {name!r} is not in the local Hugging Face cache and the hub is offline "
            f"(HF_HUB_OFFLINE). Download it first (`hf download {name}` with network access), point "
            "model.pretrained at a local folder, or set model.random_init=true to measure speed and memory "
            "with random weights."
        )
    try:
        return Path(hf_hub_download(name, "config.json"))
    except Exception as err:  # network, auth, missing repo: all mean "cannot read the config"
        raise FileNotFoundError(f"cannot read config.json of {name!r} from the hub: {err}") from err


def check_config_type(raw: dict[str, Any], source: str) -> None:
    """Refuse a config whose ``model_type`` or ``architectures`` is not LLaVA-NeXT's."""
    model_type = raw.get("model_type")
    architectures = raw.get("architectures") or []
    if model_type != SUPPORTED_MODEL_TYPE or (architectures and SUPPORTED_ARCHITECTURE not in architectures):
        raise UnsupportedModelError(
            f"{source!r} is a {model_type!r} model ({', '.join(architectures) or 'no architectures listed'}); "
            f"only LLaVA-NeXT AnyRes checkpoints are supported (model_type {SUPPORTED_MODEL_TYPE!r}, "
            f"{SUPPORTED_ARCHITECTURE}), e.g. {', '.join(SUPPORTED_CHECKPOINTS)}."
        )


def check_llava_next_config(config: Any, source: str = "the model") -> None:
    """Raise unless ``config`` describes AnyRes crops with [CLS] dropped and one feature layer.

    The compression methods reason about LLaVA-NeXT's packed layout (thumbnail + unpadded crops + row
    separators, ``globalcom2.anyres``); other layouts would be silently mis-compressed.
    """
    if not getattr(config, "image_grid_pinpoints", None):
        raise UnsupportedModelError(f"{source}: the config has no image_grid_pinpoints, so no AnyRes crops")
    if config.vision_feature_select_strategy != "default":
        raise UnsupportedModelError(
            f"{source}: vision_feature_select_strategy must be 'default' ([CLS] dropped, 576 patch tokens per "
            f"view), got {config.vision_feature_select_strategy!r}"
        )
    if not isinstance(config.vision_feature_layer, int):
        raise UnsupportedModelError(
            f"{source}: a single vision_feature_layer is required, got {config.vision_feature_layer!r}"
        )
    vision = config.vision_config
    if vision.image_size % vision.patch_size:
        raise UnsupportedModelError(
            f"{source}: image_size {vision.image_size} is not a multiple of patch_size {vision.patch_size}"
        )


def check_device(device: str | torch.device | None) -> torch.device | None:
    """``device`` as a ``torch.device`` that exists on this machine (``None`` stays ``None``: automatic).

    Raises:
        ValueError: not a device string, or a CUDA/MPS device this machine does not have.
    """
    if device is None:
        return None
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ValueError(
            f"model.device={device!r} is not a device; valid: cpu, cuda, cuda:<index>, mps"
        ) from err
    if parsed.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ValueError(
                f"model.device={device!r} but this machine has no CUDA device (torch {torch.__version__}); "
                "use model.device=cpu"
            )
        if parsed.index is not None and parsed.index >= count:
            raise ValueError(f"model.device={device!r} but this machine has {count} CUDA device(s)")
    elif parsed.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"model.device={device!r} but MPS is not available here; use model.device=cpu")
    elif parsed.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"model.device={device!r}: valid devices are cpu, cuda, cuda:<index>, mps")
    return parsed


def model_problems(
    pretrained: str | None,
    *,
    random_init: bool = False,
    device: str | None = None,
    method: Any = None,
    num_processes: int = 1,
) -> list[Exception]:
    """Everything the checkpoint's config and this machine show to be wrong before any weight loads: the
    device (with several processes on CUDA, one GPU each), the checkpoint (present, LLaVA-NeXT AnyRes), and
    ``method``'s parameters against the model (``CompressionMethod.check_model_config``). The one check
    that ``globalcom2.run``, the pre-flight and the plugin share; ``pretrained=None`` checks the device only.
    """
    import torch

    problems: list[Exception] = []
    try:
        if num_processes == 1:
            check_device(device)
        elif device is not None and str(device).startswith("cuda"):
            check_device("cuda")
            if torch.cuda.device_count() < num_processes:
                raise ValueError(
                    f"launcher.num_processes={num_processes} but this machine has "
                    f"{torch.cuda.device_count()} CUDA device(s): one process per GPU"
                )
    except ValueError as err:
        problems.append(err)
    if pretrained is not None:
        try:
            config = checkpoint_config(pretrained, random_init=random_init)
            if method is not None:
                method.check_model_config(config)
        except (FileNotFoundError, TypeError, ValueError) as err:
            problems.append(err)
    return problems
