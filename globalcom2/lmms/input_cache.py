"""Encoded model inputs kept across the cells of one process (``input_cache_gib``).

A sweep asks every cell the same questions about the same images: the demo runs 25 cells over one set of 120
items. Each cell ran the processor again on each of them (LLaVA-NeXT's AnyRes resize, crop and normalise, and
the tokenizer), about 30 ms per item on the 2-core CPU, 3.7 s of each demo cell's 12-21 s loop. This cache
keeps what a batch encoded to, the host tensors the plugin hands the model, so the cells after the first read
them back instead.

What a hit returns is exact: a copy of the tensors the processor produced for the same inputs, so the answers
are bit-identical to encoding again (``tests/lmms/test_input_cache.py``). The key is everything the encoding
reads:

* the batch: its prompts, the number of images of each row, and each image's pixels (a SHA-256 of its mode,
  size, palette, transparency and bytes, so an equal image loaded twice is one entry, an edited one another);
* the encoder (:func:`encoder_fingerprint`): the processor's configuration, the tokenizer's whole definition,
  the model config (AnyRes geometry, image token id), the protocol's tokenisation, the Vicuna text cut and
  the dtype the pixels are cast to.

Entries are copied in and copied out (a hit for a CUDA model is copied once, straight into pinned memory), so
a caller that modifies its inputs in place cannot change what the next cell reads. The cache is bounded and
never evicts: an entry is kept only if it fits in what the budget has left, so once the budget is nearly spent
only a batch smaller than the room left still enters. Every cell of a sweep reads its batches in the same
order, and least-recently-used eviction would drop each entry just before the next cell asks for it (no hit
at all once the cells' batches exceed the budget), where keeping the first entries serves that share of every
later cell. Entries of another encoder (a sweep over models or dtypes in one process) are not evicted either:
a later encoder finds no hit among them and keeps only what fits beside them. It lives in the process
(:func:`shared_input_cache`): the cells of a local Hydra sweep share it; the processes of a data-parallel cell,
and the jobs of a Slurm sweep, each start empty and gain nothing from it (``globalcom2.run`` warns).

Off by default (``input_cache_gib=0``): a large benchmark (MME's 2,374 items at up to five 336x336 crops, about
7 MB each in fp32) does not fit a sensible budget, and where the batches of one cell cannot be served from an
earlier cell the cache only costs time. The demo turns it on (``configs/experiment/demo.yaml``). Measured there
(2-core CPU, vanilla then GlobalCom² at R = 0.25, 120 items, batch 1): the cache held 0.69 GB; filling it cost
the first cell about 2 s of preparation (3.4-3.9 s without the cache, 5.3-5.7 s with it), of which the digests
and copies took 0.2 s: the processor's own calls ran slower while the cache grew, for a reason not established
(not glibc's mmap and trim thresholds, which changed nothing). The second cell's preparation fell from 3.7 s to
0.5 s.
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections.abc import Callable
from typing import Any

import torch
from PIL import Image

from globalcom2.protocol.batching import PreparedBatch

GIB = 1 << 30


def image_digest(image: Image.Image) -> str:
    """SHA-256 of what the processor reads of ``image``: mode, size, palette (in its own mode, alpha included),
    transparency (a PNG or GIF ``tRNS`` entry, which the conversion to RGB applies) and pixels."""
    digest = hashlib.sha256(f"{image.mode}:{image.size}:{image.info.get('transparency')!r}".encode())
    if image.mode in ("P", "PA") and image.palette is not None:
        digest.update(f"palette:{image.palette.mode}:".encode())
        digest.update(bytes(image.getpalette(rawmode=None) or ()))
    digest.update(image.tobytes())
    return digest.hexdigest()


def batch_key(batch: PreparedBatch) -> tuple:
    """The part of the key that the batch gives: prompts, images per row and each image's digest, in order."""
    return (
        tuple(batch.prompts),
        tuple(batch.images_per_row),
        tuple(image_digest(image) for image in batch.images),
    )


