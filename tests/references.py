"""Plain single-sample references of the methods' official code, written the way that code reads (full
attention matrices, one image, batch size 1, Python-level steps) to check the vectorised implementations:
SparseVLM, PyramidDrop, DART, DivPrune and VisionZip (GlobalCom²'s lives in ``methods/globalcom2_spec.py``)."""

from __future__ import annotations

import torch
from transformers import DynamicCache
from transformers.image_processing_utils import select_best_resolution
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb, repeat_kv

from globalcom2.hooks.cache_keyword import CACHE_KEYWORD


def dpc_knn_reference(x: torch.Tensor, clusters: int) -> torch.Tensor:
    """DPC-kNN of one group ``x [M, C]`` into ``clusters`` mean-merged tokens (SparseVLMs ``cluster_and_merge``,
    with ties in density broken by position instead of random noise)."""
    x = x.float()
    size, channels = x.shape
    dist = torch.cdist(x[None], x[None], compute_mode="donot_use_mm_for_euclid_dist")[0] / channels**0.5
    density = torch.exp(-(dist.sort(dim=1).values[:, :clusters] ** 2).mean(dim=1))
    parent = torch.empty(size)
    for i in range(size):
        denser = [j for j in range(size) if density[j] > density[i] or (density[j] == density[i] and j < i)]
        parent[i] = dist[i, denser].min() if denser else dist.max()
    centres = torch.topk(parent * density, clusters).indices
    assign = dist[:, centres].argmin(dim=1)
    assign[centres] = torch.arange(clusters)
    return torch.stack([x[assign == c].mean(dim=0) for c in range(clusters)])


