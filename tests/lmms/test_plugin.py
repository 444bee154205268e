"""The lmms-eval model plugin: registration, argument checks, prompts, stop strings, empty answers, errors."""

from __future__ import annotations

import copy
import importlib.metadata
import os
import threading

import pytest
import torch
from lmms_eval.api.instance import GenerationResult, Instance
from loguru import logger

from globalcom2.lmms.batch_pipeline import ENCODER_THREADS
from globalcom2.lmms.plugin import MODEL_ID, GlobalCom2LlavaNext
from globalcom2.models.batch_invariant import FORCE_GQA_VARIABLE
from globalcom2.prompts import vicuna_v1_prompt
from globalcom2.run_spec import MAX_AUTO_PREFETCH_THREADS, default_prefetch_threads


def requests_for(lm, docs, context="Is there a cat?", gen_kwargs=None, task="toy", split="test"):
    """Simple-model requests as lmms-eval builds them, over ``docs`` registered as ``task``/``split``."""
    lm.task_dict = {task: {split: docs}}
    kwargs = gen_kwargs or {"until": ["\n\n"], "max_new_tokens": 3}
    return [
        Instance(
            request_type="generate_until",
            arguments=(context, dict(kwargs), lambda doc: [doc["image"]], i, task, split),
            idx=0,
            metadata={"task": task, "doc_id": i, "repeats": 1, "split": split},
        )
        for i in range(len(docs))
    ]


@pytest.fixture(scope="module")
def lm():
    return GlobalCom2LlavaNext(pretrained="tiny", method="random", retention_ratio=0.25, profile=False)


@pytest.fixture
def docs(images):
    return [{"image": images[(1008, 336)]}, {"image": images[(336, 1008)]}]


def test_entry_point_resolves_and_passes_lmms_eval_type_checks():
    from lmms_eval.models import MODEL_REGISTRY_V2, get_model

    points = importlib.metadata.entry_points(group="lmms_eval.models")
    assert "globalcom2.lmms.manifest:manifests" in {p.value for p in points}
    # get_model_class validates: subclass of lmms, is_simple matching the resolved (simple) kind.
    assert MODEL_REGISTRY_V2.get_model_class(MODEL_ID) is GlobalCom2LlavaNext
    assert get_model(MODEL_ID) is GlobalCom2LlavaNext
    assert MODEL_REGISTRY_V2.resolve(MODEL_ID).model_type == "simple"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"method": "globalcom3"}, "unknown compression method 'globalcom3'"),
        ({"method": "random", "retention_ratio": 1.5}, r"retention_ratio must be in \(0, 1\]"),
        ({"method": "random", "retention_ratio": 0.5, "ratio": 0.5}, "does not take 'ratio'"),
        ({"method": "random", "retention_ratio": 0.5, "seed": 1.5}, "seed must be an integer"),
        (
            {"method": "random", "retention_ratio": 0.5, "attn_implementation": "flash_attention_2"},
            "supports eager, sdpa",
        ),
        ({"batch_size": "auto"}, "automatic batch sizes"),
        ({"compile": "fast"}, "compile must be true, false or one of default, reduce-overhead"),
        ({"prefetch_threads": 0}, "prefetch_threads must be auto or an integer from 1 to 16, got 0"),
        ({"prefetch_threads": 17}, "prefetch_threads must be auto or an integer from 1 to 16, got 17"),
        (
            {"prefetch_threads": "many"},
            "prefetch_threads must be auto or an integer from 1 to 16, got 'many'",
        ),
        (
            {"prefetch": "false", "prefetch_threads": 2},
            "prefetch_threads=2 needs prefetching, but prefetch=false prepares each batch in turn",
        ),
    ],
)
def test_bad_arguments_fail_before_the_model_is_loaded(monkeypatch, kwargs, message):
    def no_loading(*args, **kw):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr("globalcom2.load_llava_next", no_loading)
    with pytest.raises((ValueError, TypeError), match=message):
        GlobalCom2LlavaNext(pretrained="tiny", **kwargs)


def test_compile_mode_is_applied_after_attaching_and_recorded():
    """``compile=true`` (a ``model_args`` string) compiles the layers in the device's default mode (compilation
    itself happens at the first call, so nothing is generated here); a backend that cannot run is refused
    before the model loads."""
    lm = GlobalCom2LlavaNext(pretrained="tiny", method="random", retention_ratio=0.5, compile="true")
    try:
        assert lm.run_info["compile"] == "default" and lm.compiled.mode == "default"
        assert all("forward" in vars(layer) for layer in lm.model.model.language_model.layers)
    finally:
        lm.compiled.remove()
    with pytest.raises(RuntimeError, match="CUDA graphs, which need a CUDA device"):
        GlobalCom2LlavaNext(pretrained="tiny", device="cpu", compile="reduce-overhead")


