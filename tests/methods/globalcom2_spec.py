"""A literal, loop-based re-statement of GlobalCom² as xuyang-liu16/GlobalCom2 @ 96b2d00 computes it
(``llava/model/llava_arch.py``: thumbnail top-k, crop budgets, unpadding, interpolation, holistic score,
per-crop top-k, the reference layout).

Deliberately slow and step-by-step, in the shape of the reference implementation (per-token loops,
``.item()`` sums, a slot grid, a canvas walk), so that it is an independent oracle for the vectorised
``globalcom2.methods.globalcom2``. It shares no code with it; only transformers' resolution picker and
``F.interpolate`` (the same library calls the reference makes) are used. Ties break by score descending,
then index ascending, the rule the harness documents.
"""

from __future__ import annotations

import math

import torch.nn.functional as F
from transformers.image_processing_utils import select_best_resolution

SIDE = 24


def spec_globalcom2(scores, image_size, pinpoints, ratio, temperature=10.0):
    """Run the spec on ``scores [1 + n, 576]`` for an image of ``image_size = (h, w)`` pixels.

    Returns a dict with ``thumbnail`` (kept indices, score order), ``r`` (per-crop ratios), ``k``,
    ``n_valid`` (N_j), ``reference`` (the reference layout as symbolic items ``("thumb", t)``,
    ``("crop", j, v)``, ``("sep",)``) and ``clean`` (the clean layout as the same items).
    """
    h, w = image_size
    best_h, best_w = select_best_resolution((h, w), pinpoints)
    nph, npw = best_h // 336, best_w // 336
    n = nph * npw
    H, W = nph * SIDE, npw * SIDE

    # unpadding (transformers' arithmetic)
    if w / h > W / H:
        nh = int(round(h * (W / w), 7))
        p = (H - nh) // 2
        r0, r1, c0, c1 = p, H - p, 0, W
    else:
        nw = int(round(w * (H / h), 7))
        p = (W - nw) // 2
        r0, r1, c0, c1 = 0, H, p, W - p

    thumb = [float(x) for x in scores[0].tolist()]

    # thumbnail top-k
    k0 = int(576 * ratio)
    thumb_order = sorted(range(576), key=lambda i: (-thumb[i], i))[:k0]

    # block sums, softmax, ratios
    ph, pw = max(SIDE // nph, 1), max(SIDE // npw, 1)
    g = [0.0] * n
    for rr in range(SIDE):
        for cc in range(SIDE):
            bi, bj = min(rr // ph, nph - 1), min(cc // pw, npw - 1)
            g[bi * npw + bj] += thumb[rr * SIDE + cc]
    top = max(g)
    e = [math.exp((x - top) / temperature) for x in g]
    total = sum(e) + 1e-8
    sigma = [x / total for x in e]
    mean_sigma = sum(sigma) / n
    r = [min(1.0, ratio * (1.0 + s - mean_sigma)) for s in sigma]

    # valid rectangle of each crop
    rects = []
    for j in range(n):
        a, b = divmod(j, npw)
        top_row, bottom_row = max(a * SIDE, r0), min(a * SIDE + SIDE, r1)
        left, right = max(b * SIDE, c0), min(b * SIDE + SIDE, c1)
        rects.append((top_row, max(bottom_row - top_row, 0), left, max(right - left, 0)))

    # interpolate onto the unpadded region and split by walking the crop grid
    stretched = F.interpolate(
        scores[0].float().view(1, 1, SIDE, SIDE),
        size=(r1 - r0, c1 - c0),
        mode="bilinear",
        align_corners=False,
    )[0, 0]
    global_parts = []
    row_offset = 0
    for a in range(nph):
        col_offset = 0
        for b in range(npw):
            _, hj, _, wj = rects[a * npw + b]
            block = stretched[row_offset : row_offset + hj, col_offset : col_offset + wj]
            global_parts.append([float(x) for x in block.flatten().tolist()])
            col_offset += wj
        row_offset += rects[a * npw][1]

    # holistic score and per-crop top-k in the valid index space
    kept_valid, ks = [], []
    for j in range(n):
        top_row, hj, left, wj = rects[j]
        a, b = divmod(j, npw)
        local = []
        for rr in range(top_row, top_row + hj):
            for cc in range(left, left + wj):
                local.append(float(scores[1 + j][(rr - a * SIDE) * SIDE + (cc - b * SIDE)]))
        glob = global_parts[j]
        ng = max(math.sqrt(sum(x * x for x in glob)), 1e-12)
        nl = max(math.sqrt(sum(x * x for x in local)), 1e-12)
        combined = [gx / ng + lx / nl for gx, lx in zip(glob, local, strict=True)]
        kj = int(len(combined) * r[j])
        ks.append(kj)
        kept_valid.append(set(sorted(range(len(combined)), key=lambda i: (-combined[i], i))[:kj]))

    # reference layout: slot grid indexed by valid index, canvas walk, a separator per canvas row
    reference = [("thumb", t) for t in thumb_order]
    for rr in range(H):
        for cc in range(W):
            j = (rr // SIDE) * npw + cc // SIDE
            slot = (rr % SIDE) * SIDE + cc % SIDE
            if slot in kept_valid[j]:
                reference.append(("crop", j, slot))
        reference.append(("sep",))

    # clean layout: vanilla order restricted to kept tokens, a separator per unpadded row
    clean = [("thumb", t) for t in sorted(thumb_order)]
    for rr in range(r0, r1):
        for cc in range(c0, c1):
            j = (rr // SIDE) * npw + cc // SIDE
            top_row, _, left, wj = rects[j]
            v = (rr - top_row) * wj + (cc - left)
            if v in kept_valid[j]:
                clean.append(("crop", j, v))
        clean.append(("sep",))

    return {
        "thumbnail": thumb_order,
        "r": r,
        "k": ks,
        "n_valid": [hj * wj for _, hj, _, wj in rects],
        "reference": reference,
        "clean": clean,
    }


def symbolic(source, layout, valid_index):
    """Packed positions -> the spec's symbolic items, for comparing orders."""
    items = []
    for p in source.tolist():
        view, token = int(layout.view[p]), int(layout.token[p])
        if view == 0:
            items.append(("thumb", token))
        elif view > 0:
            items.append(("crop", view - 1, int(valid_index[p])))
        else:
            items.append(("sep",))
    return items
