"""The batch-invariant mode on CUDA (``globalcom2/models/batch_invariant.py``), where cuBLAS and the attention
kernels choose their work split from the shapes they are given: a left-padded batch in bf16 gives every row its
single run's logits bit for bit, and a fixed-shape GEMM gives a row the same numbers wherever it sits in the
call (what a decode step's shared block of rows relies on)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import batch_and_single_runs

from globalcom2.models.batch_invariant import DECODE_ROWS, PREFILL_ROWS
from globalcom2.models.loader import load_tiny_llava_next

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("method", [None, "globalcom2", "fastv", "sparsevlm"])
def test_every_batch_row_equals_its_single_run_bit_for_bit_in_bf16_on_cuda(method):
    if not torch.cuda.is_available():
        pytest.fail("needs CUDA")
    model, processor = load_tiny_llava_next(seed=0, dtype="bfloat16", device="cuda")
    tokens, logits, alone = batch_and_single_runs(model, processor, method, invariant=True, device="cuda")
    for row, (row_tokens, row_logits) in enumerate(alone):
        assert torch.equal(tokens[row : row + 1], row_tokens)
        assert torch.equal(logits[:, row : row + 1], row_logits), f"row {row} of {method or 'vanilla'}"


@pytest.mark.parametrize(
    ("rows", "width", "out"),
    [
        (PREFILL_ROWS, 4096, 11008),
        (PREFILL_ROWS, 11008, 4096),
        (PREFILL_ROWS, 1024, 4096),
        (DECODE_ROWS, 4096, 4096),
        (DECODE_ROWS, 4096, 11008),
        (DECODE_ROWS, 11008, 4096),
        (DECODE_ROWS, 4096, 32064),
    ],
)
def test_a_fixed_shape_gemm_gives_a_row_the_same_numbers_at_any_offset_on_cuda(rows, width, out):
    """The assumption the blocks rest on, at LLaVA-NeXT 7B's and CLIP-L's shapes in bf16: a row's result does not
    depend on where in a fixed-shape call it sits, nor on the other rows. The sequences' end-aligned blocks
    do not need it; the decode steps' shared blocks do."""
    if not torch.cuda.is_available():
        pytest.fail("needs CUDA")
    generator = torch.Generator(device="cuda").manual_seed(0)
    weight = torch.randn(out, width, device="cuda", dtype=torch.bfloat16, generator=generator) / width**0.5
    probe = torch.randn(1, width, device="cuda", dtype=torch.bfloat16, generator=generator)
    results = []
    for offset in sorted({0, 1, 17, rows // 2 + 5, rows - 1}):
        block = torch.randn(rows, width, device="cuda", dtype=torch.bfloat16, generator=generator)
        block[offset] = probe[0]
        results.append(F.linear(block, weight)[offset])
    assert all(torch.equal(result, results[0]) for result in results[1:])