def test_a_compiled_run_records_its_frames_and_its_release_restores_the_eager_layers(monkeypatch):
    """``run_info["compile_frames"]`` counts what dynamo compiled and gave up on since this run compiled its
    model; ``release`` (the worker's, at the cell's end) removes the handle, and a run in which a frame failed
    is warned about and leaves its shared layer code to the next model afresh (``models/layer_code.py``).
    (``torch.compile`` is the identity and the failure is counted as dynamo counts one: no compilation.)"""
    from torch._dynamo.utils import counters

    from globalcom2.models import compiled
    from globalcom2.models.layer_code import SHARED

    monkeypatch.setattr(compiled.torch, "compile", lambda fn, mode, dynamic: fn)
    eager = GlobalCom2LlavaNext(pretrained="tiny", method="random", retention_ratio=0.5)
    assert eager.run_info["compile_frames"] is None
    eager.release()  # nothing to undo
    lm = GlobalCom2LlavaNext(pretrained="tiny", method="random", retention_ratio=0.5, compile="true")
    layers = lm.model.model.language_model.layers
    signature = lm.compiled.signature
    assert lm.run_info["compile_frames"] == {"compiled": 0, "failed": 0, "graph_breaks": 0}
    assert signature in SHARED
    monkeypatch.setitem(counters["frames"], "total", counters["frames"]["total"] + 1)  # one frame given up on
    monkeypatch.setitem(counters["graph_break"], "a reason dynamo gives", 2)  # met twice
    assert lm.run_info["compile_frames"] == {"compiled": 0, "failed": 1, "graph_breaks": 2}
    warnings = []
    handler = logger.add(warnings.append, level="WARNING")
    try:
        lm.release()
    finally:
        logger.remove(handler)
    assert any("gave up on 1 frames" in str(message) for message in warnings)
    assert any("dynamo met 2 graph breaks" in str(message) for message in warnings)
    assert not any("forward" in vars(layer) for layer in layers) and not lm.compiled.active
    assert signature not in SHARED
    # a run that failed: its own error says what happened, no warning; its code is forgotten all the same
    failing = GlobalCom2LlavaNext(pretrained="tiny", method="random", retention_ratio=0.5, compile="true")
    assert failing.compiled.signature in SHARED
    monkeypatch.setitem(counters["frames"], "total", counters["frames"]["total"] + 1)
    warnings.clear()
    handler = logger.add(warnings.append, level="WARNING")
    try:
        failing.release(failed=True)
    finally:
        logger.remove(handler)
    assert not any("gave up on" in str(message) or "graph breaks" in str(message) for message in warnings)
    assert failing.compiled.signature not in SHARED and not failing.compiled.active


def test_a_constructor_that_fails_after_compiling_gives_the_compiled_layers_back(monkeypatch):
    import globalcom2.lmms.plugin as plugin_module
    from globalcom2.models import compiled

    monkeypatch.setattr(compiled.torch, "compile", lambda fn, mode, dynamic: fn)
    handles = []
    real_compile_model = plugin_module.compile_model
    monkeypatch.setattr(
        plugin_module,
        "compile_model",
        lambda model, mode: handles.append(real_compile_model(model, mode)) or handles[-1],
    )

    def no_profiler(*args, **kwargs):
        raise RuntimeError("no profiler here")

    monkeypatch.setattr("globalcom2.efficiency.profile.GenerateProfiler", no_profiler)  # imported in __init__
    live = compiled._recompile_limit_state["live"]
    with pytest.raises(RuntimeError, match="no profiler here"):
        GlobalCom2LlavaNext(pretrained="tiny", method="random", retention_ratio=0.5, compile="true")
    (handle,) = handles
    assert not handle.active and compiled._recompile_limit_state["live"] == live