def encoder_fingerprint(
    processor: Any, config: Any, *, protocol: str, vicuna_text: bool, dtype: torch.dtype
) -> str:
    """SHA-256 of everything besides the batch that decides its encoded inputs.

    The tokenizer enters through its whole serialised definition (vocabulary, merges, normaliser, the BOS it
    adds), not its name: a retrained folder under the same path is another encoder.
    """
    tokenizer = processor.tokenizer
    image_processor = getattr(processor, "image_processor", None)
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:  # a fast tokenizer: its JSON holds all of it
        # less its padding and truncation state: each call sets them (the plugin passes padding=True), so the
        # same tokenizer would fingerprint otherwise before and after its first call
        serialised = json.loads(backend.to_str())
        serialised.pop("padding", None)
        serialised.pop("truncation", None)
        definition = json.dumps(serialised, sort_keys=True)
    else:  # a slow one: its vocabulary and the options it was built with (add_bos_token, legacy, ...)
        definition = json.dumps(
            [sorted(tokenizer.get_vocab().items()), tokenizer.init_kwargs], sort_keys=True, default=str
        )
    parts = {
        "processor": type(processor).__name__,
        "processor_config": processor.to_json_string(),
        # the image processor's class, not only its configuration: the PIL and torchvision backends serialise
        # under one image_processor_type and give slightly different pixels
        "image_processor": f"{type(image_processor).__module__}.{type(image_processor).__qualname__}",
        "tokenizer": type(tokenizer).__name__,
        "tokenizer_definition": definition,
        "padding_side": tokenizer.padding_side,
        "pad_token_id": tokenizer.pad_token_id,
        "special_tokens": repr(sorted(tokenizer.special_tokens_map.items())),
        "model_config": config.to_json_string(use_diff=False),
        "protocol": protocol,
        "vicuna_text": vicuna_text,
        "dtype": str(dtype),
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def _copied(inputs: dict[str, torch.Tensor], *, pinned: bool = False) -> dict[str, torch.Tensor]:
    """A copy the caller owns: in pinned memory (one copy where the caller would pin anyway), else cloned."""
    return {name: tensor.pin_memory() if pinned else tensor.clone() for name, tensor in inputs.items()}


def _nbytes(inputs: dict[str, torch.Tensor]) -> int:
    return sum(tensor.numel() * tensor.element_size() for tensor in inputs.values())


class InputCache:
    """Encoded inputs up to ``budget_bytes``; an entry is admitted only if it fits in what is left (none is
    evicted to make room). Safe to use from
    several threads: every entry is immutable once stored, and the table is changed under a lock."""

    def __init__(self, budget_bytes: int) -> None:
        self.budget_bytes = budget_bytes
        self._entries: dict[tuple, dict[str, torch.Tensor]] = {}  # in the order they were admitted
        self._bytes = 0
        self._lock = threading.Lock()

    @property
    def nbytes(self) -> int:
        """Bytes held now."""
        with self._lock:
            return self._bytes

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    def resize(self, budget_bytes: int) -> None:
        """A new budget; the latest entries leave until the held bytes fit it (0 empties the cache)."""
        with self._lock:
            self.budget_bytes = budget_bytes
            while self._bytes > self.budget_bytes and self._entries:
                last = next(reversed(self._entries))
                self._bytes -= _nbytes(self._entries.pop(last))

    def get(self, key: tuple, *, pinned: bool = False) -> dict[str, torch.Tensor] | None:
        """A copy of the entry (pinned, for a CUDA model), or ``None`` if there is none."""
        with self._lock:
            entry = self._entries.get(key)
        return None if entry is None else _copied(entry, pinned=pinned)  # the entry itself never changes

    def put(self, key: tuple, inputs: dict[str, torch.Tensor]) -> bool:
        """Keep a copy of ``inputs`` under ``key`` if it fits in what the budget has left; whether it was kept.
        The copy is made under the lock (about a millisecond for a 672x672 image's inputs), so that the table
        and its byte count change together. Two threads that miss one key at once both encode it; the second
        copy is not kept."""
        size = _nbytes(inputs)
        with self._lock:
            if key in self._entries or self._bytes + size > self.budget_bytes:
                return False
            self._entries[key] = _copied(inputs)
            self._bytes += size
        return True


class CachedEncoder:
    """One cell's view of the shared cache: its encoder's fingerprint, and how many batches it found there."""

    def __init__(self, cache: InputCache, fingerprint: str) -> None:
        self.cache, self.fingerprint = cache, fingerprint
        self.hits = self.misses = 0
        self._lock = threading.Lock()

    def encode(
        self, batch: PreparedBatch, compute: Callable[[], dict[str, torch.Tensor]], *, pinned: bool = False
    ) -> dict[str, torch.Tensor]:
        """The batch's inputs, from the cache or ``compute()`` (then kept if there is room); ``pinned``: in
        pinned memory, for a CUDA model."""
        key = (self.fingerprint, *batch_key(batch))
        found = self.cache.get(key, pinned=pinned)
        with self._lock:
            if found is None:
                self.misses += 1
            else:
                self.hits += 1
        if found is not None:
            return found
        inputs = compute()
        self.cache.put(key, inputs)
        return _copied(inputs, pinned=True) if pinned else inputs  # the computed tensors are the caller's

    def summary(self) -> dict[str, int]:
        """This cell's hits and misses (encodings, the warm-up's included), and the bytes the cache holds now
        (all cells')."""
        with self._lock:
            return {"hits": self.hits, "misses": self.misses, "held_bytes": self.cache.nbytes}


_SHARED: InputCache | None = None
_SHARED_LOCK = threading.Lock()


def shared_input_cache(gib: float) -> InputCache:
    """The process's cache, at a budget of ``gib`` GiB (a smaller budget drops entries down to it; 0 empties
    it, so that a run with the cache off holds nothing of an earlier run's)."""
    global _SHARED
    budget = int(gib * GIB)
    with _SHARED_LOCK:
        if _SHARED is None:
            _SHARED = InputCache(budget)
        else:
            _SHARED.resize(budget)
        return _SHARED
