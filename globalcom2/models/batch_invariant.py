"""Batch-invariant execution: a row's numbers do not depend on the batch it runs in (bf16; fp32 on a CPU, below).

Why a batch changes answers in bf16: a kernel's reduction order depends on the shape it is given. cuBLAS picks
its GEMM (tile, split-K) from the row count ``M``, attention kernels pick their splits from the batch, and a
left-padded row sits at other offsets of its attention's key blocks than the same prompt alone. In fp32 the
rounding this changes rarely flips a token; in bf16, on a first H200 run whose files are not kept here, about
half of a random 7B's 8-token answers changed between batch 1 and batch 4, and a real LLaVA-1.5-7B lost 11
ScienceQA-IMG points at batch 2
(https://github.com/EvolvingLMMs-Lab/lmms-eval/issues/236). The remedy follows "Defeating Nondeterminism in
LLM Inference" (He and Thinking Machines Lab, 2025; its kernels: thinking-machines-lab/batch_invariant_ops):
make every operation compute each row with a reduction order that does not depend on the other rows. Instead
of new kernels, this module gives the existing ones shapes that do not depend on the batch, so it runs on any
device:

* **Matrix products** (``F.linear``): rows go through in calls of a fixed number of rows, the last block
  padded with zeros, so every GEMM call has the same shape whatever the batch, and a GEMM computes each
  output row from that row alone. A sequence (a prompt, a vision view) gets its own blocks of
  :data:`PREFILL_ROWS`, aligned to its end, so a token also sits at the same offset in its block in a
  left-padded batch as alone (a stream-K GEMM may sum the rows of different output tiles in different
  orders). One-token inputs (decode steps, the LM head) go together in blocks of :data:`DECODE_ROWS`, which
  costs no more than one row (the weights' read dominates) where a block per row would read the weights
  once per row.
* **Row reductions** (``F.layer_norm``, the RMS norm's ``mean(-1)``, ``softmax(-1)``): the same blocks.
* **Batched products** (``bmm``, batched ``matmul``) and **convolutions**: one call per batch element.
* **Attention** (``F.scaled_dot_product_attention``): one call per batch row on that row's own keys and
  queries, the left padding sliced off, with the flags the row would get alone (``is_causal`` for a prompt,
  neither mask nor causality for a decode step). A mask must be the model's own left-padded causal or
  decode mask; anything else raises instead of being guessed at.
* transformers chooses between three formulations of grouped-query attention depending on whether a mask is
  present (``integrations/sdpa_attention.py``: ``enable_gqa``, ``pack_gqa``, ``repeat_kv``), so a padded
  batch and a prompt alone would run different calls. The mode sets ``TRANSFORMERS_SDPA_FORCE_GQA=1``
  (read at every call, transformers 5.23-5.25; checked once), which always takes ``enable_gqa``.
  LLaVA-NeXT 7B/13B have no grouped-query attention; the tiny test models have.

Gathers and scatters are batch-invariant already, and so are elementwise operations, with one exception: on
a CPU, the vectorised fp32 SiLU gives an element a last bit that can depend on the element's offset in the
array (``F.silu(x)[j:]`` and ``F.silu(x[j:])`` differ by up to 1.5e-8 on a standard normal ``x``; in bf16 they
are equal), and the batch decides the offset. In fp32 on the CPU the tiny model's batched rows then differ
from their runs alone by 2.7e-6 to 5.8e-6 in a logit under this mode (SDPA, eager attention); in bf16 the
difference rounds away. What this buys, and what it does not:

* **Tested**: batch N gives every row bit for bit what batch 1 gives it, both under this mode, in bf16 on
  the CPU, for vanilla and every method (``tests/models/test_batch_invariant.py``), where the unmodified
  model's rows differ by up to 0.7 in a logit. **On CUDA** the ``gpu`` tests passed on one H100 (bf16, torch
  2.11, ``results/gpu_checklist/h100_2026-12-05``): the tiny model end to end, and the one assumption the CPU
  cannot show, that a GEMM of a fixed shape gives a row the same numbers at any offset in its block, at 7B's
  shapes. One GPU model and one driver; the end-to-end check on the tiny model only.
* **Not the same numbers as without it**: a GEMM over a zero-padded block can round differently from one
  over the bare rows, so a cell run with the mode is another cell (``model.batch_invariant`` in its
  identity). Compare batch-invariant cells with each other.
* **Costs** a padded block per sequence and matrix product, and one attention call per row: ``make
  bench-throughput ARGS="--batch-invariant both"`` measures it next to the plain mode.
* **Not with** ``compile``: dynamo would trace through the mode's Python.
* **A method's own tensor code is covered only in part.** It runs under the mode, but what the mode makes
  invariant is the model's own operations. A method's batched products are split per element, yet each call
  keeps the widths the batch pads (the scoring layer's ``[KV, G Q, hd] @ [KV, hd, L]``); its ``sum``,
  ``norm`` and ``einsum`` reductions are not routed at all. Such a score can differ in its last bit with the
  batch, which changes a selection only at an exact near-tie. The tests check every registered method end to
  end in bf16 on the CPU, where no row differed, and vanilla, GlobalCom² and SparseVLM on one H100 (tiny
  model), where none differed either.
* **One host read per attention mask** (not per layer): a mask's row padding is read and checked once and
  remembered while that tensor lives, so a decode step costs one read (``generate`` reads once per step for
  its stopping criteria already).
"""

