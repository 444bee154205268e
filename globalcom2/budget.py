"""The one budget vocabulary: ``retention_ratio``, the kept fraction of an image's patch tokens.

A ratio R in (0, 1] keeps ``floor(R * N)`` of N candidate tokens. Every method and every record uses
this word and this rounding, so a table column "R = 0.25" means the same thing for all methods
(see ../shared/style.md §7.5 rule 5 for why one name matters).
"""

from __future__ import annotations

import math
import numbers


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
    """``floor(retention_ratio * num_tokens)``: the number of tokens a ratio keeps out of ``num_tokens``."""
    return math.floor(num_tokens * retention_ratio)