def layer_attention(layer, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """The full ``[L, L]`` head-averaged causal softmax attention of one decoder layer, batch size 1."""
    attn = layer.self_attn
    normed = layer.input_layernorm(hidden)
    length = hidden.shape[1]
    q = attn.q_proj(normed).view(1, length, -1, attn.head_dim).transpose(1, 2)
    k = attn.k_proj(normed).view(1, length, -1, attn.head_dim).transpose(1, 2)
    q, k = apply_rotary_pos_emb(q, k, cos, sin)
    k = repeat_kv(k, attn.num_key_value_groups)
    logits = q @ k.transpose(2, 3) * attn.scaling
    logits = logits.masked_fill(~torch.ones(length, length, dtype=torch.bool).tril(), float("-inf"))
    return torch.softmax(logits, dim=-1, dtype=torch.float32).mean(dim=1)[0]


@torch.no_grad()
def sparsevlm_reference_logits(
    model, inputs, prune_layers, kept_per_stage, recycle: bool = True
) -> torch.Tensor:
    """Next-token logits of SparseVLM v1.5's prefill for one prompt with one image, step by step."""
    language_model = model.model.language_model
    ids = inputs["input_ids"][0]
    visual = (ids == model.config.image_token_id).nonzero().squeeze(1)
    start, num_visual = int(visual[0]), visual.numel()
    features = model.model.get_image_features(inputs["pixel_values"], inputs["image_sizes"]).pooler_output[0]
    hidden = language_model.embed_tokens(ids)
    hidden[start : start + num_visual] = features

    # Raters: text after the image whose mean softmax(V T^T) score is above average.
    after = hidden[start + num_visual :]
    relevance = torch.softmax(hidden[start : start + num_visual] @ after.T, dim=-1).mean(dim=0)
    raters = (relevance > relevance.mean()).nonzero().squeeze(1)

    x = hidden[None]
    for index, layer in enumerate(language_model.layers):
        positions = torch.arange(x.shape[1])[None]  # renumbered contiguously after every stage
        cos, sin = language_model.rotary_emb(x, positions)
        if index in prune_layers:
            attention = layer_attention(layer, x, cos, sin)
            text_start = start + num_visual
            scores = attention[text_start + raters][:, start:text_start].mean(dim=0)  # [num_visual]
        x = layer(x, attention_mask=None, position_embeddings=(cos, sin), position_ids=positions)
        if index in prune_layers:
            order = torch.sort(scores, descending=True, stable=True).indices
            kept = order[: kept_per_stage[prune_layers.index(index)]].sort().values
            dropped = order[kept.numel() :]  # best first
            parts = [x[0, start + kept]]
            if dropped.numel() and recycle:
                recycled = dropped[: int(dropped.numel() * 0.3) + 1].sort().values
                parts.append(dpc_knn_reference(x[0, start + recycled], recycled.numel() // 10 + 1))
            visual_part = torch.cat(parts)
            x = torch.cat([x[0, :start], visual_part, x[0, start + num_visual :]])[None]
            num_visual = visual_part.shape[0]
    return model.lm_head(language_model.norm(x))[0, -1]


# --- PyramidDrop ------------------------------------------------------------------------------------------------
# Written from Cooperx521/PyramidDrop @ 6444f30, llava/model/modeling_llama_pdrop.py (pdrop_forward lines 1106-1288,
# pdrop_rank_drop lines 1291-1468): batch 1, one image, the sequence re-packed by hand after every drop.


def _image_span(model, ids: torch.Tensor) -> tuple[int, int]:
    """``(start, length)`` of the one contiguous image span of an unpadded prompt."""
    visual = (ids == model.config.image_token_id).nonzero().squeeze(1)
    start, count = int(visual[0]), visual.numel()
    assert int(visual[-1]) == start + count - 1, "one contiguous image span expected"
    return start, count


def _prompt_embeddings(model, inputs) -> torch.Tensor:
    """``[1, L, D]`` the layer-0 input: token embeddings with the image's packed features scattered in."""
    language_model = model.model.language_model
    ids = inputs["input_ids"][0]
    start, count = _image_span(model, ids)
    features = model.model.get_image_features(inputs["pixel_values"], inputs["image_sizes"]).pooler_output[0]
    hidden = language_model.embed_tokens(ids).clone()
    hidden[start : start + count] = features
    return hidden[None]


@torch.no_grad()
def pdrop_reference(model, inputs, layer_list, kept_counts, steps: int = 1):
    """PyramidDrop's greedy generation for one unpadded prompt with one image, the official way.

    After layer ``l - 1`` (``l`` in ``layer_list``), layer ``l``'s own weights rate the image tokens by the last
    prompt token's attention; the top ``kept_counts[s]`` stay in order, positions are renumbered, and every layer
    caches what it saw. Decode steps use, at each layer, that layer's cached length as position.

    Returns:
        ``(tokens [steps], logits [steps, V], kept [S] x [k_s] original image indices)``.
    """
    language_model = model.model.language_model
    layers = language_model.layers
    ids = inputs["input_ids"][0]
    start, num_visual = _image_span(model, ids)
    cache = DynamicCache(config=language_model.config)
    x = _prompt_embeddings(model, inputs)
    origin = torch.arange(num_visual)  # original image index of each image token still present
    kept_history = []
    for index, layer in enumerate(layers):
        positions = torch.arange(x.shape[1])[None]
        cos, sin = language_model.rotary_emb(x, positions)
        x = layer(x, attention_mask=None, position_embeddings=(cos, sin), position_ids=positions,
                  use_cache=True, **{CACHE_KEYWORD: cache})  # fmt: skip
        if index + 1 in layer_list:
            present = origin.numel()
            cos, sin = language_model.rotary_emb(x, torch.arange(x.shape[1])[None])
            # the next layer's own norm and projections rate the rows; the last prompt token's row of it
            scores = layer_attention(layers[index + 1], x, cos, sin)[-1, start : start + present]
            kept = torch.topk(scores, kept_counts[layer_list.index(index + 1)]).indices.sort().values
            x = torch.cat([x[0, :start], x[0, start + kept], x[0, start + present :]])[None]
            origin = origin[kept]
            kept_history.append(origin.clone())
    logits = [model.lm_head(language_model.norm(x))[0, -1]]
    image_id = model.config.image_token_id  # suppressed, as tests/helpers.generate_steps does
    tokens = [
        int(logits[-1].masked_fill(torch.arange(logits[-1].numel()) == image_id, float("-inf")).argmax())
    ]
    for _ in range(steps - 1):
        x = language_model.embed_tokens(torch.tensor([[tokens[-1]]]))
        for index, layer in enumerate(layers):
            position = torch.tensor([[cache.get_seq_length(index)]])
            cos, sin = language_model.rotary_emb(x, position)
            x = layer(x, attention_mask=None, position_embeddings=(cos, sin), position_ids=position,
                      use_cache=True, **{CACHE_KEYWORD: cache})  # fmt: skip
        logits.append(model.lm_head(language_model.norm(x))[0, -1])
        tokens.append(
            int(logits[-1].masked_fill(torch.arange(logits[-1].numel()) == image_id, float("-inf")).argmax())
        )
    return torch.tensor(tokens), torch.stack(logits), kept_history


# --- DART -------------------------------------------------------------------------------------------------------
# Written from the DART code vendored in Chenfei-Liao/VTC-Bench @ 983e443, external/DART/llava/model/language_model/
# modeling_llama_self.py (DART.forward lines 331-359, get_retained_image_token lines 397-449): batch 1, one image.


def dart_keep_indices(keys, hidden, start: int, num_image: int, per_pivot: int, pivot_image=4, pivot_text=4):
    """Kept positions within the image span ``[start, start + num_image)``, ascending.

    Args:
        keys: ``[L, KV * hd]`` layer ``K-1`` keys of the whole prompt (after the rotary embedding).
        hidden: ``[L, D]`` the final norm of layer ``K-1``'s output.
    """
    end = start + num_image
    image_pivots = (keys[start:end].abs().sum(-1).topk(pivot_image).indices + start).tolist()
    text_pivots = (keys[end:].abs().sum(-1).topk(pivot_text).indices + end).tolist()
    chosen = set(image_pivots + text_pivots)
    pool = set(range(start, end)) - set(image_pivots)
    for pivot in list(chosen):  # the Python set's order, as the official loop
        candidates = sorted(pool)
        similarity = torch.nn.functional.cosine_similarity(hidden[pivot][None], hidden[candidates], dim=-1)
        taken = [candidates[i] for i in (-similarity).topk(per_pivot).indices.tolist()]
        chosen.update(taken)
        pool.difference_update(taken)
    chosen.difference_update(text_pivots)
    return torch.tensor(sorted(chosen)) - start


@torch.no_grad()
def dart_reference_logits(model, inputs, pruned_layer: int, per_pivot: int, pivot_image=4, pivot_text=4):
    """``(next-token logits [V], kept image indices)`` of DART's prefill for one unpadded prompt with one image:
    original position ids after the cut, layers from ``pruned_layer`` on see the kept rows only."""
    language_model = model.model.language_model
    ids = inputs["input_ids"][0]
    start, num_image = _image_span(model, ids)
    x = _prompt_embeddings(model, inputs)
    positions = torch.arange(x.shape[1])[None]
    kept = keys = None
    for index, layer in enumerate(language_model.layers):
        if index == pruned_layer:
            normed = language_model.norm(x)[0]
            kept = dart_keep_indices(keys, normed, start, num_image, per_pivot, pivot_image, pivot_text)
            keep = torch.cat([torch.arange(start), start + kept, torch.arange(start + num_image, x.shape[1])])
            x, positions = x[:, keep], keep[None]  # original position ids
        cos, sin = language_model.rotary_emb(x, positions)
        if index == pruned_layer - 1:
            attn = layer.self_attn
            k = attn.k_proj(layer.input_layernorm(x)).view(1, x.shape[1], -1, attn.head_dim).transpose(1, 2)
            k = apply_rotary_pos_emb(k, k, cos, sin)[1]
            keys = (
                repeat_kv(k, attn.num_key_value_groups).transpose(1, 2).reshape(x.shape[1], -1)
            )  # [L, H * hd]
        x = layer(x, attention_mask=None, position_embeddings=(cos, sin), position_ids=positions)
    return model.lm_head(language_model.norm(x))[0, -1], kept


# --- DivPrune -----------------------------------------------------------------------------------------------
# Plain reference for DivPrune (Alvar et al., CVPR 2025), written step by step the way the official code
# reads: github.com/vbdi/divprune at ``799e2d950aa01ba7860907f5a6d86061f885dca6``,
# ``LLaVA/llava/model/llava_arch.py`` L146-171 (the selection) and L352-385 (where it is applied).
#
# One image, a Python loop over the selection steps, the minimum over *all* picked rows recomputed at every
# step (no running minimum), no vectorisation: the parity reference for ``globalcom2/methods/divprune.py``.


def divprune_keep_count(ratio: float, num_tokens: int) -> int:
    """The official kept count ``int(round(ratio * num_tokens))`` (L153), over the whole image span."""
    return round(ratio * num_tokens)  # Python round: half to even


def divprune_reference(features: torch.Tensor, keep: int, sort: bool = True) -> torch.Tensor:
    """Rows of ``features [N, D]`` that DivPrune keeps: ``[keep]`` int64, ascending when ``sort``.

    Distances are ``1 - cos`` of the rows divided by their norms, in the dtype of ``features`` (pass float32
    for the harness's numerics, the model dtype for the official ones). The first pick is the column with
    the largest second-smallest distance; each later pick is the column with the largest minimum distance
    to the rows picked so far; ``argmax`` takes the first maximum; picked rows are not masked.
    """
    unit = features / features.norm(dim=1, keepdim=True)  # [N, D]
    dist = 1.0 - torch.mm(unit, unit.t())  # [N, N]
    picked: list[int] = []
    for step in range(keep):
        if step == 0:
            score = torch.topk(dist, 2, dim=0, largest=False).values[1]  # [N] nearest other token
        else:
            score = dist[torch.tensor(picked)].min(dim=0).values  # [N] distance to the picked set
        picked.append(int(torch.argmax(score)))
    order = torch.tensor(picked, dtype=torch.long)
    return order.sort().values if sort else order


# --- VisionZip ----------------------------------------------------------------------------------------------
# Plain reference for VisionZip on LLaVA-NeXT (Yang et al., CVPR 2025, arXiv 2412.04467), written step by
# step the way dvlab-research/VisionZip @ 3151f6df4fca36a4cd1c985e5956e725b1f9ad02 behaves:
# ``visionzip/clip_encoder.py`` lines 42-85 (one view), ``visionzip/utils.py`` lines 10-89 (the metric: keys
# averaged over heads), ``visionzip/main.py`` line 7 (``dominant`` counts [CLS]) and ``visionzip/llava_arch.py``
# lines 42-80 and 83-135 (the LLaVA-NeXT packing). One view, one image at a time, Python-level steps.
#
# Its inputs are computed independently of the harness: an *eager* CLIP forward with ``output_attentions`` and
# ``output_hidden_states`` (the layer's full softmax attention, as the official patched attention returns it),
# the keys from that layer's own ``layer_norm1`` and ``k_proj``, the crop grid from transformers'
# ``select_best_resolution``, and the projector applied to each view's output tokens.


def visionzip_view_reference(
    hidden: torch.Tensor,  # [577, C]: the layer's output, CLS at row 0
    attention: torch.Tensor,  # [H, 577, 577]: that layer's softmax attention probabilities
    keys: torch.Tensor,  # [H, 577, d]: that layer's per-head keys
    dominant: int,  # CLS included
    contextual: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(dominant_indices [dominant] ascending with 0 first, tokens [dominant + contextual, C])``."""
    length = hidden.shape[0]
    metric = keys.mean(dim=0)  # [577, d] head-averaged keys

    # Dominant: [CLS] row, patch columns, summed over heads; top (dominant - 1) patches, then position order.
    cls_scores = attention[:, 0, 1:].sum(dim=0)  # [576]
    top_patches = torch.topk(cls_scores, dominant - 1).indices + 1
    chosen = {0, *top_patches.tolist()}
    dominant_indices = torch.tensor(sorted(chosen), dtype=torch.long)
    if contextual == 0:
        return dominant_indices, hidden[dominant_indices]

    # The rest, in position order, with L2-normalised metrics.
    rest = [p for p in range(length) if p not in chosen]
    rest_metric = metric[rest]
    rest_metric = rest_metric / rest_metric.norm(dim=-1, keepdim=True)

    # Targets: a uniform stride over the rest; every other token goes to its most similar target.
    n = len(rest)
    step = max(1, n // contextual)
    targets = list(range(0, n, step))[:contextual]
    target_set = set(targets)
    others = [i for i in range(n) if i not in target_set]
    similarity = rest_metric[others] @ rest_metric[targets].T  # [len(others), len(targets)]
    assignment = similarity.argmax(dim=1).tolist()

    # Contextual token = target + mean of its members (the target is not in the mean).
    contextual_tokens = []
    for slot, target in enumerate(targets):
        members = [rest[others[j]] for j, a in enumerate(assignment) if a == slot]
        token = hidden[rest[target]].clone()
        if members:
            token = token + hidden[members].sum(dim=0) / len(members)
        contextual_tokens.append(token)
    return dominant_indices, torch.cat([hidden[dominant_indices], torch.stack(contextual_tokens)])


def visionzip_next_pack_reference(
    view_tokens: torch.Tensor,  # [1 + crops, dominant + contextual, E] projected per-view outputs
    view_dominant_indices: torch.Tensor,  # [1 + crops, dominant]
    grid_width: int,
    grid_height: int,
    side: int = 24,
) -> torch.Tensor:
    """The packed sequence of one image: thumbnail as is; the crops' dominant patches in raster order over
    the padded crop grid; each crop's CLS; each crop's contextual tokens. No unpadding, no newline."""
    dominant = view_dominant_indices.shape[1]
    thumbnail = view_tokens[0]
    crops, crop_keep = view_tokens[1:], view_dominant_indices[1:]
    assert crops.shape[0] == grid_width * grid_height

    placed = []
    for k in range(crops.shape[0]):
        crop_row, crop_col = divmod(k, grid_width)
        for slot in range(1, dominant):  # slot 0 is the crop's CLS
            patch = int(crop_keep[k, slot]) - 1
            row = crop_row * side + patch // side
            col = crop_col * side + patch % side
            placed.append((row * grid_width * side + col, crops[k, slot]))
    placed.sort(key=lambda item: item[0])
    grid_part = [token for _, token in placed]
    cls_part = [crops[k, 0] for k in range(crops.shape[0])]
    context_part = [crops[k, j] for k in range(crops.shape[0]) for j in range(dominant, crops.shape[1])]
    return torch.cat([thumbnail, torch.stack(grid_part + cls_part + context_part)])


@torch.no_grad()
def reference_clip_states(eager_model, inputs: dict) -> list[dict]:
    """Per image of ``inputs`` (processor outputs): the views' layer -2 states from an eager CLIP forward.

    ``eager_model``: a LLaVA-NeXT whose vision tower runs eager attention (so it returns attentions).
    Returns dicts with ``hidden [V, 577, C]``, ``attention [V, H, 577, 577]``, ``keys [V, H, 577, d]`` and
    ``grid (rows, cols)``.
    """
    config = eager_model.config
    crop = config.vision_config.image_size
    tower = eager_model.model.vision_tower
    layer = tower.encoder.layers[-2]
    heads = layer.self_attn.num_heads
    out = []
    for pixels, size in zip(inputs["pixel_values"], inputs["image_sizes"], strict=True):
        height, width = select_best_resolution(tuple(size.tolist()), config.image_grid_pinpoints)
        grid = (height // crop, width // crop)
        views = pixels[: 1 + grid[0] * grid[1]]  # thumbnail, then crops row-major
        clip = tower(views, output_attentions=True, output_hidden_states=True)
        keys = layer.self_attn.k_proj(layer.layer_norm1(clip.hidden_states[-3]))  # [V, 577, C]
        keys = keys.view(keys.shape[0], keys.shape[1], heads, -1).transpose(1, 2)  # [V, H, 577, d]
        out.append(
            {"hidden": clip.hidden_states[-2], "attention": clip.attentions[-2], "keys": keys, "grid": grid}
        )
    return out


@torch.no_grad()
def visionzip_reference_image(eager_model, states: dict, dominant: int, contextual: int) -> torch.Tensor:
    """The packed features VisionZip feeds the LLM for one image, from :func:`reference_clip_states`."""
    side = eager_model.config.vision_config.image_size // eager_model.config.vision_config.patch_size
    indices, tokens = [], []
    for v in range(states["hidden"].shape[0]):
        idx, tok = visionzip_view_reference(
            states["hidden"][v], states["attention"][v], states["keys"][v], dominant, contextual
        )
        indices.append(idx)
        tokens.append(eager_model.model.multi_modal_projector(tok))
    rows, cols = states["grid"]
    return visionzip_next_pack_reference(torch.stack(tokens), torch.stack(indices), cols, rows, side)


def visionzip_reference_features(
    eager_model, inputs: dict, dominant: int, contextual: int
) -> list[torch.Tensor]:
    """Per image of ``inputs`` (processor outputs), the packed features VisionZip feeds the LLM."""
    return [
        visionzip_reference_image(eager_model, states, dominant, contextual)
        for states in reference_clip_states(eager_model, inputs)
    ]
