"""The cache of encoded inputs across a process's cells (``input_cache_gib``, globalcom2/lmms/input_cache.py):
exact (a hit gives the answers of encoding again), keyed on everything the encoding reads, copied in and out,
bounded in bytes."""

from __future__ import annotations

import copy

import pytest
import torch
from PIL import Image
from test_plugin import requests_for

from globalcom2.lmms.input_cache import (
    GIB,
    CachedEncoder,
    InputCache,
    batch_key,
    encoder_fingerprint,
    image_digest,
    shared_input_cache,
)
from globalcom2.lmms.plugin import GlobalCom2LlavaNext
from globalcom2.protocol.batching import PreparedBatch


def entry(value: float, floats: int = 16) -> dict[str, torch.Tensor]:
    """An entry of ``floats * 4 + 16`` bytes."""
    return {"pixel_values": torch.full((floats,), value), "input_ids": torch.tensor([1, 2])}


def test_a_hit_is_a_copy_that_neither_side_can_change():
    cache = InputCache(budget_bytes=1 << 20)
    original = entry(1.0)
    cache.put(("a",), original)
    original["pixel_values"].fill_(9.0)  # the caller's tensors after put: not the cache's
    first = cache.get(("a",))
    assert torch.equal(first["pixel_values"], torch.full((16,), 1.0))
    first["pixel_values"].fill_(7.0)  # a consumer that modifies its inputs in place
    again = cache.get(("a",))
    assert torch.equal(again["pixel_values"], torch.full((16,), 1.0))
    assert again["input_ids"].tolist() == [1, 2] and cache.get(("b",)) is None


def test_the_least_recently_used_entries_leave_past_the_budget():
    size = 16 * 4 + 2 * 8  # bytes of entry()
    cache = InputCache(budget_bytes=3 * size)
    for name in "abc":
        cache.put((name,), entry(1.0))
    assert len(cache) == 3 and cache.nbytes == 3 * size
    cache.get(("a",))  # now the most recent: b is the oldest
    cache.put(("d",), entry(2.0))
    assert cache.get(("b",)) is None and all(cache.get((n,)) is not None for n in "acd")
    cache.put(("a",), entry(3.0))  # replaced, counted once
    assert cache.nbytes == 3 * size and cache.get(("a",))["pixel_values"][0] == 3.0
    cache.put(("huge",), entry(0.0, floats=1000))  # larger than the whole budget: not kept, nothing evicted
    assert cache.get(("huge",)) is None and len(cache) == 3
    cache.resize(size)  # a smaller budget evicts down to it, oldest first
    assert len(cache) == 1 and cache.get(("a",)) is not None and cache.nbytes == size


def test_an_image_digest_follows_what_the_processor_reads():
    image = Image.new("RGB", (4, 3), (10, 20, 30))
    assert image_digest(image) == image_digest(image.copy())  # content, not the object
    edited = image.copy()
    edited.putpixel((0, 0), (10, 20, 31))
    assert image_digest(edited) != image_digest(image)
    assert image_digest(image.resize((3, 4))) != image_digest(image)  # same byte count, other size
    grey = Image.new("L", (12, 3), 7)  # as many bytes as the RGB image
    assert image_digest(grey) != image_digest(Image.frombytes("RGB", (4, 3), grey.tobytes()))
    indexed = Image.new("P", (4, 3), 0)
    indexed.putpalette([255, 0, 0] * 256)
    recoloured = indexed.copy()
    recoloured.putpalette([0, 0, 255] * 256)  # the same indices, other colours
    assert image_digest(indexed) != image_digest(recoloured)


def test_a_batch_key_holds_its_prompts_rows_and_images_in_order():
    red, blue = Image.new("RGB", (2, 2), "red"), Image.new("RGB", (2, 2), "blue")

    def batch(prompts, images, per_row):
        return PreparedBatch(
            list(prompts), list(images), list(per_row), [("t", "s", i) for i in range(len(prompts))]
        )

    base = batch_key(batch(["a", "b"], [red, blue], [1, 1]))
    assert batch_key(batch(["a", "b"], [red.copy(), blue.copy()], [1, 1])) == base
    assert batch_key(batch(["a", "b"], [blue, red], [1, 1])) != base
    assert batch_key(batch(["a", "c"], [red, blue], [1, 1])) != base
    assert batch_key(batch(["a", "b"], [red, blue], [2, 0])) != base