@pytest.mark.slow
def test_a_later_compiled_cell_in_the_process_compiles_nothing_and_answers_as_eager(images):
    """A local sweep's cells share the Hydra process, each loading its model anew: the second cell's layers
    run the graphs the first one compiled (``globalcom2.models.compiled``), so dynamo compiles no frame in it,
    and its answers are the eager model's. Real inductor, the tiny model."""
    from globalcom2.models.compiled import compile_attempts

    docs = [{"image": images[(336, 336)]}, {"image": images[(672, 672)]}]
    kwargs = {"until": ["\n\n"], "max_new_tokens": 4}
    answers, frames = {}, []
    for run in ("eager", "first", "second"):
        lm = GlobalCom2LlavaNext(
            pretrained="tiny",
            method="globalcom2",
            retention_ratio=0.5,
            compile="false" if run == "eager" else "true",
        )
        before = compile_attempts()
        try:
            answers[run] = lm.generate_until(requests_for(lm, docs, gen_kwargs=kwargs))
        finally:
            if lm.compiled is not None:
                lm.compiled.remove()
        frames.append(compile_attempts() - before)
        del lm
    assert frames[2] == 0  # the first may compile none either, where an earlier test compiled the tiny model
    assert answers["second"] == answers["first"] == answers["eager"]


@pytest.mark.parametrize(("compile_mode", "docs_count"), [("true", 3), ("false", 3), ("true", 4)])
def test_a_compiled_model_is_also_warmed_up_on_one_row(monkeypatch, images, compile_mode, docs_count):
    """Batch size 1 is a compiled graph of its own, so where a batch of one row will run (3 documents at batch
    2) a compiled model's warm-up also runs the first batch's first row alone, and that batch is not compiled
    inside its timed call; with no such batch (4 documents) it does not compile batch 1 for nothing, and an
    eager model warms up on the first batch only. (``torch.compile`` is the identity here: which calls run is
    what is tested.)"""
    from globalcom2.models import compiled

    monkeypatch.setattr(compiled.torch, "compile", lambda fn, mode, dynamic: fn)
    lm = GlobalCom2LlavaNext(
        pretrained="tiny", method="random", retention_ratio=0.5, batch_size=2, compile=compile_mode
    )
    calls = []
    real_generate = lm.model.generate
    monkeypatch.setattr(
        lm.model,
        "generate",
        lambda **kwargs: (
            calls.append((kwargs["input_ids"].shape[0], kwargs["max_new_tokens"])) or real_generate(**kwargs)
        ),
    )
    docs = [{"image": images[(336, 336)]}] * docs_count
    try:
        lm.generate_until(requests_for(lm, docs, gen_kwargs={"until": ["\n\n"], "max_new_tokens": 4}))
    finally:
        if lm.compiled is not None:
            lm.compiled.remove()
    warm = compiled.WARMUP_NEW_TOKENS
    measured = [(2, 4), (1, 4)] if docs_count == 3 else [(2, 4), (2, 4)]
    warm_ups = [(2, warm), (1, warm)] if compile_mode == "true" and docs_count == 3 else [(2, warm)]
    assert calls == [*warm_ups, *measured]
    assert [r.first_call for r in lm.records] == [True, True] + [False] * (docs_count - 2)


def test_the_warm_up_meets_every_decode_graph_whatever_the_tasks_limit_and_stays_out_of_loop_s(
    monkeypatch, images
):
    """A task that generates 1 token would warm up only the prefill graph, leaving the decode steps' graphs to
    compile inside a later task's timed call: the warm-up always generates WARMUP_NEW_TOKENS. Its seconds are
    not part of the batch's turn of the loop (``loop_s``), whose sum is the end-to-end throughput's time."""
    import time

    from globalcom2.models import compiled

    WARM_UP_S = 4.0  # a timed tiny call takes well under a second alone; 1 s was exceeded under a parallel CI
    monkeypatch.setattr(compiled.torch, "compile", lambda fn, mode, dynamic: fn)
    lm = GlobalCom2LlavaNext(pretrained="tiny", method="random", retention_ratio=0.5, compile="true")
    calls = []
    real_generate = lm.model.generate

    def generate(**kwargs):
        calls.append(kwargs["max_new_tokens"])
        if len(calls) == 1:
            time.sleep(WARM_UP_S)  # the warm-up: longer than the whole timed call, even on a loaded machine
        return real_generate(**kwargs)

    monkeypatch.setattr(lm.model, "generate", generate)
    docs = [{"image": images[(336, 336)]}] * 2
    try:
        lm.generate_until(requests_for(lm, docs, gen_kwargs={"until": ["\n\n"], "max_new_tokens": 1}))
    finally:
        lm.compiled.remove()
    assert calls == [compiled.WARMUP_NEW_TOKENS, 1, 1]
    first = lm.records[0]
    assert first.total_s <= first.loop_s < WARM_UP_S


