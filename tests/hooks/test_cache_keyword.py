"""The KV cache keyword: read under either name, passed on under the installed transformers' own."""

from __future__ import annotations

import inspect
import warnings

import pytest
import torch
import transformers
from helpers import prompt_inputs
from packaging.version import Version
from transformers import DynamicCache
from transformers.models.llama.modeling_llama import LlamaModel

from globalcom2 import attach
from globalcom2.hooks.cache_keyword import CACHE_KEYWORD, cache_argument, output_cache, without_cache
from globalcom2.models.loader import load_tiny_llava_next

pytestmark = pytest.mark.exactness


def test_the_keyword_follows_the_installed_transformers():
    expected = "cache" if Version(transformers.__version__) >= Version("5.24") else "past_key_values"
    assert expected == CACHE_KEYWORD
    assert CACHE_KEYWORD in inspect.signature(LlamaModel.forward).parameters


@pytest.mark.parametrize("keyword", ["cache", "past_key_values"])
def test_either_keyword_is_read_and_both_are_dropped(keyword):
    marker = object()
    kwargs = {keyword: marker, "use_cache": True}
    assert cache_argument(kwargs) is marker
    assert without_cache({**kwargs, "cache": None, "past_key_values": None}) == {"use_cache": True}
    assert cache_argument({"use_cache": True}) is None
    assert cache_argument({"cache": None, "past_key_values": None}) is None


def test_output_cache_reads_the_model_output():
    model, processor = load_tiny_llava_next(seed=0)
    image = torch.zeros(3, 336, 336, dtype=torch.uint8)
    inputs = prompt_inputs(processor, image)
    with torch.no_grad():
        out = model(**inputs, use_cache=True)
    cache = output_cache(out)
    assert isinstance(cache, DynamicCache)
    assert cache.get_seq_length() == inputs["input_ids"].shape[1]


def test_output_cache_reads_a_model_output_as_a_mapping_not_through_its_deprecated_alias():
    """From transformers 5.24 ``outputs.past_key_values`` is an alias that logs a deprecation warning."""

    class KeysOnly(dict):
        def __getattr__(self, name):
            raise AssertionError(f"read the attribute {name!r}")

    cache = DynamicCache()
    assert output_cache(KeysOnly(logits=1)) is None  # use_cache=False: no cache under either name
    assert output_cache(KeysOnly(past_key_values=cache)) is cache  # 5.23's field
    assert output_cache(KeysOnly(cache=cache)) is cache


@pytest.mark.parametrize("keyword", ["cache", "past_key_values"])
def test_an_attached_model_finds_a_cache_passed_under_either_keyword(keyword):
    """The pre-LLM stage refuses images after the first forward of a cache: it can only do that if it sees
    the cache, whichever keyword the caller used (the other one warns in transformers >= 5.24)."""
    model, processor = load_tiny_llava_next(seed=0)
    image = torch.zeros(3, 336, 336, dtype=torch.uint8)
    inputs = prompt_inputs(processor, image)
    cache = DynamicCache(config=model.config.text_config)
    with attach(model, "random", retention_ratio=0.5), torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # the old keyword, in transformers >= 5.24
        model(**inputs, **{keyword: cache}, use_cache=True)
        assert cache.get_seq_length() > 0
        with pytest.raises(NotImplementedError, match="first forward of a KV cache"):
            model(**inputs, **{keyword: cache}, use_cache=True)
