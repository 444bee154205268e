"""Every method's prefill stays within its budget of host reads (what stalls a GPU's launch queue).

Counted on CPU with :class:`~globalcom2.efficiency.host_syncs.HostSyncCounter`, which flags the calls that wait
for a CUDA device; ``tests/gpu/test_cuda_syncs.py`` checks the same budgets with CUDA's own sync detector.
Budget over the unmodified model's own count: a pre-LLM method and FastV at most 3 per prefill forward,
SparseVLM (a multi-stage method) at most 3 per pruning stage; decode steps after a compressed prefill add none.
"""

from __future__ import annotations

import pytest
import torch
from helpers import prompt_inputs, sync_budget_params

from globalcom2 import attach
from globalcom2.efficiency.host_syncs import HostSyncCounter
from globalcom2.hooks.cache_keyword import CACHE_KEYWORD, output_cache
from globalcom2.methods import METHODS, InLLMMethod
from globalcom2.perf.host_syncs import count_prefill
from globalcom2.prompts import vicuna_v1_prompt

PER_FORWARD = 3  # extra host reads a pre-LLM method (or a one-stage in-LLM method) may add to a prefill


def budget(handle, num_layers: int) -> int:
    method = handle.method
    if isinstance(method, InLLMMethod):
        return PER_FORWARD * len(method.checked_stage_layers(num_layers))
    return PER_FORWARD


@pytest.fixture(scope="module")
def single(tiny, images):
    return prompt_inputs(tiny[1], images[(672, 672)])


@pytest.mark.parametrize("name", METHODS.names())
def test_prefill_adds_at_most_its_budget_of_host_reads(model, single, name):
    baseline = count_prefill(model, single).total
    with attach(model, name, **sync_budget_params(name)) as handle:
        syncs = count_prefill(model, single)
    extra = syncs.total - baseline
    allowed = budget(handle, len(model.model.language_model.layers))
    assert extra <= allowed, (
        f"{name} adds {extra} host reads to a prefill (allowed {allowed}); where: {dict(syncs.by_line)}"
    )
    if name != "vanilla":
        assert handle.stats, "the method ran (and recorded what it kept)"


#: Methods that read once per image (not per forward): ``random``'s image content key (its seed, so a sample
#: draws the same tokens in any batch). GlobalCom²'s crop allocations (they depend on the scores) and
#: DivPrune's kept separators under ``"positions"`` are read once per call, with every image's.
PER_IMAGE_READ = ("random",)


@pytest.mark.parametrize("name", [m for m in METHODS.names() if m != "vanilla"])
def test_a_batch_costs_no_more_host_reads_per_forward_than_one_prompt(model, processor, images, name):
    """The budget is per forward, not per image: two images in a left-padded batch read no more (but for the
    one read per image that :data:`PER_IMAGE_READ` methods declare)."""
    text = [vicuna_v1_prompt("What is here?"), vicuna_v1_prompt("Describe the picture in a few words.")]
    processor.tokenizer.padding_side = "left"
    batch = processor(
        images=[images[(672, 672)], images[(1008, 336)]], text=text, return_tensors="pt", padding=True
    )
    baseline = count_prefill(model, batch).total
    with attach(model, name, **sync_budget_params(name)) as handle:
        syncs = count_prefill(model, batch)
    extra = syncs.total - baseline
    assert extra <= budget(handle, len(model.model.language_model.layers)) + (name in PER_IMAGE_READ), (
        f"{name}: {extra} extra reads for a batch of two; where: {dict(syncs.by_line)}"
    )


@pytest.mark.parametrize("name", [m for m in METHODS.names() if m != "vanilla"])
def test_decode_steps_after_a_compressed_prefill_add_no_host_read(model, single, name):
    def decode_syncs() -> int:
        with torch.inference_mode():
            out = model(**single, use_cache=True)
            step = {
                "input_ids": out.logits[:, -1:].argmax(-1),
                "attention_mask": torch.ones(1, single["input_ids"].shape[1] + 1, dtype=torch.long),
                CACHE_KEYWORD: output_cache(out),
                "position_ids": torch.tensor([[single["input_ids"].shape[1]]]),
            }
            with HostSyncCounter() as syncs:
                model(**step, use_cache=True)
        return syncs.total

    baseline = decode_syncs()
    with attach(model, name, **sync_budget_params(name)):
        assert decode_syncs() <= baseline