def test_a_timed_call_that_compiled_is_flagged_and_left_out_of_lmms_evals_throughput(monkeypatch, images):
    """The profiler's compile flag reaches the record, and lmms-eval's throughput block sums the timed calls
    only, as the samples/s beside it does (not the first call, not one that compiled)."""
    from lmms_eval.models.model_utils import gen_metrics

    from globalcom2.efficiency import profile

    lm = GlobalCom2LlavaNext(pretrained="tiny", method="random", retention_ratio=0.5, profile=True)
    reads = iter([0, 0, 0, 0, 0, 1, 1, 1])  # (start, end) per measured call: the third call compiled
    monkeypatch.setattr(profile, "compile_attempts", lambda: next(reads))
    logged = []
    monkeypatch.setattr(gen_metrics, "log_metrics", lambda *args: logged.append(args))
    docs = [{"image": images[(336, 336)]}] * 4
    lm.generate_until(requests_for(lm, docs))
    assert [r.compiled_in_call for r in lm.records] == [False, False, True, False]
    assert [r.first_call for r in lm.records] == [True, False, False, False]
    total, tokens, speed, extras = logged[-1]
    timed = [lm.records[1], lm.records[3]]
    assert total == pytest.approx(sum(r.total_s for r in timed))
    assert tokens == sum(r.output_tokens for r in timed)
    assert speed == pytest.approx(tokens / total)
    assert extras["total_requests"] == 2 and extras["answered_requests"] == 4  # avg_latency over timed calls

    logged.clear()
    untimed = GlobalCom2LlavaNext(pretrained="tiny", method="random", retention_ratio=0.5, profile=False)
    untimed.generate_until(requests_for(untimed, docs[:2]))
    assert logged == []  # no timed call: no zero speed for lmms-eval to average in


def test_a_cpu_cell_asks_accelerate_for_the_cpu(monkeypatch):
    """Under accelerate or torchrun on a machine with GPUs, a bare ``Accelerator()`` picks NCCL and
    ``cuda:<local_rank>``; a CPU cell must ask for the CPU (gloo), and a cell on no named device must not."""
    from globalcom2.lmms import plugin

    asked = []
    real = plugin.Accelerator
    monkeypatch.setattr(plugin, "Accelerator", lambda **kwargs: asked.append(kwargs) or real(**kwargs))
    GlobalCom2LlavaNext(pretrained="tiny", device="cpu", method="vanilla")
    GlobalCom2LlavaNext(pretrained="tiny", method="vanilla")
    assert asked == [{"cpu": True}, {"cpu": False}]


def test_typed_method_parameters_and_run_info(lm):
    assert lm.method.params() == {"retention_ratio": 0.25, "seed": 0}
    info = lm.run_info
    assert info["attn_implementation"] == {"text_config": "sdpa", "vision_config": "sdpa"}
    assert info["method"] == "random" and info["world_size"] == 1


def test_builds_the_vicuna_prompt_and_records_each_sample(lm, docs, monkeypatch):
    seen = []
    processor = lm.processor

    def spy(*args, **kwargs):
        seen.append(kwargs["text"])
        return processor(*args, **kwargs)

    monkeypatch.setattr(lm, "processor", spy)
    lm.reset_records()
    outputs = lm.generate_until(requests_for(lm, docs, context="How many boxes?\nAnswer briefly."))
    assert seen == [[vicuna_v1_prompt("How many boxes?\nAnswer briefly.")]] * 2  # batch size 1: two calls
    assert all(isinstance(o, GenerationResult) for o in outputs)
    first, second = lm.records
    assert (first.doc_id, second.doc_id) == (0, 1)
    assert first.visual_tokens_before > first.visual_tokens_after > 0  # random keeps 25 % of the patches
    assert first.image_sizes == [[336, 1008]] and first.num_images == 1
    assert first.compression[0].patch_tokens_kept == first.compression[0].patch_tokens_before // 4
    assert outputs[0].token_counts.input_tokens == first.llm_prompt_tokens < first.prompt_tokens


