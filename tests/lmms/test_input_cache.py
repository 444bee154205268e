"""The cache of encoded inputs across a process's cells (``input_cache_gib``, globalcom2/lmms/input_cache.py):
exact (a hit gives the answers of encoding again), keyed on everything the encoding reads, copied in and out,
bounded in bytes."""

from __future__ import annotations

import copy
import threading

import pytest
import torch
from helpers import compose_cell
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
from globalcom2.run import unshared_input_cache


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


def test_a_full_cache_admits_nothing_new_so_a_repeated_scan_still_hits():
    """Every cell reads its batches in one order: with room for two of three, the second pass finds the first
    two (least-recently-used eviction would have dropped each just before it was asked for: no hit)."""
    size = 16 * 4 + 2 * 8  # bytes of entry()
    cache = InputCache(budget_bytes=2 * size)
    found = []
    for _ in range(2):
        for name in "abc":
            if cache.get((name,)) is not None:
                found.append(name)
            else:
                cache.put((name,), entry(1.0))
    assert found == ["a", "b"] and cache.nbytes == 2 * size
    assert cache.put(("a",), entry(5.0)) is False and cache.get(("a",))["pixel_values"][0] == 1.0  # kept
    assert cache.put(("huge",), entry(0.0, floats=1000)) is False  # larger than the room left
    cache.resize(size)  # a smaller budget lets the latest entries go first
    assert len(cache) == 1 and cache.get(("a",)) is not None and cache.nbytes == size
    cache.resize(0)
    assert len(cache) == 0 and cache.nbytes == 0


def test_threads_sharing_the_cache_keep_its_byte_count_exact():
    size = 16 * 4 + 2 * 8
    cache = InputCache(budget_bytes=10 * size)
    barrier = threading.Barrier(4)

    def work(seed: int) -> None:
        barrier.wait()
        for step in range(200):
            key = ((seed * 7 + step) % 25,)
            if cache.get(key) is None:
                cache.put(key, entry(float(key[0])))

    threads = [threading.Thread(target=work, args=(seed,)) for seed in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(cache) == 10 and cache.nbytes == 10 * size
    assert all(cache.get((k,)) is None or cache.get((k,))["pixel_values"][0] == k for k in range(25))


def test_a_hit_for_a_cuda_model_is_copied_once_into_pinned_memory(monkeypatch):
    """``pinned``: each tensor of a hit is copied by ``pin_memory`` alone (no clone first); a miss's computed
    tensors are pinned too. (``pin_memory`` needs CUDA: here it is replaced by a counting copy.)"""
    pinned, cloned = [], []
    real_clone = torch.Tensor.clone
    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda t: pinned.append(1) or real_clone(t))
    monkeypatch.setattr(torch.Tensor, "clone", lambda t, *a, **k: cloned.append(1) or real_clone(t, *a, **k))
    encoder = CachedEncoder(InputCache(budget_bytes=GIB), "encoder")
    batch = PreparedBatch(["<image>\nq"], [Image.new("RGB", (4, 4), "green")], [1], [("t", "s", 0)])
    encoder.encode(batch, lambda: entry(1.0), pinned=True)  # a miss: kept (cloned), returned pinned
    assert (len(cloned), len(pinned)) == (2, 2)
    hit = encoder.encode(batch, lambda: entry(2.0), pinned=True)
    assert (len(cloned), len(pinned)) == (2, 4) and hit["pixel_values"][0] == 1.0


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
    translucent = indexed.copy()
    translucent.putpalette([255, 0, 0, 128] * 256, rawmode="RGBA")  # the same colours, other alpha
    assert image_digest(indexed) != image_digest(translucent)
    keyed = indexed.copy()
    keyed.info["transparency"] = 0  # a tRNS entry: index 0 becomes transparent in the conversion to RGBA
    assert image_digest(indexed) != image_digest(keyed)
    keyed_rgb = image.copy()
    keyed_rgb.info["transparency"] = (10, 20, 30)  # an RGB PNG's tRNS: this colour is transparent
    assert image_digest(keyed_rgb) != image_digest(image)
    # what it changes: transformers' convert_to_rgb composites a transparent pixel onto white
    assert keyed_rgb.convert("RGBA").tobytes() != image.convert("RGBA").tobytes()


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
    for name, value in (("padding_side", "right"), ("pad_token_id", 0)):
        changed = copy.deepcopy(processor)
        setattr(changed.tokenizer, name, value)
        assert fingerprint(processor=changed) != base, name
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
    # another image processor class under the same configuration (the torchvision backend beside PIL's)
    rebased = copy.deepcopy(processor)
    base_class = type(processor.image_processor)
    rebased.image_processor.__class__ = type(
        base_class.__name__, (base_class,), {"__module__": "other.backend"}
    )
    assert rebased.image_processor.to_json_string() == processor.image_processor.to_json_string()
    assert fingerprint(processor=rebased) != base
    # a call sets the tokenizer's padding and truncation state: the same encoder before and after it
    called = copy.deepcopy(processor)
    called(
        text=["<image> a question", "a much longer question here"],
        images=[Image.new("RGB", (64, 64))] * 1,
        padding=True,
        return_tensors="pt",
    )
    assert fingerprint(processor=called) == base


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


