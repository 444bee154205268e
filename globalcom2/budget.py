"""The one budget vocabulary: ``retention_ratio``, the kept fraction of an image's patch tokens.

A ratio R in (0, 1] keeps ``floor(R * N)`` of N candidate tokens. Every method and every record uses this
word (compression toolkits name the budget four ways, ``rate``, ``prune_ratio``, ``reduction_ratio`` and
``dominant``/``contextual`` in ModelTC/LightCompress's FastV, random, SparseVLM and VisionZip configs). For
GlobalCom², random, FastV and DivPrune, R is this one fraction of the image's tokens (GlobalCom² keeps less
than it at high R, where a crop's share is capped at all of its tokens: its module says when). The later baselines
keep their official knob under the same word, each documented in its module: PDrop's R is its last stage's
fraction, SparseVLM's a layer average, DART's adds its pivots, VisionZip's is per 336-px view. Across those a
column "R = 0.25" is not one cost; the records' equivalent tokens and TFLOPs are.
"""

from __future__ import annotations

import math
import numbers
import warnings


def validate_retention_ratio(value: object, *, name: str = "retention_ratio") -> float:
    """Return ``value`` as a float in (0, 1] or raise with the bad value and the valid range.

    Strings are refused on purpose: configs and CLIs must convert explicitly, so that "0.5" and 0.5
    can never mean different things in two code paths.
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(
            f"{name} must be a real number in (0, 1], got {value!r} of type {type(value).__name__}"
        )
    ratio = float(value)
    if not math.isfinite(ratio) or not 0.0 < ratio <= 1.0:
        raise ValueError(f"{name} must be in (0, 1] (a kept fraction), got {value!r}")
    return ratio


def kept_count(num_tokens: int, retention_ratio: float) -> int:
    """``floor(retention_ratio * num_tokens)``: the number of tokens a ratio keeps out of ``num_tokens``.

    Computed in floating point, as the reference implementations compute it (``int(N * R)``), so the count
    is theirs token for token. For a ratio without an exact binary form the product can fall just below an
    integer it equals in real numbers: ``0.7 * 660 = 461.99999999999994`` keeps 461, not 462 (143 such
    ``N`` below 6,000 at 0.7, 70 at 0.35). None of 0.05, 0.1, 0.125, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5, 0.6,
    0.75 or 0.9 does this for any ``N`` below 6,000 (checked against exact fractions).
    """
    return math.floor(num_tokens * retention_ratio)


#: Patch tokens of the thumbnail view, which every AnyRes image has (24 x 24 at 336 px / patch 14).
THUMBNAIL_PATCH_TOKENS = 576
#: Patch tokens of the largest llava-v1.6 image (672 x 672: thumbnail + 4 full crops).
MAX_PATCH_TOKENS = 2880


def warn_if_no_patch_token_kept(retention_ratio: float) -> bool:
    """Warn (and return True) when ``retention_ratio`` keeps no patch token of some images.

    ``floor(R * N)`` is 0 for every image with fewer than ``1 / R`` patch tokens. Such a run is valid,
    the LLM sees only the row separators and the text, but it is almost never what was meant.
    """
    if kept_count(THUMBNAIL_PATCH_TOKENS, retention_ratio) > 0:
        return False
    needed = math.ceil(1 / retention_ratio)
    scope = (
        "so no image keeps any"
        if kept_count(MAX_PATCH_TOKENS, retention_ratio) == 0
        else "larger ones keep a few"
    )
    warnings.warn(
        f"retention_ratio={retention_ratio!r} keeps floor(R * N) = 0 patch tokens of every image with fewer "
        f"than {needed} patch tokens ({scope}; a 672x672 image has {MAX_PATCH_TOKENS}, the "
        f"thumbnail alone {THUMBNAIL_PATCH_TOKENS}); the LLM then sees only row separators and text",
        UserWarning,
        stacklevel=2,
    )
    return True