def test_a_random_init_cell_with_vicuna_text_feeds_vicuna_length_prompts(monkeypatch, images):
    """``random_init`` + ``vicuna_text`` (a shrunken 7B, the real code path): every row of a batch reaches
    the model with the recorded Vicuna count of text tokens, which the records carry; a question without a
    recorded count fails loudly; and the option is refused for a model with its own tokenizer."""
    from helpers import shrink_random_init_7b

    from globalcom2.protocol.vicuna_length import (
        EFFICIENCY_POST_PROMPT,
        POST_PROMPT_TOKENS,
        VICUNA_TEXT_TOKENS,
    )

    shrink_random_init_7b(monkeypatch)
    lm = GlobalCom2LlavaNext(
        pretrained="llava-hf/llava-v1.6-vicuna-7b-hf",
        random_init=True,
        vicuna_text=True,
        device="cpu",
        dtype="float32",
        method="globalcom2",
        retention_ratio=0.25,
        batch_size=2,
    )
    assert lm.run_info["vicuna_text"].startswith("LLaMA-2 SentencePiece")
    fed = []
    real_generate = lm.model.generate
    monkeypatch.setattr(
        lm.model, "generate", lambda **kwargs: fed.append(kwargs["attention_mask"]) or real_generate(**kwargs)
    )
    docs = [{"image": images[(672, 672)]}, {"image": images[(800, 600)]}]
    question = "What color is the square?"
    lm.generate_until(
        requests_for(lm, docs, context=question + EFFICIENCY_POST_PROMPT)
    )  # as lmms-eval sends it
    expected = VICUNA_TEXT_TOKENS[question] + POST_PROMPT_TOKENS
    assert [r.text_tokens for r in lm.records] == [expected] * 2
    unpadded = fed[-1].sum(1).tolist()  # [2] the rows the model got, in the batch's (length-grouped) order
    assert sorted(unpadded) == sorted(r.prompt_tokens for r in lm.records)
    assert [r.prompt_tokens - r.visual_tokens_before for r in lm.records] == [59, 59]
    with pytest.raises(ValueError, match="no recorded Vicuna token count for the prompt"):
        lm.generate_until(requests_for(lm, docs[:1], context="Why?"))
    with pytest.raises(ValueError, match="vicuna_text=true needs random_init=true"):
        GlobalCom2LlavaNext(pretrained="tiny", vicuna_text=True)


def fake_generate(lm, continuation_ids):
    """A stand-in for model.generate: encodes the images (so the method records its stats, as in a real
    call) and returns the prompt followed by ``continuation_ids``."""

    def generate(input_ids, pixel_values, image_sizes, **kwargs):
        lm.model.model.get_image_features(pixel_values, image_sizes)
        tail = torch.tensor([continuation_ids] * input_ids.shape[0], dtype=input_ids.dtype)
        return torch.cat([input_ids, tail], dim=1)

    return generate


def test_until_cuts_the_answer_at_the_first_stop_string(lm, docs, monkeypatch):
    tokens = lm.tokenizer.encode("yes.\n\nASSISTANT: more", add_special_tokens=False)
    monkeypatch.setattr(lm.model, "generate", fake_generate(lm, tokens))
    lm.reset_records()
    gen = {"until": ["ASSISTANT:", "\n\n"], "max_new_tokens": len(tokens)}
    outputs = lm.generate_until(requests_for(lm, docs[:1], gen_kwargs=gen))
    assert outputs[0].text == "yes."
    assert lm.records[0].stop_reason == "stop_string"


def test_an_empty_answer_is_counted_and_reported(lm, docs, monkeypatch):
    from loguru import logger

    eos = lm.model.generation_config.eos_token_id
    monkeypatch.setattr(lm.model, "generate", fake_generate(lm, [eos, eos]))
    messages = []
    sink = logger.add(messages.append, level="WARNING")
    try:
        lm.reset_records()
        outputs = lm.generate_until(requests_for(lm, docs))
    finally:
        logger.remove(sink)
    assert [o.text for o in outputs] == ["", ""]
    assert [r.empty_answer for r in lm.records] == [True, True]
    assert [r.stop_reason for r in lm.records] == ["eos", "eos"]
    assert lm.records_summary()["empty_answers"] == 2
    assert any("2 of 2 answers" in str(m) and "empty" in str(m) for m in messages)


def test_a_generation_error_propagates_with_context(lm, docs, monkeypatch):
    def broken(**kwargs):
        raise RuntimeError("CUDA error: device-side assert triggered")

    monkeypatch.setattr(lm.model, "generate", broken)
    with pytest.raises(RuntimeError, match=r"generation failed for toy#0.*device-side assert"):
        lm.generate_until(requests_for(lm, docs))


def test_a_document_that_fails_to_load_is_named(lm, docs):
    def broken_visual(doc):
        raise OSError("broken image")

    requests = requests_for(lm, docs)
    requests[1].arguments = (*requests[1].args[:2], broken_visual, *requests[1].args[3:])
    with pytest.raises(RuntimeError, match=r"loading failed for toy#1: OSError: broken image"):
        lm.generate_until(requests)  # the one that fails, not every document of its batch


