"""An attached method's decode state, kept on the KV cache it describes.

A prefill that compressed the prompt leaves a KV cache shorter than the prompt ``generate`` counts in: each
later step must be translated (positions, mask) with what that prefill recorded. The state is stored on the
cache object itself, not in a table keyed by it, so that a copy of the cache carries it: transformers'
documentation reuses a prompt's cache through ``copy.deepcopy(prompt_cache)`` ("Best Practices for Generation
with Cache", ``docs/source/en/kv_cache.md``), and a copy that lost the state would decode its compressed cache
at the original prompt's positions without a word. Each adapter stores under its own key, so a pre-LLM and an
in-LLM method on one model keep theirs apart, and an adapter attached later never reads an earlier one's.
"""

from __future__ import annotations

import itertools
from typing import Any

#: The cache attribute that holds ``{adapter key: state}``.
STATES_ATTRIBUTE = "_globalcom2_decode_states"
_KEYS = itertools.count()


class CacheStates:
    """One adapter's states on the caches its prefills filled (an int key, which a deep copy keeps)."""

    def __init__(self) -> None:
        self._key = next(_KEYS)

    def get(self, cache: Any) -> Any:
        """The state a prefill of this adapter left on ``cache`` (or on the cache it was copied from)."""
        if cache is None:
            return None
        return getattr(cache, STATES_ATTRIBUTE, {}).get(self._key)

    def put(self, cache: Any, state: Any) -> None:
        """Tie ``state`` to ``cache``; ``None`` forgets a stale one (a later prefill into it needed none). A
        forward without a cache (``use_cache=False``) has nothing to tie it to."""
        if cache is None:
            return
        if state is None:
            getattr(cache, STATES_ATTRIBUTE, {}).pop(self._key, None)
            return
        if not hasattr(cache, STATES_ATTRIBUTE):
            setattr(cache, STATES_ATTRIBUTE, {})
        getattr(cache, STATES_ATTRIBUTE)[self._key] = state
