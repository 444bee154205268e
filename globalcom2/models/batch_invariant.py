"""Batch-invariant execution: a row's numbers do not depend on the batch it runs in, in any dtype.

Why a batch changes answers in bf16: a kernel's reduction order depends on the shape it is given. cuBLAS picks
its GEMM (tile, split-K) from the row count ``M``, attention kernels pick their splits from the batch, and a
left-padded row sits at other offsets of its attention's key blocks than the same prompt alone. In fp32 the
rounding this changes rarely flips a token; in bf16 about half of a random 7B's 8-token answers changed
between batch 1 and batch 4 on an H200 (lmms-eval issue 236 reports the same for real checkpoints). The
remedy follows "Defeating Nondeterminism in LLM Inference" (He and Thinking Machines Lab, 2025; its kernels:
thinking-machines-lab/batch_invariant_ops): make every operation compute each row with a reduction order
that does not depend on the other rows. Instead of new kernels, this module gives the existing ones shapes
that do not depend on the batch, so it runs on any device:

* **Matrix products** (``F.linear``): the input's rows go through in fixed blocks of :data:`DECODE_ROWS`
  (one-token steps) or :data:`PREFILL_ROWS` rows (anything longer), the last block padded with zeros. Every
  GEMM call then has the same shape, whatever the batch, and a GEMM computes each output row from that row
  alone. The row count of a decode step is small enough that its padding is free (the weights' read
  dominates); a prefill pays for at most one partial block per call.
* **Row reductions** (``F.layer_norm``, the RMS norm's ``mean(-1)``, ``softmax(-1)``): the same fixed blocks.
* **Batched products** (``bmm``, batched ``matmul``) and **convolutions**: one call per batch element.
* **Attention** (``F.scaled_dot_product_attention``): one call per batch row on that row's own keys and
  queries, the left padding sliced off, with the flags the row would get alone (``is_causal`` for a prompt,
  neither mask nor causality for a decode step). A mask must be the model's own left-padded causal or
  decode mask; anything else raises instead of being guessed at.
* transformers chooses between three formulations of grouped-query attention depending on whether a mask is
  present (``integrations/sdpa_attention.py``: ``enable_gqa``, ``pack_gqa``, ``repeat_kv``), so a padded
  batch and a prompt alone would run different calls. The mode sets ``TRANSFORMERS_SDPA_FORCE_GQA=1``
  (read at every call, transformers 5.23-5.25), which always takes ``enable_gqa``. LLaVA-NeXT 7B/13B have no
  grouped-query attention; the tiny test models have.

Elementwise operations, gathers and scatters are batch-invariant already. What this buys, and what it does
not:

* **Guaranteed here**: batch N gives every row bit for bit what batch 1 gives it, both under this mode, in
  any dtype. Tested on CPU in bf16 for vanilla and every method (``tests/models/test_batch_invariant.py``),
  where the unmodified model differs by up to 0.7 in a logit.
* **Not the same numbers as without it**: a GEMM over a zero-padded block can round differently from one
  over the bare rows, so a cell run with the mode is another cell (``model.batch_invariant`` in its
  identity). Compare batch-invariant cells with each other.
* **Costs** a padded block per matrix product and one attention call per row: ``make bench-batch-effect
  ARGS=--batch-invariant`` measures it next to the plain mode.
* **Not with** ``compile``: dynamo would trace through the mode's Python. A method's own tensor code runs
  under the mode too; its reductions over padded widths are its own business, and the tests check every
  registered method end to end.
* **One host read per attention mask** (not per layer): the rows' padding is read once for each mask
  tensor and remembered while that tensor lives.
"""

from __future__ import annotations

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
#: Rows per matrix-product call for longer inputs (prompts, vision crops): large enough that the GEMM runs
#: near its peak, small enough that the padding of the last block stays a small share of a prompt.
PREFILL_ROWS = 512
#: transformers' switch that always runs grouped-query attention through SDPA's ``enable_gqa``.
FORCE_GQA_VARIABLE = "TRANSFORMERS_SDPA_FORCE_GQA"

_SOFTMAXES = {F.softmax, torch.softmax, torch.Tensor.softmax}
_MEANS = {torch.mean, torch.Tensor.mean}
_BATCHED_PRODUCTS = {torch.bmm, torch.Tensor.bmm, torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__}

RowPlan = tuple[int, int, bool]  # (first real query row, first real key row, is_causal) of one batch row


def rows_per_call(x: torch.Tensor) -> int:
    """The fixed row count of the calls for ``x [..., S, K]``: one-token inputs (``S == 1``) get
    :data:`DECODE_ROWS`, everything else :data:`PREFILL_ROWS`. A row decides this by its own sequence length,
    so it gets the same calls in a batch as alone."""
    return DECODE_ROWS if x.dim() >= 3 and x.shape[-2] == 1 else PREFILL_ROWS


def in_fixed_blocks(
    rows: torch.Tensor, fn: Callable[[torch.Tensor], torch.Tensor], block: int
) -> torch.Tensor:
    """``fn`` applied to ``rows [M, ...]`` in calls of exactly ``block`` rows (the last one zero-padded), so
    that each row's result depends on that row only; returns ``[M, ...]``."""
    count = rows.shape[0]
    if count == 0:
        return fn(rows)
    outputs = []
    for start in range(0, count, block):
        part = rows[start : start + block]  # [<= block, ...]
        real = part.shape[0]
        if real < block:
            part = torch.cat([part, part.new_zeros((block - real, *part.shape[1:]))])  # [block, ...]
        outputs.append(fn(part)[:real])
    return torch.cat(outputs)


