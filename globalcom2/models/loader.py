"""Loading LLaVA-NeXT checkpoints: the one path from a name to ``(model, processor)``.

One loader serves ``llava-hf/llava-v1.6-vicuna-7b-hf``, ``-13b-hf`` and the tiny offline model, so tests
exercise exactly the code path real evaluations use.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from transformers import AutoProcessor, LlavaNextForConditionalGeneration

from globalcom2.hub import snapshot_commit
from globalcom2.models.base import (
    DTYPE_NAMES,
    check_llava_next_anyres,
    check_transformers_version,
    resolve_dtype,
    tiny_seed,
)
from globalcom2.models.geometry import GEOMETRIES, apply_geometry
from globalcom2.models.preload import (
    check_device,
    check_revision,
    checkpoint_config,
    checkpoint_config_file,
    named_checkpoint,
)
from globalcom2.models.random_init import build_random_llava_next, size_from_name
from globalcom2.models.tiny import tiny_checkpoint


def resolve_checkpoint(pretrained: str | Path) -> str:
    """``"tiny"`` or ``"tiny:<seed>"`` -> the random tiny model's folder (built on first use); ``"tiny-trained"``
    -> the committed trained one; ``~/…`` expanded, as the config check reads it; anything else as is."""
    name = str(pretrained)
    named = named_checkpoint(name)
    if named is not None:
        return str(named)
    seed = tiny_seed(name)
    if seed is not None:
        return str(tiny_checkpoint(seed))
    return str(Path(name).expanduser()) if name.startswith("~") else name


def hub_commit(pretrained: str | Path, revision: str | None = None) -> str | None:
    """The commit ``revision`` (``None``: ``main``) of hub id ``pretrained`` resolves to now
    (:func:`globalcom2.hub.hub_file`: the cache offline, the hub online); ``None`` for a folder, ``tiny`` or
    ``tiny-trained``. A commit resolves to itself without the network, so a pinned load stays pinned.

    Raises:
        FileNotFoundError: no such folder, or the revision is neither cached nor reachable.
        ValueError: ``pretrained`` is neither a folder nor a hub id.
    """
    path = resolve_checkpoint(pretrained)
    if Path(path).is_dir():
        return None
    return snapshot_commit(checkpoint_config_file(path, revision=revision))


#: What random weights are built in under ``dtype="auto"``: the llava-hf checkpoints' dtype.
RANDOM_INIT_AUTO_DTYPE = "float16"


def auto_dtype(
    pretrained: str | Path, *, random_init: bool = False, revision: str | None = None
) -> str | None:
    """The dtype ``dtype="auto"`` (or ``None``) loads ``pretrained`` in, by name (``"float16"``), read without
    loading any weight; ``None`` where that is not known beforehand.

    transformers 5 resolves ``auto`` from the config's ``dtype`` (``torch_dtype`` in older files) first, a
    per-module dict by its ``""`` entry (the default dtype where it has none), and only where the config names
    no dtype from the weights' first floating tensor (``modeling_utils.py``, ``_get_dtype``). This reads the
    config the load reads: the folder's (a built ``tiny`` one's included) or the hub snapshot's at
    ``revision``. ``None`` where that config names no dtype, one outside
    :data:`~globalcom2.models.base.DTYPE_CHOICES` (``float64``), or cannot be read: the load then leaves
    ``auto`` to transformers, and a cell's identity keeps ``auto`` (``globalcom2.cells``).
    :func:`load_llava_next` loads in the dtype named here, so a cell's identity never names a dtype other
    than the one it runs in.
    """
    if random_init:
        return RANDOM_INIT_AUTO_DTYPE
    # An unreadable or missing config, a revision where there is none, or a dtype the config cannot hold
    # (``LlavaNextConfig`` raises AttributeError on ``"dtype": "auto"``): the load itself reports these.
    try:
        config = checkpoint_config(resolve_checkpoint(pretrained), revision=revision)
    except (OSError, ValueError, AttributeError):
        return None
    return config_dtype(config)


def config_dtype(config: Any) -> str | None:
    """The dtype a checkpoint's config names for ``dtype="auto"`` (:func:`auto_dtype`), by name; ``None``
    where it names none or one outside :data:`~globalcom2.models.base.DTYPE_CHOICES`."""
    dtype = config.dtype
    if isinstance(dtype, dict):  # per module: transformers loads every module in the "" entry's dtype
        dtype = dtype.get("", torch.get_default_dtype())
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
    return DTYPE_NAMES.get(dtype) if isinstance(dtype, torch.dtype) else None


def load_llava_next(
    pretrained: str | Path,
    *,
    dtype: str | torch.dtype | None = "float32",
    device: str | torch.device = "cpu",
    attn_implementation: str | dict[str, str] = "sdpa",
    random_init: bool = False,
    geometry: str = "transformers",
    revision: str | None = None,
) -> tuple[LlavaNextForConditionalGeneration, Any]:
    """Load a LLaVA-NeXT checkpoint and its processor, ready for left-padded batched generation.

    Args:
        pretrained: a hub id or local folder (``llava-hf/llava-v1.6-vicuna-7b-hf``), ``"tiny[:seed]"`` (random
            weights) or ``"tiny-trained"`` (trained by ``make train-tiny``).
        dtype: weights dtype; ``"auto"`` or ``None``: the checkpoint's own (:func:`auto_dtype`).
        device: where to put the model.
        attn_implementation: ``"sdpa"`` (default), ``"eager"``, or a per-sub-config dict.
        random_init: build ``pretrained``'s architecture (7B or 13B, read from its name) with random
            weights instead of loading it: for speed and memory measurements without the checkpoint.
        geometry: ``"transformers"`` (default) or ``"llava"``: the original LLaVA code's AnyRes grid ties and
            unpadding, for this model and processor (``globalcom2.models.geometry``).
        revision: for a hub id, the branch, tag or commit to load (``None``: ``main``). It is resolved to its
            commit once (:func:`hub_commit`), so the config check, the weights and the processor read one
            snapshot.
            ``globalcom2.run`` passes the commit a cell's identity names, so the weights loaded are the ones
            the cell is stored under (``globalcom2.models.fingerprint``).

    Returns:
        ``(model, processor)``; the model is in eval mode and passes :func:`check_llava_next_anyres`.

    Raises:
        UnsupportedModelError: the checkpoint's config is not LLaVA-NeXT AnyRes (read before any weight).
        FileNotFoundError: no such folder, not in the cache while offline, or no processor files.
        IncompleteCheckpointError: the weights lack or mis-shape some of the model's parameters.
        ValueError: a bad dtype or geometry, or a ``revision`` where there is none (random weights, tiny, a
            folder).
    """
    check_transformers_version()  # before minutes of loading weights into a transformers we do not support
    resolve_dtype(dtype)  # a bad dtype fails before anything is read
    check_revision(str(pretrained), revision, random_init=random_init)
    check_device(device)  # so does a device this machine lacks
    if geometry not in GEOMETRIES:
        raise ValueError(f"geometry={geometry!r}; valid: {', '.join(GEOMETRIES)}")
    if random_init:
        model, processor = build_random_llava_next(
            size_from_name(str(pretrained)),
            dtype=RANDOM_INIT_AUTO_DTYPE if dtype in (None, "auto") else dtype,
            device=device,
            attn_implementation=attn_implementation,
        )
        apply_geometry(model, processor, geometry)
        return model, processor
    # The hub is asked once, here: the config check, the weights and the processor then read that one
    # commit's snapshot, which a branch moving on the hub meanwhile cannot change.
    revision = hub_commit(pretrained, revision) or revision
    config = checkpoint_config(pretrained, revision=revision)  # a wrong model type fails before the weights
    if dtype in (None, "auto"):  # the dtype a cell's identity names (auto_dtype), where the config names one
        dtype = config_dtype(config) or "auto"
    path = resolve_checkpoint(pretrained)
    try:
        # The processor first: a few files, so a checkpoint without its tokenizer or image processor fails in
        # a second, not after minutes of loading weights.
        # Pin the PIL image processor: it exists on every machine (no torchvision needed), and the
        # torchvision backend gives slightly different pixels, so one backend keeps numbers comparable.
        processor = AutoProcessor.from_pretrained(path, revision=revision, backend="pil")
        missing = [
            part for part in ("tokenizer", "image_processor") if getattr(processor, part, None) is None
        ]
        if missing:  # AutoProcessor falls back to a bare tokenizer where the processor configs are absent
            raise OSError(f"its processor files give no {' and no '.join(missing)}")
        # use_kernels=False: transformers 5.25 swaps hub kernels in by default (``kernels`` installed; on
        # CUDA LigerRMSNorm, SiLU and rotary from kernels-community, fetched from the hub) where 5.23 did
        # not; pinned off, both run the plain PyTorch forwards the reference stack ran, and offline nothing
        # is fetched.
        model, loading = LlavaNextForConditionalGeneration.from_pretrained(
            path,
            revision=revision,
            dtype=resolve_dtype(dtype),
            attn_implementation=attn_implementation,
            use_kernels=False,
            output_loading_info=True,
        )
    except OSError as err:
        raise FileNotFoundError(
            f"cannot load a LLaVA-NeXT checkpoint from {path!r}{f' at {revision}' if revision else ''}: "
            f"{str(err).rstrip('.')}. "
            "Pass a local folder, download it first (e.g. `hf download llava-hf/llava-v1.6-vicuna-7b-hf"
            f"{f' --revision {revision}' if revision else ''}`), or use pretrained='tiny'."
        ) from err
    check_complete(loading, path, revision)
    model = model.to(device).eval()
    check_llava_next_anyres(model)
    processor.tokenizer.padding_side = "left"  # not serialised by tokenizers; batched generation needs it
    apply_geometry(model, processor, geometry)
    return model, processor


class IncompleteCheckpointError(ValueError):
    """A checkpoint lacks weights of the model, which ``from_pretrained`` would draw at random."""


def check_complete(loading: dict[str, Any], path: str, revision: str | None = None) -> None:
    """Refuse a load that filled weights at random: ``from_pretrained`` only reports them (a "LOAD REPORT"
    on the console) and returns a model that runs, so a truncated download or a file edited by hand would
    give a silently wrong model.

    Args:
        loading: ``from_pretrained(..., output_loading_info=True)``'s second value.

    Raises:
        IncompleteCheckpointError: naming how many parameters are missing or mis-shaped, and the first few.
    """
    absent = sorted(loading.get("missing_keys") or ())
    mismatched = sorted(
        str(key[0] if isinstance(key, tuple) else key) for key in loading.get("mismatched_keys") or ()
    )
    if not absent and not mismatched:
        return
    named = [*absent, *mismatched]
    shown = ", ".join(named[:8]) + (f" and {len(named) - 8} more" if len(named) > 8 else "")
    raise IncompleteCheckpointError(
        f"checkpoint {path!r}{f' at {revision}' if revision else ''} lacks {len(absent)} and mis-shapes "
        f"{len(mismatched)} of the model's parameters ({shown}); transformers would initialise them at random. "
        "Download the checkpoint again (a partial download?), or pass a complete folder"
    )


def load_tiny_llava_next(seed: int = 0, **load_kwargs: Any) -> tuple[LlavaNextForConditionalGeneration, Any]:
    """``(model, processor)`` of the random tiny LLaVA-NeXT for ``seed``, loaded like a real checkpoint.

    Args:
        seed: weights are a deterministic function of it.
        **load_kwargs: forwarded to :func:`load_llava_next` (``dtype``, ``device``, ``attn_implementation``).
    """
    return load_llava_next(tiny_checkpoint(seed), **load_kwargs)