from __future__ import annotations

import contextlib
import functools
import os
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

#: Rows per matrix-product call for one-token inputs (decode steps, the LM head): at least a batch, and small
#: enough that the GEMM stays bound by reading its weights.
DECODE_ROWS = 32
#: Rows per matrix-product call for a sequence (prompts, vision crops): enough for a GEMM near its peak, few
#: enough that a sequence's one partial block stays a modest share (577-token CLIP views: 768 rows).
PREFILL_ROWS = 256
#: transformers' switch that always runs grouped-query attention through SDPA's ``enable_gqa``.
FORCE_GQA_VARIABLE = "TRANSFORMERS_SDPA_FORCE_GQA"

_SOFTMAXES = {F.softmax, torch.softmax, torch.Tensor.softmax}
_MEANS = {torch.mean, torch.Tensor.mean}
_BATCHED_PRODUCTS = {torch.bmm, torch.Tensor.bmm, torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__}

RowPlan = tuple[int, int, bool]  # (first real query row, first real key row, is_causal) of one batch row


def in_fixed_blocks(
    rows: torch.Tensor, fn: Callable[[torch.Tensor], torch.Tensor], block: int
) -> torch.Tensor:
    """``fn`` applied to ``rows [M, ...]`` in calls of exactly ``block`` rows (the last one zero-padded), so
    that each row's result depends on that row only; returns ``[M, ...]``."""
    count = rows.shape[0]
    padding = -count % block
    if padding:
        rows = torch.cat([rows, rows.new_zeros((padding, *rows.shape[1:]))])  # [M + padding, ...]
    if rows.shape[0] == block:
        return fn(rows)[:count]
    return torch.cat([fn(part) for part in rows.split(block)])[:count]


def sequences_in_blocks(
    x: torch.Tensor, fn: Callable[[torch.Tensor], torch.Tensor], block: int
) -> torch.Tensor:
    """``fn`` (``[block, K] -> [block, N]``) over ``x [B, S, K]``, each sequence in its own blocks, aligned to
    its end (the zero padding goes in front): a token's offset in its block then depends only on its distance
    from the end of its sequence, which left padding does not change. So even a GEMM whose summation order
    differed between the rows of one call (stream-K kernels split output tiles differently) gives a token the
    same numbers in a padded batch as in its prompt alone. Returns ``[B, S, N]``."""
    batch, length, width = x.shape
    padding = -length % block
    padded = torch.cat([x.new_zeros(batch, padding, width), x], dim=1) if padding else x  # [B, S + p, K]
    out = torch.cat([fn(part) for part in padded.reshape(-1, block, width)])  # [B (S + p), N]
    return out.view(batch, length + padding, -1)[:, padding:]  # [B, S, N]