def _last_dim_in_blocks(x: torch.Tensor, fn: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """``fn`` (which maps ``[M, K] -> [M, N]``) over the last dimension of ``x [..., K]`` in fixed blocks."""
    flat = x.reshape(-1, x.shape[-1])  # [M, K]
    out = in_fixed_blocks(flat, fn, rows_per_call(x))  # [M, N]
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

    Accepted masks (``[B, 1, Q or 1, K]``, boolean or additive with 0 where attended) are the two a left-padded
    batch gets: a prompt's causal mask (``Q == K``: row ``b`` is real from ``start_b`` on and attends causally
    from there) and a decode step's key mask (one query row: keys from ``start_b`` on). Reads the mask on the
    host once.

    Raises:
        ValueError: any other mask, saying which row breaks which rule.
    """
    if mask is None:
        return [(0, 0, is_causal)] * batch
    if mask.dim() != 4 or mask.shape[0] not in (1, batch) or mask.shape[-1] != key_length:
        raise ValueError(
            f"batch-invariant attention needs a [batch, 1, queries or 1, {key_length}] mask, got "
            f"{tuple(mask.shape)}"
        )
    attended = mask if mask.dtype == torch.bool else mask == 0  # [B, 1, Q or 1, K]
    attended = attended[:, 0].expand(batch, -1, -1)  # [B, Q or 1, K]
    keys = torch.arange(key_length, device=mask.device)  # [K]
    starts = key_length - attended[:, -1].sum(-1)  # [B] first real key of each row
    real_key = keys >= starts[:, None]  # [B, K]
    if attended.shape[1] == 1:
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
            f"batch-invariant attention supports a prompt (queries == keys) or one-query decode step; got "
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
    first_query = (lambda start: start) if causal else (lambda start: 0)
    return [(first_query(start), start, causal and query_length - start > 1) for start in host[0]]


class BatchInvariantMode(TorchFunctionMode):
    """A ``TorchFunctionMode`` that runs every operation in shapes independent of the batch (module
    docstring). Use :func:`batch_invariant`, which also sets transformers' GQA switch."""

    def __init__(self) -> None:
        super().__init__()
        self._plans: dict[int, tuple[weakref.ref, list[RowPlan]]] = {}

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if func is F.linear:
            weight = args[1] if len(args) > 1 else kwargs["weight"]
            bias = args[2] if len(args) > 2 else kwargs.get("bias")
            return _last_dim_in_blocks(args[0], lambda rows: F.linear(rows, weight, bias))
        if func is F.scaled_dot_product_attention:
            return self._attention(*args, **kwargs)
        if func is F.layer_norm and len(args[1] if len(args) > 1 else kwargs["normalized_shape"]) == 1:
            return _last_dim_in_blocks(args[0], lambda rows: func(rows, *args[1:], **kwargs))
        if (
            func in _SOFTMAXES
            and len(args) <= 2
            and set(kwargs) <= {"dim", "dtype"}
            and _last_dim(args, kwargs)
        ):
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
        if func in _BATCHED_PRODUCTS and _batched_pair(args):
            first, second = args[0], args[1]
            return torch.cat([func(first[i : i + 1], second[i : i + 1]) for i in range(first.shape[0])])
        if func is F.conv2d and args[0].dim() == 4 and args[0].shape[0] > 1:
            images = args[0]
            return torch.cat([func(images[i : i + 1], *args[1:], **kwargs) for i in range(images.shape[0])])
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
        output = query.new_zeros((*query.shape[:-1], value.shape[-1]))  # [B, H, Q, hd]
        for row, (first_query, first_key, causal) in enumerate(plan):
            output[row : row + 1, :, first_query:] = F.scaled_dot_product_attention(
                query[row : row + 1, :, first_query:],
                key[row : row + 1, :, first_key:],
                value[row : row + 1, :, first_key:],
                dropout_p=dropout_p,
                is_causal=causal,
                scale=scale,
                enable_gqa=enable_gqa,
            )
        return output

    def _plan(
        self, mask: torch.Tensor | None, batch: int, query_length: int, key_length: int, is_causal: bool
    ) -> list[RowPlan]:
        """:func:`attention_plan`, remembered per mask tensor (every layer of a forward gets the same one)."""
        if mask is None:
            return attention_plan(None, batch, query_length, key_length, is_causal)
        known = self._plans.get(id(mask))
        if known is not None and known[0]() is mask:
            return known[1]
        plan = attention_plan(mask, batch, query_length, key_length, is_causal)
        key = id(mask)
        self._plans[key] = (weakref.ref(mask, lambda _: self._plans.pop(key, None)), plan)
        return plan


def _batched_pair(args: tuple) -> bool:
    """Two tensors of at least 3 dimensions with the same leading (batch) size."""
    return (
        len(args) >= 2
        and all(isinstance(t, torch.Tensor) and t.dim() >= 3 for t in args[:2])
        and args[0].shape[0] == args[1].shape[0]
        and args[0].dim() == args[1].dim()
    )


@contextmanager
def batch_invariant() -> Iterator[BatchInvariantMode]:
    """Run the block batch-invariantly (module docstring); restores transformers' GQA switch on exit."""
    previous = os.environ.get(FORCE_GQA_VARIABLE)
    os.environ[FORCE_GQA_VARIABLE] = "1"
    try:
        with BatchInvariantMode() as mode:
            yield mode
    finally:
        if previous is None:
            os.environ.pop(FORCE_GQA_VARIABLE, None)
        else:
            os.environ[FORCE_GQA_VARIABLE] = previous