def test_an_input_that_fails_to_encode_is_named(lm, docs, monkeypatch):
    def broken(processor, batch):
        raise ValueError("image too small")

    monkeypatch.setattr(lm, "_encode", broken)
    with pytest.raises(ValueError, match="image too small") as raised:
        lm.generate_until(requests_for(lm, docs))
    assert any(
        note.startswith("while preparing the model inputs of toy#0") for note in raised.value.__notes__
    )


def test_records_are_not_gathered_from_one_process_of_several(lm, monkeypatch):
    monkeypatch.setattr(lm, "_world_size", 2)
    with pytest.raises(RuntimeError, match=r"2 processes but no torch\.distributed process group"):
        lm.gather_records()


def test_unknown_generation_kwargs_are_refused(lm, docs):
    with pytest.raises(ValueError, match="task 'toy': unsupported generation_kwargs"):
        lm.generate_until(requests_for(lm, docs, gen_kwargs={"until": ["\n"], "beam_width": 2}))


def test_padding_requests_are_not_generated_or_recorded(lm, docs):
    requests = requests_for(lm, docs)
    requests[1].metadata["__padding_only__"] = True
    lm.reset_records()
    outputs = lm.generate_until(requests)
    assert outputs[1].text == "" and [r.doc_id for r in lm.records] == [0]


def test_a_batch_may_mix_rows_with_and_without_images(lm, docs, monkeypatch):
    monkeypatch.setattr(lm, "batch_size_per_device", 3)
    lm.task_dict = {"toy": {"test": [docs[0], {"image": None}, docs[1]]}}
    requests = [
        Instance(
            request_type="generate_until",
            arguments=(
                "Describe.",
                {"until": ["\n\n"], "max_new_tokens": 2},
                lambda d: [d["image"]] if d["image"] else [],
                i,
                "toy",
                "test",
            ),
            idx=0,
            metadata={"task": "toy", "doc_id": i, "repeats": 1, "split": "test"},
        )
        for i in range(3)
    ]
    lm.reset_records()
    lm.generate_until(requests)
    assert [r.num_images for r in lm.records] == [1, 0, 1]
    assert [r.batch_size for r in lm.records] == [3, 3, 3]
    assert lm.records[1].visual_tokens_before == 0 and lm.records[1].compression == []
    assert lm.records[2].image_sizes == [[1008, 336]]


def test_model_args_keys_are_the_plugins_options_and_a_spec_is_taken_as_it_is(lm):
    """The front door knows every plugin key (the rest are method parameters), and a plugin built from a
    spec attaches that spec's method instance, checking nothing again."""
    from dataclasses import fields

    from globalcom2.run_spec import MODEL_ARG_KEYS, RunOptions, RunSpec

    assert {f.name for f in fields(RunOptions)} <= MODEL_ARG_KEYS
    assert {"pretrained", "method", "retention_ratio", "device", "compile"} <= MODEL_ARG_KEYS
    spec = RunSpec.from_model_args(
        {"pretrained": "tiny", "method": "random", "retention_ratio": 0.5, "seed": 3}
    )
    assert spec.method.params == {"seed": 3} and spec.method.built.params() == {
        "retention_ratio": 0.5,
        "seed": 3,
    }
    built = GlobalCom2LlavaNext(spec)
    assert built.method is spec.method.built and built.attachment.method is spec.method.built
    with pytest.raises(TypeError, match="a RunSpec or model_args, not both"):
        GlobalCom2LlavaNext(spec, batch_size=2)