def test_the_encoder_fingerprint_changes_with_whatever_the_encoding_reads(tiny):
    model, processor = tiny
    config = model.config

    def fingerprint(
        processor=processor, config=config, protocol="lmms_eval", vicuna_text=False, dtype=torch.float32
    ):
        return encoder_fingerprint(processor, config, protocol=protocol, vicuna_text=vicuna_text, dtype=dtype)

    base = fingerprint()
    assert fingerprint(processor=copy.deepcopy(processor)) == base
    assert fingerprint(protocol="llava") != base
    assert fingerprint(vicuna_text=True) != base
    assert fingerprint(dtype=torch.bfloat16) != base
    normalised = copy.deepcopy(processor)
    normalised.image_processor.image_mean = [0.5, 0.5, 0.5]
    assert fingerprint(processor=normalised) != base
    grown = copy.deepcopy(processor)
    grown.tokenizer.add_tokens(["<a-new-token>"])  # same name and path, another tokenizer
    assert fingerprint(processor=grown) != base
    regridded = copy.deepcopy(config)
    regridded.image_grid_pinpoints = [[336, 672], [672, 336]]
    assert fingerprint(config=regridded) != base


def test_a_cached_encoder_counts_and_computes_only_on_a_miss():
    cache = InputCache(budget_bytes=GIB)
    image = Image.new("RGB", (4, 4), "green")
    batch = PreparedBatch(["<image>\nq"], [image], [1], [("t", "s", 0)])
    computed = []

    def compute():
        computed.append(1)
        return entry(float(len(computed)))

    one, other = CachedEncoder(cache, "encoder-1"), CachedEncoder(cache, "encoder-2")
    first = one.encode(batch, compute)
    assert torch.equal(one.encode(batch, compute)["pixel_values"], first["pixel_values"])
    assert len(computed) == 1 and (one.hits, one.misses) == (1, 1)
    other.encode(batch, compute)  # another encoder's fingerprint: another key
    assert len(computed) == 2 and (other.hits, other.misses) == (0, 1)
    assert one.summary() == {"hits": 1, "misses": 1, "held_bytes": cache.nbytes}


@pytest.mark.parametrize("prefetch", [False, True])
def test_a_later_run_reads_every_batch_back_with_the_answers_of_encoding_again(images, prefetch):
    """Two runs in one process (two cells of a sweep, other methods) with the cache on: the second finds every
    batch of the first and gives, token for token, the answers and records of a run without the cache; with
    two encoding threads too (the cache is shared between them)."""
    shared_input_cache(1.0).clear()
    sizes = [(336, 1008), (336, 336), (800, 600), (336, 336), (1008, 336)]
    docs = [{"image": images[size]} for size in sizes]
    gen = {"until": ["\n\n"], "max_new_tokens": 4}
    threads = {"prefetch": "true", "prefetch_threads": 2} if prefetch else {}

    def answers(method: str, ratio: float | None, cache_gib: float) -> tuple[list[tuple], dict | None]:
        lm = GlobalCom2LlavaNext(
            pretrained="tiny", method=method, retention_ratio=ratio, batch_size=2, profile=False,
            input_cache_gib=cache_gib, **threads,
        )  # fmt: skip
        outputs = lm.generate_until(requests_for(lm, docs, gen_kwargs=gen))
        rows = [
            (o.text, r.output_token_ids, r.prompt_tokens) for o, r in zip(outputs, lm.records, strict=True)
        ]
        assert lm.run_info["input_cache_gib"] == cache_gib
        return rows, lm.run_info["input_cache"]

    cached_first, first_use = answers("random", 0.25, 1.0)
    assert first_use["misses"] >= 3  # three batches of 2, 2 and 1 rows (and the warm-up's first row)
    cached_second, second_use = answers("fastv", 0.5, 1.0)
    assert second_use["misses"] == 0 and second_use["held_bytes"] > 0
    assert second_use["hits"] == first_use["hits"] + first_use["misses"]  # the same encodings, all read back
    assert cached_first == answers("random", 0.25, 0.0)[0]
    uncached_second, off = answers("fastv", 0.5, 0.0)
    assert cached_second == uncached_second and off is None


def test_the_cache_setting_is_checked_before_the_model_loads(monkeypatch):
    def no_loading(*args, **kw):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr("globalcom2.load_llava_next", no_loading)
    for bad in (-1, "lots", True, 2048, float("nan")):
        with pytest.raises(
            ValueError, match=r"input_cache_gib must be 0 \(off\) or a size in GiB in \(0, 1024\]"
        ):
            GlobalCom2LlavaNext(pretrained="tiny", input_cache_gib=bad)
