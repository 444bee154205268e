"""Sequence surgery for pre-LLM compression: pure tensor functions, no model access.

The processor expands every ``<image>`` into exactly N placeholders before the model runs, and
``generate`` derives positions and masks from that original length at every step
(transformers 5.23: ``LlavaNextProcessor`` expands the placeholders, and ``GenerationMixin`` grows the
attention mask and the cache positions from the prompt's length at every step). When a method keeps M != N
tokens of an image, the prompt must be rebuilt (``rebuild_prompt``) and every later decode step
translated from original to compressed coordinates (``decode_inputs``). Both are written once here,
vectorised over the batch, and used for every pre-LLM method.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from globalcom2.scoring.ranking import int64_tensor


@dataclass(frozen=True)
class DecodeState:
    """What a decode step needs to know about a compressed prefill (one per generation/KV cache).

    Attributes:
        original_length: prompt length ``L`` as the caller sees it (padding included).
        compressed_length: prompt length ``L'`` actually fed to the LLM.
        position_shift: ``[B]`` original position minus compressed position of each row's last prompt token.
        real_lengths: ``[B]`` non-padding tokens per row after compression.
        attention_mask: ``[B, L']`` mask of the compressed prompt, or ``None`` when there is no padding
            and the caller gave none (keeps SDPA on its ``is_causal`` fast path, and bit-identity).
        image_rows: the batch row of each image (scatter order), read from the original prompt's
            placeholders: after the surgery an image may have no position left to say where it was.
    """

    original_length: int
    compressed_length: int
    position_shift: torch.Tensor
    real_lengths: torch.Tensor
    attention_mask: torch.Tensor | None
    image_rows: tuple[int, ...] = ()


@dataclass(frozen=True)
class RebuiltPrompt:
    input_ids: torch.Tensor  # [B, L']
    attention_mask: torch.Tensor | None  # [B, L']
    position_ids: torch.Tensor  # [B, L'] or [1, L']
    state: DecodeState


def placeholder_owners(is_image: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Image index and offset within that image of every placeholder.

    Placeholders are matched to images in row-major order over the batch, the order in which
    ``LlavaNextModel.forward`` scatters image features (``masked_scatter``).

    Args:
        is_image: ``[B, L]`` bool, True at image placeholders.
        lengths: ``[I]`` placeholders per image, in scatter order (must sum to ``is_image.sum()``).

    Returns:
        ``(image [B, L], offset [B, L])``, both int64; ``-1`` at non-placeholder positions.
    """
    batch, length = is_image.shape
    lengths = lengths.to(is_image.device)
    ends = lengths.cumsum(0)  # [I]
    rank = is_image.flatten().cumsum(0).view(batch, length) - 1  # [B, L] placeholder rank over the batch
    image = torch.searchsorted(ends, rank.clamp(min=0), right=True).clamp(max=ends.numel() - 1)  # [B, L]
    offset = rank - (ends - lengths)[image]  # [B, L]
    return image.masked_fill(~is_image, -1), offset.masked_fill(~is_image, -1)


def rebuild_prompt(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    position_ids: torch.Tensor | None,
    *,
    image_token_id: int,
    original_lengths: Sequence[int],
    new_lengths: Sequence[int],
    pad_token_id: int,
) -> RebuiltPrompt:
    """Replace each image's ``N_i`` placeholders by ``M_i`` and left-pad the batch again.

    Images are matched to placeholders in row-major order over the batch (the order in which
    ``LlavaNextModel.forward`` scatters features), so several images per prompt and per batch work.
    Positions are renumbered contiguously from the new mask with the formula ``generate`` uses
    (``cumsum - 1``, padding at 0), as LLaVA does after its own image splicing.

    Args:
        input_ids: ``[B, L]`` prompt with the processor's placeholders; left padding only.
        attention_mask: ``[B, L]`` 1 for real tokens, or ``None`` (no padding).
        position_ids: ``[B, L]`` or ``[1, L]`` positions the caller would use, or ``None`` (``arange``).
        image_token_id: the placeholder id.
        original_lengths: placeholders per image, in scatter order (host ints).
        new_lengths: tokens kept per image (host ints).
        pad_token_id: id written into new padding slots (they are masked out).
    """
    batch, length = input_ids.shape
    device = input_ids.device
    original, kept = [int(n) for n in original_lengths], [int(n) for n in new_lengths]
    if attention_mask is not None and attention_mask.dim() != 2:
        raise NotImplementedError("pre-LLM compression needs a 2-D attention_mask (got a 4-D mask)")

    is_image = input_ids == image_token_id  # [B, L]
    real = attention_mask.bool() if attention_mask is not None else torch.ones_like(is_image)  # [B, L]
    # The one device read of the surgery: per row, its real tokens, its placeholders and whether it is
    # right-padded. Every size below follows from these on the host.
    right_padded = (real[:, :-1] & ~real[:, 1:]).any(1)  # [B]
    real_per_row, placeholders_per_row, bad_padding = torch.stack(
        [real.sum(1), is_image.sum(1), right_padded.long()]
    ).tolist()
    if any(bad_padding):
        raise NotImplementedError(
            "pre-LLM compression needs left padding (or none); set processor.tokenizer.padding_side = 'left'"
        )
    if sum(placeholders_per_row) != sum(original):
        raise ValueError(
            f"the prompt has {sum(placeholders_per_row)} image placeholders but the images have "
            f"{sum(original)} packed tokens; were images and text processed together?"
        )
    row_lengths, image_rows = _compressed_row_lengths(real_per_row, placeholders_per_row, original, kept)
    new_length = max(row_lengths)
    total = sum(row_lengths)

    original_device = int64_tensor(original, device)  # [I]
    kept_device = int64_tensor(kept, device)  # [I]
    # Which image each placeholder belongs to, and whether it is that image's first placeholder.
    image, offset = placeholder_owners(is_image, original_device)  # [B, L], [B, L]
    first = is_image & (offset == 0)  # [B, L]

    # Every real token is copied once; an image's first placeholder becomes M_i copies, the rest none.
    counts = torch.where(is_image, first.long() * kept_device[image.clamp(min=0)], real.long())  # [B, L]
    real_lengths = counts.sum(1)  # [B]
    tokens = torch.repeat_interleave(input_ids.flatten(), counts.flatten(), output_size=total)  # [T]
    rows = torch.repeat_interleave(torch.arange(batch, device=device), real_lengths, output_size=total)  # [T]
    row_starts = real_lengths.cumsum(0) - real_lengths  # [B]
    within = torch.arange(total, device=device) - row_starts[rows]  # [T]
    cols = (new_length - real_lengths)[rows] + within  # [T] left-padded column

    new_ids = input_ids.new_full((batch, new_length), pad_token_id)
    new_ids[rows, cols] = tokens
    padded = any(n != new_length for n in row_lengths)
    if attention_mask is not None or padded:
        dtype = attention_mask.dtype if attention_mask is not None else torch.long
        # Left padding: a row's real tokens fill its last columns. (Not `new_mask[rows, cols] = 1`: a number put
        # at tensor indices is a blocking host-to-device copy on CUDA.)
        starts = (new_length - real_lengths)[:, None]  # [B, 1]
        new_mask = (torch.arange(new_length, device=device) >= starts).to(dtype)  # [B, L']
        new_positions = new_mask.long().cumsum(-1) - 1  # [B, L']
        new_positions = new_positions.masked_fill(new_mask == 0, 0)
    else:
        new_mask = None
        new_positions = torch.arange(new_length, device=device).unsqueeze(0)  # [1, L']

    last_original = (
        position_ids[:, -1] if position_ids is not None else torch.full((1,), length - 1, device=device)
    )
    state = DecodeState(
        original_length=length,
        compressed_length=new_length,
        position_shift=(last_original - new_positions[:, -1]).expand(batch).clone(),  # [B]
        real_lengths=real_lengths,
        attention_mask=new_mask,
        image_rows=image_rows,
    )
    return RebuiltPrompt(new_ids, new_mask, new_positions, state)


def _compressed_row_lengths(
    real_per_row: list[int], placeholders_per_row: list[int], original: list[int], kept: list[int]
) -> tuple[list[int], tuple[int, ...]]:
    """Real tokens of each row after every image ``i`` of it went from ``original[i]`` to ``kept[i]``
    placeholders (images fill the rows in scatter order), and the row of each image."""
    lengths, rows, image = [], [], 0
    for row, (real, placeholders) in enumerate(zip(real_per_row, placeholders_per_row, strict=True)):
        change = 0
        while placeholders > 0:
            if image >= len(original) or original[image] > placeholders:
                raise ValueError(
                    "an image's placeholders span two prompts of the batch; were images and text processed together?"
                )
            placeholders -= original[image]
            change += kept[image] - original[image]
            rows.append(row)
            image += 1
        lengths.append(real + change)
    return lengths, tuple(rows)


def decode_inputs(
    state: DecodeState,
    attention_mask: torch.Tensor | None,
    position_ids: torch.Tensor | None,
    *,
    past_length: int,
    query_length: int,
) -> tuple[torch.Tensor | None, torch.Tensor]:
    """Translate a step after a compressed prefill from original to compressed coordinates.

    ``generate`` keeps counting positions from the original prompt length and grows its mask from the
    original width; the KV cache holds the compressed prompt. Positions are shifted back per row, and
    the mask becomes ``[compressed prefill mask, mask of everything after the prompt]``.

    Args:
        state: from :func:`rebuild_prompt`.
        attention_mask: ``[B, L + t]`` caller's mask in original coordinates, or ``None``.
        position_ids: ``[B or 1, q]`` caller's positions in original coordinates, or ``None``.
        past_length: tokens already in the KV cache (compressed coordinates).
        query_length: tokens in this step.

    Returns:
        ``(attention_mask [B, past + q] or None, position_ids [B, q])``.
    """
    device = state.real_lengths.device
    batch = state.real_lengths.numel()
    if position_ids is not None:
        position_ids = position_ids - state.position_shift.to(position_ids.device)[:, None]  # [B, q]
    else:
        generated = past_length - state.compressed_length
        position_ids = (state.real_lengths + generated)[:, None] + torch.arange(query_length, device=device)
    if attention_mask is not None:
        if attention_mask.dim() != 2:
            raise NotImplementedError("decoding after pre-LLM compression needs a 2-D attention_mask")
        if attention_mask.shape[0] != batch:
            raise RuntimeError(
                f"batch size changed from {batch} to {attention_mask.shape[0]} since the compressed prefill"
            )
        after_prompt = attention_mask.shape[1] - state.original_length  # tokens after the prompt, original
        if after_prompt != past_length - state.compressed_length + query_length:  # ... and compressed
            raise ValueError(
                f"this step does not continue the compressed prefill: its mask holds {after_prompt} tokens after "
                f"the {state.original_length}-token prompt, the cache {past_length - state.compressed_length} "
                f"plus {query_length} new. generate was given a cache from a compressed prompt with input_ids "
                "that restart from the original one (a second turn, or a restart from a cache); pre-LLM "
                "compression supports neither: run the new turn without the cache"
            )
        prefill_mask = state.attention_mask
        if prefill_mask is None:
            prefill_mask = attention_mask.new_ones((batch, state.compressed_length))
        attention_mask = torch.cat(
            [prefill_mask.to(attention_mask), attention_mask[:, state.original_length :]], -1
        )
    elif state.attention_mask is not None:
        tail = past_length - state.compressed_length + query_length
        ones = state.attention_mask.new_ones((batch, tail))
        attention_mask = torch.cat([state.attention_mask, ones], dim=-1)
    return attention_mask, position_ids