def test_grouped_and_prefetched_batches_answer_as_one_by_one(lm, images, monkeypatch):
    """Batches of three, grouped by length and prepared in the background, give every request the answer and
    the record it gets alone and in turn (fp32): same tokens, same visual-token counts, lmms-eval's order."""
    sizes = [(336, 1008), (336, 336), (800, 600), (336, 336), (1008, 336), (672, 672), (336, 1008)]
    docs = [{"image": images[size]} for size in sizes]
    gen = {"until": ["\n\n"], "max_new_tokens": 3}

    def answer(batch_size: int, prefetch: bool) -> tuple[list[str], list]:
        monkeypatch.setattr(lm, "batch_size_per_device", batch_size)
        monkeypatch.setattr(lm, "prefetch", prefetch)
        lm.reset_records()
        outputs = lm.generate_until(requests_for(lm, docs, gen_kwargs=gen))
        return [o.text for o in outputs], list(lm.records)

    assert lm.prefetch is False and lm.run_info["prefetch"] is False  # auto: off when the model runs on a CPU
    alone, alone_records = answer(1, prefetch=False)
    batched, batched_records = answer(3, prefetch=True)
    assert batched == alone
    assert [r.doc_id for r in batched_records] == list(range(len(docs)))
    for one, many in zip(alone_records, batched_records, strict=True):
        assert many.output_token_ids == one.output_token_ids
        assert (many.prompt_tokens, many.visual_tokens_after) == (one.prompt_tokens, one.visual_tokens_after)
        assert many.batch_size == 3 or many.batch_size == len(docs) % 3
        assert None not in (many.load_s, many.wait_s, many.postprocess_s, many.loop_s)
    # the two (336, 336) images share a batch: grouping by length put them together
    square = {r.batch_id for r in batched_records if r.image_sizes == [[336, 336]]}
    assert len(square) == 1


def test_several_prefetch_threads_answer_as_one_by_one_each_with_its_own_processor(lm, images, monkeypatch):
    """Three encoding threads (``prefetch_threads=3``) give the answers and records of batches prepared in turn;
    two of them encode at once (the first two encodes wait for each other), each with a processor of its own,
    copied by the main thread before the batches start and never the main thread's own (a fast tokenizer
    refuses two threads at once)."""
    sizes = [(336, 1008), (336, 336), (800, 600), (336, 336), (1008, 336), (672, 672), (336, 1008)]
    docs = [{"image": images[size]} for size in sizes]
    gen = {"until": ["\n\n"], "max_new_tokens": 3}
    encode, used, side_by_side = lm._encode, [], threading.Barrier(2, timeout=60)

    def watched_encode(processor, batch):
        used.append((threading.current_thread().name, id(processor)))
        if lm.prefetch and len(used) <= 2:
            side_by_side.wait()  # passes only when a second thread encodes while the first does
        return encode(processor, batch)

    copied_by = []
    deepcopy = copy.deepcopy

    def watched_deepcopy(value, *args):
        if value is lm.processor:
            copied_by.append(threading.current_thread().name)
        return deepcopy(value, *args)

    monkeypatch.setattr(lm, "_encode", watched_encode)
    monkeypatch.setattr(copy, "deepcopy", watched_deepcopy)

    def answer(prefetch: bool, threads: int) -> list[tuple]:
        monkeypatch.setattr(lm, "prefetch", prefetch)
        monkeypatch.setattr(lm, "prefetch_threads", threads)
        lm.reset_records()
        outputs = lm.generate_until(requests_for(lm, docs, gen_kwargs=gen))
        return [
            (o.text, r.output_token_ids, r.visual_tokens_after)
            for o, r in zip(outputs, lm.records, strict=True)
        ]

    alone = answer(prefetch=False, threads=0)
    assert {processor for _, processor in used} == {id(lm.processor)}  # in turn: the main thread's own
    assert copied_by == []
    used.clear()
    assert answer(prefetch=True, threads=3) == alone
    assert copied_by == [threading.main_thread().name] * 3  # one per encoding thread, before any batch
    threads_of: dict[int, set[str]] = {}
    for thread, processor in used:
        threads_of.setdefault(processor, set()).add(thread)
    assert all(len(names) == 1 for names in threads_of.values())  # no processor shared by two threads
    assert id(lm.processor) not in threads_of
    assert 2 <= len({thread for thread, _ in used}) <= 3
    assert all(thread.startswith(ENCODER_THREADS) for thread, _ in used)
    monkeypatch.setattr(lm, "prefetch_threads", 3)
    assert lm._feeder(requests_for(lm, docs)).threads == 3  # the count reaches the feeder


def test_prefetch_threads_are_resolved_and_recorded():
    """``prefetch_threads`` reaches the run record: as given, or auto (a quarter of the cores, 1 to 4) while
    prefetching, and 0 when each batch is prepared in turn (auto prefetch on a CPU), where a count that was
    asked for is named as unused."""
    given = GlobalCom2LlavaNext(pretrained="tiny", prefetch="true", prefetch_threads=3, profile=False)
    assert given.run_info["prefetch"] is True and given.run_info["prefetch_threads"] == 3
    auto = GlobalCom2LlavaNext(pretrained="tiny", prefetch="true", prefetch_threads="auto", profile=False)
    assert auto.run_info["prefetch_threads"] == default_prefetch_threads()
    assert 1 <= default_prefetch_threads() <= MAX_AUTO_PREFETCH_THREADS
    serial = GlobalCom2LlavaNext(pretrained="tiny", profile=False)
    assert serial.run_info["prefetch"] is False and serial.run_info["prefetch_threads"] == 0
    messages = []
    handler = logger.add(messages.append, level="WARNING")
    try:
        unused = GlobalCom2LlavaNext(pretrained="tiny", prefetch_threads=2, profile=False)
    finally:
        logger.remove(handler)
    assert unused.run_info["prefetch_threads"] == 0
    assert any("prefetch_threads=2 is not used: prefetch=auto is off on cpu" in m for m in messages)