def test_the_counter_flags_the_calls_that_wait_for_a_device_and_no_others():
    x = torch.arange(10)
    mask = x > 4
    with HostSyncCounter() as syncs:
        x.sum().item()
        x.tolist()
        bool(mask.any())
        x[mask]
        x.nonzero()
        torch.repeat_interleave(x, x)
        torch.bincount(x, minlength=12)
        torch.tensor([1, 2], device=torch.device("meta"))  # a copy from host memory (on CUDA: a wait)
        grid = torch.zeros(3, 4)
        grid[x[:2], x[1:3]] = 1  # the number goes to the device as a blocking copy (index_put_)
        grid[0, 3] = 1  # one element: a blocking 0-dim copy
        x[[0, 2]]  # a list index is host data copied to the device
        x[x[3]]  # a 0-dim integer tensor index is read on the host
        grid[x[:3] > 0] = torch.ones(4)  # a mask put with a tensor: index_put_ expands the mask (nonzero)
        torch.repeat_interleave(x[:3], torch.tensor(2))  # one repeat count, broadcast: still read on the host
        _ = 3 in x  # ``in`` reads an any() back
        _ = f"{x.sum():.2f}"  # formatting reads the value
        _ = repr(x[:2]), str(x[:2])  # so do repr and str
        torch.arange(x[3])  # a 0-dim tensor where a number goes is read by the argument parser
        x.topk(x[2])
        x.narrow(0, 0, x[2])
        torch.zeros((2, x[2]))
        torch.nn.functional.one_hot(x)  # its width is max(x) + 1
    assert syncs.by_kind == {
        "contains": 1,
        "format": 3,
        "scalar_argument": 4,
        "one_hot": 1,
        "item": 1,
        "tolist": 1,
        "bool": 1,
        "bool_mask_index": 2,
        "nonzero": 1,
        "repeat_interleave": 2,
        "bincount": 1,
        "host_to_device": 4,
        "index": 1,
    }
    with HostSyncCounter() as quiet:
        x[x.clamp(max=3)]  # integer indexing
        torch.repeat_interleave(x, x, output_size=45)
        x.topk(3)
        torch.where(mask, x, 0)
        x.to(torch.float32)
        grid[x[:2], x[1:3]] = torch.ones(2)  # a device tensor put at tensor indices
        grid[:, 2:] = 0  # a slice filled with a number (fill_)
        grid[1] = 5  # a row filled with a number
        grid[grid > 0] = 0  # a mask filled with a number: masked_fill_
        grid[:, x[:4] > 1] = 2
        torch.nn.functional.one_hot(x, num_classes=10)
        x.narrow(0, 0, 3)
        x.view(2, 5)
        torch.full((2,), 3.0)
    assert quiet.total == 0, dict(quiet.by_kind)


def test_the_bench_records_every_method_s_reads_with_where_they_come_from(tmp_path):
    from globalcom2.perf import host_syncs

    record = host_syncs.main(["--out", str(tmp_path)])
    assert [row["method"] for row in record["rows"]] == METHODS.names()
    rows = {row["method"]: row for row in record["rows"]}
    assert rows["vanilla"]["reads"] >= record["unattached"]
    for row in rows.values():
        assert (
            row["extra"]
            == row["reads"] - record["unattached"]
            == sum(row["by_kind"].values()) - record["unattached"]
        )
        assert sum(row["by_line"].values()) == row["reads"]
    assert "| sparsevlm |" in (tmp_path / "host_syncs_cpu.md").read_text()
    assert (tmp_path / "host_syncs_cpu.json").is_file()