def _last_dim_in_blocks(x: torch.Tensor, fn: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """``fn`` (``[M, K] -> [M, N]``) over the last dimension of ``x [..., K]`` in fixed blocks: the hidden states
    of sequences (``x [B, S, K]`` with ``S > 1``) in end-aligned blocks of :data:`PREFILL_ROWS`; one-token rows
    (``[B, 1, K]``: decode steps) together in blocks of :data:`DECODE_ROWS`, since a block per row would read
    the weights once per row; anything else (a method's ``[B, H, Q, L]`` scores, ``[M, K]`` rows) flat in
    blocks of :data:`PREFILL_ROWS`, where a row's offset moves with the batch (harmless for row-wise kernels
    such as softmax)."""
    if x.dim() == 3 and x.shape[1] > 1:
        out = sequences_in_blocks(x, fn, PREFILL_ROWS)  # [B, S, N]
    else:
        block = DECODE_ROWS if x.dim() == 3 else PREFILL_ROWS
        out = in_fixed_blocks(x.reshape(-1, x.shape[-1]), fn, block)  # [M, N]
    return out.reshape(*x.shape[:-1], out.shape[-1])


def _last_dim(args: tuple, kwargs: dict) -> bool:
    """Whether a ``softmax``/``mean`` call reduces the last dimension of a tensor of two or more dimensions
    (the only case made invariant; others run as they are)."""
    dim = kwargs.get("dim", args[1] if len(args) > 1 else None)
    tensor = args[0]
    if isinstance(dim, (tuple, list)):
        dim = dim[0] if len(dim) == 1 else None
    return (
        isinstance(dim, int)
        and isinstance(tensor, torch.Tensor)
        and tensor.dim() >= 2
        and (dim == -1 or dim == tensor.dim() - 1)
    )


def attention_plan(
    mask: torch.Tensor | None, batch: int, query_length: int, key_length: int, is_causal: bool
) -> list[RowPlan]:
    """Each row's real query and key rows and its causality, from the mask transformers built.

    Accepted masks (``[B or 1, 1, Q or 1, K]``, boolean or additive with 0 where attended) are the two a
    left-padded batch gets: a prompt's causal mask (``Q == K``: row ``b`` is real from ``start_b`` on and
    attends causally from there) and a decode step's key mask (one query row: keys from ``start_b`` on). Reads
    the mask on the host once.

    Raises:
        ValueError: any other mask, saying which row breaks which rule.
    """
    if mask is None:
        return [(0, 0, is_causal)] * batch
    if (
        mask.dim() != 4
        or mask.shape[0] not in (1, batch)
        or mask.shape[1] != 1
        or mask.shape[-1] != key_length
    ):
        raise ValueError(
            f"batch-invariant attention needs a [batch, 1, queries or 1, {key_length}] mask (one for all heads), "
            f"got {tuple(mask.shape)}"
        )
    attended = mask if mask.dtype == torch.bool else mask == 0  # [B, 1, Q or 1, K]
    attended = attended[:, 0].expand(batch, -1, -1)  # [B, Q or 1, K]
    keys = torch.arange(key_length, device=mask.device)  # [K]
    starts = key_length - attended[:, -1].sum(-1)  # [B] first real key of each row
    real_key = keys >= starts[:, None]  # [B, K]
    if attended.shape[1] == 1 and query_length == 1:
        expected = real_key[:, None]  # [B, 1, K]
        causal = False
    elif attended.shape[1] == query_length == key_length:
        queries = keys[:, None]  # [K, 1]
        expected = real_key[:, None] & (keys[None] <= queries)  # [B, K, K]
        # only the real query rows count: a padded query row's output is never read
        attended = attended | ~real_key[:, :, None]
        expected = expected | ~real_key[:, :, None]
        causal = True
    else:
        raise ValueError(
            f"batch-invariant attention supports a prompt (queries == keys) or a one-query decode step; got "
            f"{query_length} queries, {key_length} keys and a mask of {attended.shape[1]} query rows"
        )
    matches = (attended == expected).flatten(1).all(-1)  # [B]
    host = torch.stack([starts, matches.long()]).tolist()  # one read
    broken = [row for row, ok in enumerate(host[1]) if not ok]
    if broken:
        raise ValueError(
            f"batch-invariant attention: rows {broken} of the mask are not a left-padded "
            f"{'causal prompt' if causal else 'decode step'} mask"
        )
    if causal:
        return [(start, start, query_length - start > 1) for start in host[0]]
    return [(0, start, False) for start in host[0]]


class BatchInvariantMode(TorchFunctionMode):
    """A ``TorchFunctionMode`` that runs every operation in shapes independent of the batch (module
    docstring). Use :func:`batch_invariant`, which also checks transformers' GQA switch. A call in a form the
    mode does not recognise (an ``out=`` argument, a reduction over another dimension) runs unchanged."""

    def __init__(self) -> None:
        super().__init__()
        # id(mask) -> (a weak reference to it, the call shape it was read for, its plan)
        self._plans: dict[int, tuple[weakref.ref, tuple, list[RowPlan]]] = {}

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if args and isinstance(args[0], torch.Tensor) and args[0].numel() == 0:
            return func(*args, **kwargs)  # nothing to compute, and no block to build
        if func is F.linear and 2 <= len(args) <= 3 and not kwargs:
            weight, bias = args[1], args[2] if len(args) == 3 else None
            return _last_dim_in_blocks(args[0], lambda rows: F.linear(rows, weight, bias))
        if func is F.scaled_dot_product_attention and len(args) >= 3:
            return self._attention(*args, **kwargs)
        layer_norm_call = func is F.layer_norm and len(args) == 2 and set(kwargs) <= {"weight", "bias", "eps"}
        if layer_norm_call and len(args[1]) == 1:
            return _last_dim_in_blocks(args[0], lambda rows: func(rows, args[1], **kwargs))
        softmax_call = (
            func in _SOFTMAXES and len(args) <= 2 and set(kwargs) <= {"dim", "dtype", "_stacklevel"}
        )
        if softmax_call and _last_dim(args, kwargs):
            dtype = kwargs.get("dtype")
            return _last_dim_in_blocks(args[0], lambda rows: func(rows, -1, dtype=dtype))
        if (
            func in _MEANS
            and len(args) <= 2
            and set(kwargs) <= {"dim", "keepdim"}
            and _last_dim(args, kwargs)
        ):
            out = _last_dim_in_blocks(args[0], lambda rows: func(rows, -1, keepdim=True))  # [..., 1]
            return out if kwargs.get("keepdim", False) else out.squeeze(-1)
        if func in _BATCHED_PRODUCTS and len(args) == 2 and not kwargs and _batched_pair(args):
            first, second = args
            return torch.cat([func(first[i : i + 1], second[i : i + 1]) for i in range(first.shape[0])])
        if func is F.conv2d and args and not kwargs and args[0].dim() == 4 and args[0].shape[0] > 1:
            images = args[0]
            return torch.cat([func(images[i : i + 1], *args[1:]) for i in range(images.shape[0])])
        return func(*args, **kwargs)

    def _attention(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attn_mask: torch.Tensor | None = None,
        dropout_p: float = 0.0,
        is_causal: bool = False,
        scale: float | None = None,
        enable_gqa: bool = False,
    ) -> torch.Tensor:
        """SDPA one batch row at a time on the row's real queries and keys (``[B, H, Q, hd]`` in and out)."""
        batch, _, query_length, _ = query.shape
        plan = self._plan(attn_mask, batch, query_length, key.shape[2], is_causal)

        def row_attention(row: int, first_query: int, first_key: int, causal: bool) -> torch.Tensor:
            return F.scaled_dot_product_attention(
                query[row : row + 1, :, first_query:],
                key[row : row + 1, :, first_key:],
                value[row : row + 1, :, first_key:],
                dropout_p=dropout_p,
                is_causal=causal,
                scale=scale,
                enable_gqa=enable_gqa,
            )  # [1, H, Q - first_query, hd]

        # decode steps and vision views pad no query row: the rows' outputs are simply stacked
        if not any(first_query for first_query, _, _ in plan):
            return torch.cat([row_attention(row, *entry) for row, entry in enumerate(plan)])
        output = query.new_zeros((*query.shape[:-1], value.shape[-1]))  # [B, H, Q, hd]; padded rows stay 0
        for row, (first_query, first_key, causal) in enumerate(plan):
            output[row : row + 1, :, first_query:] = row_attention(row, first_query, first_key, causal)
        return output

    def _plan(
        self, mask: torch.Tensor | None, batch: int, query_length: int, key_length: int, is_causal: bool
    ) -> list[RowPlan]:
        """:func:`attention_plan`, remembered per mask tensor and call shape (every layer of a forward gets the
        same mask, so a forward reads it once)."""
        if mask is None:
            return attention_plan(None, batch, query_length, key_length, is_causal)
        shape = (batch, query_length, key_length, is_causal)
        known = self._plans.get(id(mask))
        if known is not None and known[0]() is mask and known[1] == shape:
            return known[2]
        plan = attention_plan(mask, batch, query_length, key_length, is_causal)
        key = id(mask)
        self._plans[key] = (weakref.ref(mask, lambda _: self._plans.pop(key, None)), shape, plan)
        return plan


def _batched_pair(args: tuple) -> bool:
    """Two tensors of at least 3 dimensions with the same leading (batch) size."""
    return (
        all(isinstance(t, torch.Tensor) and t.dim() >= 3 for t in args[:2])
        and args[0].shape[0] == args[1].shape[0]
        and args[0].dim() == args[1].dim()
    )


@functools.cache
def _check_gqa_switch() -> None:
    """Fail loudly if this transformers ignores :data:`FORCE_GQA_VARIABLE` (read in
    ``integrations/sdpa_attention.py`` ``use_gqa_in_sdpa`` in 5.23-5.25): a padded batch would then run
    grouped-query attention another way than a prompt alone."""
    from transformers.integrations import sdpa_attention

    probe = torch.zeros(1, 1, 1, 2)  # [B, KV, T, hd] with a mask present: the case the switch decides
    if not sdpa_attention.use_gqa_in_sdpa(torch.ones(1, 1, 1, 1, dtype=torch.bool), probe, probe):
        raise RuntimeError(
            f"this transformers ignores {FORCE_GQA_VARIABLE}=1, so batch-invariant attention cannot pin its "
            "grouped-query formulation; use transformers 5.23-5.25"
        )


@contextmanager
def forced_gqa() -> Iterator[None]:
    """:data:`FORCE_GQA_VARIABLE` set for the block (and checked), then restored. Changing the environment while
    another thread reads it (the tokenizer reads ``TOKENIZERS_PARALLELISM``) is a data race in the C library,
    so the plugin enters this around a whole ``generate_until``, before its prefetch thread starts and after
    it has been joined; restoring it keeps a later cell of the same process (a Hydra multirun) plain."""
    previous = os.environ.get(FORCE_GQA_VARIABLE)
    try:
        os.environ[FORCE_GQA_VARIABLE] = "1"
        _check_gqa_switch()
        yield
    finally:
        if previous is None:
            os.environ.pop(FORCE_GQA_VARIABLE, None)
        else:
            os.environ[FORCE_GQA_VARIABLE] = previous


@contextmanager
def batch_invariant() -> Iterator[BatchInvariantMode]:
    """Run the block batch-invariantly (module docstring). Sets :data:`FORCE_GQA_VARIABLE` for the block unless a
    caller's :func:`forced_gqa` already has."""
    if os.environ.get(FORCE_GQA_VARIABLE) == "1":
        _check_gqa_switch()  # set by a caller or the user's environment: checked all the same
        switch: contextlib.AbstractContextManager[None] = contextlib.nullcontext()
    else:
        switch = forced_gqa()  # sets the variable, then checks
    with switch, BatchInvariantMode() as mode:
        yield mode