def test_auto_prefetch_threads_share_the_node_with_the_other_processes(monkeypatch):
    """A quarter of the cores, 1 to 4; a process free to use the whole node shares it with the launch's other
    processes there, one bound to a subset of the cores has its share already."""
    from globalcom2 import run_spec

    def auto(node: int, mine: int, local_world_size: str | None) -> int:
        monkeypatch.setattr(run_spec.os, "cpu_count", lambda: node)
        monkeypatch.setattr(run_spec.os, "sched_getaffinity", lambda pid: set(range(mine)), raising=False)
        if local_world_size is None:
            monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
        else:
            monkeypatch.setenv("LOCAL_WORLD_SIZE", local_world_size)
        return run_spec.default_prefetch_threads()

    assert [auto(2, 2, None), auto(8, 8, None), auto(16, 16, None), auto(64, 64, None)] == [1, 2, 4, 4]
    assert auto(64, 64, "8") == 2 and auto(16, 16, "8") == 1  # eight ranks share the node
    assert auto(64, 16, "8") == 4  # a rank bound to 16 of the 64 cores
    assert auto(16, 16, "eight") == 4  # an unreadable count: this process alone


def test_batch_invariant_runs_every_generate_under_the_mode_and_restores_the_switch(images, monkeypatch):
    """``batch_invariant=true``: every ``generate`` runs inside the mode with transformers' GQA switch set, the
    switch is gone after ``generate_until`` (a later plain cell of the process stays plain), and prefetched
    batches of three answer as one by one in bf16."""
    lm = GlobalCom2LlavaNext(
        pretrained="tiny", method="globalcom2", retention_ratio=0.25, profile=False, dtype="bfloat16",
        batch_invariant=True,
    )  # fmt: skip
    assert lm.run_info["batch_invariant"] is True
    generate, inside = lm.model.generate, []

    def watched_generate(**kwargs):
        inside.append((torch._C._is_torch_function_mode_enabled(), os.environ.get(FORCE_GQA_VARIABLE)))
        return generate(**kwargs)

    monkeypatch.setattr(lm.model, "generate", watched_generate)
    monkeypatch.delenv(FORCE_GQA_VARIABLE, raising=False)
    docs = [{"image": images[size]} for size in [(336, 1008), (800, 600), (336, 336), (1008, 336)]]
    gen = {"until": ["\n\n"], "max_new_tokens": 3}

    def answer(batch_size: int, prefetch: bool) -> list[list[int]]:
        monkeypatch.setattr(lm, "batch_size_per_device", batch_size)
        monkeypatch.setattr(lm, "prefetch", prefetch)
        lm.reset_records()
        lm.generate_until(requests_for(lm, docs, gen_kwargs=gen))
        assert FORCE_GQA_VARIABLE not in os.environ
        return [record.output_token_ids for record in lm.records]

    assert answer(3, prefetch=True) == answer(1, prefetch=False)
    assert len(inside) == 2 + 4 and set(inside) == {(True, "1")}


def test_beam_search_with_an_in_llm_method_records_one_stats_entry_per_sample(images):
    """generate prefills each row once per beam, and the in-LLM method records every copy; the records
    count each sample once (this raised "expected one per-row stats entry per batch row (2), got 4")."""
    lm = GlobalCom2LlavaNext(pretrained="tiny", method="fastv", retention_ratio=0.25, batch_size=2)
    docs = [{"image": images[(336, 336)]}, {"image": images[(800, 600)]}]
    lm.generate_until(requests_for(lm, docs, gen_kwargs={"max_new_tokens": 2, "num_beams": 2}))
    assert len(lm.records) == 2
    for record in lm.records:
        assert record.visual_tokens_after < record.visual_tokens_before
    assert lm.records[0].visual_tokens_before != lm.records[1].visual_tokens_before  # each its own image