@pytest.fixture
def empty_shared_cache():
    """The process's cache, empty before the test and after it (other tests run in this process too)."""
    shared_input_cache(0.0)
    yield
    shared_input_cache(0.0)


@pytest.mark.usefixtures("empty_shared_cache")
@pytest.mark.parametrize("prefetch", [False, True])
def test_a_later_run_reads_every_batch_back_with_the_answers_of_encoding_again(images, prefetch):
    """Two runs in one process (two cells of a sweep, other methods) with the cache on: the second finds every
    batch of the first and gives, token for token, the answers and records of a run without the cache; with
    two encoding threads too (the cache is shared between them)."""
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

    _, first_use = answers("random", 0.25, 1.0)
    assert first_use["misses"] >= 3  # three batches of 2, 2 and 1 rows (and the warm-up's first row)
    cached_second, second_use = answers("fastv", 0.5, 1.0)
    assert second_use["misses"] == 0 and second_use["held_bytes"] > 0
    assert second_use["hits"] == first_use["hits"] + first_use["misses"]  # the same encodings, all read back
    uncached_second, off = answers("fastv", 0.5, 0.0)
    assert cached_second == uncached_second and off is None
    assert len(shared_input_cache(1.0)) == 0  # the run with the cache off let the earlier entries go


def test_the_cache_setting_is_checked_before_the_model_loads(monkeypatch):
    def no_loading(*args, **kw):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr("globalcom2.load_llava_next", no_loading)
    # 1e-10 GiB: a budget of 0 bytes, not "off"; 0.005 GiB: less than one 672x672 image's inputs
    for bad in (-1, "lots", True, 2048, float("nan"), 1e-10, 0.005):
        with pytest.raises(
            ValueError, match=r"input_cache_gib must be 0 \(off\) or a size in GiB in \[0.01, 1024\]"
        ):
            GlobalCom2LlavaNext(pretrained="tiny", input_cache_gib=bad)


def test_a_sweep_whose_cells_run_in_processes_of_their_own_is_told_the_cache_cannot_help(tmp_path):
    assert unshared_input_cache(compose_cell(tmp_path, "input_cache_gib=2")) is None  # local: one process
    assert unshared_input_cache(compose_cell(tmp_path, "launcher=slurm")) is None  # off
    slurm = unshared_input_cache(compose_cell(tmp_path, "launcher=slurm", "input_cache_gib=2"))
    assert slurm == (
        "input_cache_gib=2: launcher=slurm runs each cell as a job of its own, so no cell can read another's "
        "encoded inputs and the cache only costs its filling; set input_cache_gib=0"
    )
    spread = compose_cell(tmp_path, "launcher=accelerate", "launcher.num_processes=2", "input_cache_gib=2")
    assert "launcher.num_processes=2 runs each cell in processes of its own" in unshared_input_cache(spread)


def test_the_sweep_check_finds_a_process_count_that_only_a_sweep_value_sets(tmp_path):
    """``launcher.num_processes=1,2`` is not in the multirun's primary config: each job's own is checked, and
    only the job that spreads over two processes is named."""
    from hydra import compose, initialize_config_dir
    from omegaconf import open_dict

    from globalcom2.paths import PROJECT_ROOT
    from globalcom2.run import check_sweep

    fixed = [
        f"paths.results_dir={tmp_path}",
        "model=tiny",
        "benchmark=demo",
        "method=random",
        "input_cache_gib=2",
    ]
    with initialize_config_dir(config_dir=str(PROJECT_ROOT / "configs"), version_base="1.3"):
        primary = compose(config_name="eval", overrides=fixed, return_hydra_config=True)
        assert unshared_input_cache(primary) is None  # what the multirun's start alone saw
        with open_dict(primary):  # the command line, with its sweep, as Hydra records it for the sweeper
            primary.hydra.overrides.task = [*fixed, "launcher=accelerate", "launcher.num_processes=1,2"]
        problems, warnings = check_sweep(primary)
    assert problems == [] and len(warnings) == 1, warnings
    assert "launcher.num_processes=2 runs each cell in processes of its own" in warnings[0]
    assert warnings[0].endswith(f"[{' '.join(fixed)} launcher=accelerate launcher.num_processes=2]")
