"""The KV cache's keyword in the transformers versions the attach points support (5.23 and later).

transformers 5.24 renamed ``past_key_values`` to ``cache`` in the LLaMA and LLaVA-NeXT forwards, in the
decoder layer, in ``masking_utils.create_causal_mask`` and in the model outputs (huggingface/transformers
v5.24.0, ``models/llama/modeling_llama.py``: ``@deprecate_kwarg("past_key_values", "5.40.0",
new_name="cache")`` on ``LlamaDecoderLayer.forward``; ``LlavaNextModelOutputWithPast`` carries ``.cache``).
The old keyword is still accepted with a FutureWarning until 5.40, but a hook that reads only one name sees
``None`` under the other version, and a forward that receives both keeps ``cache`` and drops the other.

So the hooks read the cache under either name (:func:`cache_argument`, :func:`output_cache`) and pass it on
under the installed version's own (:data:`CACHE_KEYWORD`).
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any

from transformers.models.llama.modeling_llama import LlamaDecoderLayer

#: The keyword this transformers' decoder layers and model forwards take the KV cache under.
CACHE_KEYWORD: str = (
    "cache" if "cache" in inspect.signature(LlamaDecoderLayer.forward).parameters else "past_key_values"
)
_KEYWORDS = ("cache", "past_key_values")


def cache_argument(kwargs: dict[str, Any]) -> Any:
    """The KV cache passed in ``kwargs`` under either keyword, or ``None``."""
    for keyword in _KEYWORDS:
        if kwargs.get(keyword) is not None:
            return kwargs[keyword]
    return None


def without_cache(kwargs: dict[str, Any]) -> dict[str, Any]:
    """``kwargs`` less both cache keywords (to pass the cache on under :data:`CACHE_KEYWORD`)."""
    return {key: value for key, value in kwargs.items() if key not in _KEYWORDS}


def output_cache(outputs: Any) -> Any:
    """The KV cache a model output carries (``.cache`` from 5.24, ``.past_key_values`` before). A model
    output is read as the mapping it is: from 5.24 its ``past_key_values`` attribute is a deprecated alias
    whose read logs a deprecation warning, even when there is no cache (``use_cache=False``)."""
    for keyword in _KEYWORDS:
        cache = outputs.get(keyword) if isinstance(outputs, Mapping) else getattr(outputs, keyword, None)
        if cache is not None:
            return cache
    return None
