"""Compile mode (``globalcom2.models.compiled``): the same answers as eager, hooks kept outside, loud refusals."""

from __future__ import annotations

import types

import pytest
import torch
from helpers import dynamo_eager_backend, generate_steps, prompt_inputs
from transformers.utils import output_capturing

from globalcom2 import attach
from globalcom2.models import compiled, output_collector
from globalcom2.models.compiled import compile_model, compile_problem, resolve_compile
from globalcom2.models.layer_code import SHARED

STEPS = 4


@pytest.fixture(scope="module")
def prompts(tiny, images):
    processor = tiny[1]
    return [
        prompt_inputs(processor, images[(672, 672)], "What is in the image?"),
        prompt_inputs(processor, images[(800, 600)], "Which colour is on the left side of it?"),
    ]


@pytest.mark.slow
@pytest.mark.parametrize(
    ("method", "params"),
    [
        ("vanilla", {}),
        ("globalcom2", {"retention_ratio": 0.25}),
        ("fastv", {"retention_ratio": 0.25}),
        ("sparsevlm", {"retention_ratio": 0.25}),  # prunes the KV cache per layer: decode sees ragged caches
    ],
)
def test_compiled_prefill_equals_eager(model, prompts, method, params):
    """Greedy answers identical, per-step logits within float reassociation, on prompts of two lengths."""
    with attach(model, method, **params):
        eager = [generate_steps(model, inputs, STEPS) for inputs in prompts]
        with compile_model(model) as handle:
            assert handle.mode == "default"
            compiled_runs = [generate_steps(model, inputs, STEPS) for inputs in prompts]
    for (tokens, logits), (compiled_tokens, compiled_logits) in zip(eager, compiled_runs, strict=True):
        assert torch.equal(tokens, compiled_tokens)
        torch.testing.assert_close(compiled_logits, logits, atol=1e-4, rtol=1e-4)


@pytest.mark.slow
def test_a_warmup_of_warmup_new_tokens_compiles_every_graph_a_timed_call_meets(model, prompts):
    """Under inductor the first decode step's cache (the prefill's strided keys) and a later step's (grown by
    ``torch.cat``, contiguous) compile to different graphs: a warm-up of fewer tokens would leave one of them
    to compile inside the first timed call (seen as a 1.3 samples/s row among 10s on CPU)."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    with compile_model(model), torch.inference_mode():
        generate_steps(model, prompts[0], compiled.WARMUP_NEW_TOKENS)
        graphs = counters["stats"]["unique_graphs"]
        generate_steps(model, prompts[1], compiled.WARMUP_NEW_TOKENS + 3)
    assert graphs > 0 and counters["stats"]["unique_graphs"] == graphs
    torch._dynamo.reset()


@pytest.mark.slow
def test_remove_restores_the_eager_forwards_and_hooked_layers_stay_eager(model, prompts):
    layers = [*model.model.vision_tower.encoder.layers, *model.model.language_model.layers]
    with attach(model, "globalcom2", retention_ratio=0.5) as globalcom2, torch.inference_mode():
        model(**prompts[0])
        eager_stats, eager_scores_layer = globalcom2.stats[-1], model.model.vision_tower.encoder.layers[-1]
    with compile_model(model) as handle:
        assert all("forward" in vars(layer) for layer in layers)
        with pytest.raises(ValueError, match="already compiled"):
            compile_model(model)
        with attach(model, "globalcom2", retention_ratio=0.5) as globalcom2, torch.inference_mode():
            # the [CLS] capture hooks the last CLIP layer's projections: that layer runs eager, so the capture
            # sees every view and the selection is the eager one
            assert compiled._has_hooks(
                [m for m in eager_scores_layer.modules() if m is not eager_scores_layer]
            )
            model(**prompts[0])
            assert globalcom2.stats[-1] == eager_stats
    assert handle.active is False
    assert not any("forward" in vars(layer) for layer in layers)


def test_compile_settings_are_checked_with_the_valid_choices(monkeypatch):
    assert resolve_compile(False) is None and resolve_compile(None) is None
    assert resolve_compile(True) == "default"  # on every device: the module docstring says why
    assert resolve_compile("max-autotune") == "max-autotune"
    with pytest.raises(ValueError, match="compile must be true, false or one of default, reduce-overhead"):
        resolve_compile("fast")
    assert "CUDA graphs, which need a CUDA device" in compile_problem("cpu", "reduce-overhead")
    assert compile_problem("cpu", "default") is None
    monkeypatch.setattr(compiled.shutil, "which", lambda name: None)
    assert "needs a C++ compiler" in compile_problem("cpu", "default")


@pytest.mark.parametrize("mode", ["default", "max-autotune-no-cudagraphs", "reduce-overhead", "max-autotune"])
def test_an_evaluation_on_cuda_refuses_the_cuda_graph_modes(monkeypatch, mode):
    """Under CUDA graphs each new prompt length records inside the call that meets it, unflagged: a cell's or
    the plugin's latencies would time recordings. They are refused there (``make bench-efficiency`` warms
    every prompt first and times them). Here CUDA with Triton is faked: only the mode decides."""
    import globalcom2.run_spec as run_spec

    monkeypatch.setattr(run_spec, "compile_problem", lambda device, mode: None)
    monkeypatch.setattr(run_spec, "default_device", lambda: "cuda")
    spec = run_spec.RunSpec.from_model_args({"pretrained": "tiny", "method": "vanilla", "compile": mode})
    problems = [str(p) for p in run_spec.run_problems(spec)]
    if mode in compiled.CUDA_GRAPH_MODES:
        assert len(problems) == 1 and f"compile={mode}: its CUDA graphs are recorded" in problems[0]
        assert "compile=default" in problems[0] and "make bench-efficiency" in problems[0]
    else:
        assert problems == []


def test_cuda_without_a_c_compiler_for_triton_is_refused(monkeypatch):
    monkeypatch.setattr(compiled.importlib.util, "find_spec", lambda name: object())  # Triton "installed"
    monkeypatch.delenv("CC", raising=False)
    monkeypatch.setattr(compiled.shutil, "which", lambda name: None)
    assert "needs a C compiler for Triton's launchers (gcc or clang)" in compiled.compile_problem(
        "cuda", "default"
    )
    monkeypatch.setattr(compiled.shutil, "which", lambda name: "/usr/bin/cc" if name == "cc" else None)
    assert compiled.compile_problem("cuda", "default") is not None  # Triton never tries plain cc
    monkeypatch.setattr(compiled.shutil, "which", lambda name: "/usr/bin/gcc" if name == "gcc" else None)
    assert compiled.compile_problem("cuda", "default") is None
    monkeypatch.setenv("CC", "my-cc")  # Triton then uses $CC alone
    assert "(my-cc)" in compiled.compile_problem("cuda", "default")


def test_a_missing_backend_is_refused_before_anything_is_compiled(model, monkeypatch):
    monkeypatch.setattr(compiled.shutil, "which", lambda name: None)
    with pytest.raises(RuntimeError, match=r"torch.compile on CPU needs a C\+\+ compiler"):
        compile_model(model)
    assert not any("forward" in vars(layer) for layer in model.model.language_model.layers)
    with pytest.raises(RuntimeError, match="CUDA graphs"):
        compile_model(model, "reduce-overhead")


def test_a_compile_that_fails_half_way_leaves_the_model_and_dynamo_as_they_were(model, monkeypatch):
    """No handle comes back to undo a half-compiled model, so compile_model undoes it itself: every forward
    it set is gone, the recompile limits are dynamo's again, and a second try is not "already compiled"."""
    limits = {name: getattr(torch._dynamo.config, name) for name in compiled.RECOMPILE_LIMITS}
    live = compiled._recompile_limit_state["live"]
    held = output_collector._holders["count"]
    real, calls = compiled._compiled_forward, []

    def failing_third(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("wrapping failed")
        return real(*args, **kwargs)

    monkeypatch.setattr(compiled, "compile_problem", lambda device, mode: None)
    monkeypatch.setattr(compiled, "_compiled_forward", failing_third)
    with pytest.raises(RuntimeError, match="wrapping failed"):
        compile_model(model)
    layers = [*model.model.vision_tower.encoder.layers, *model.model.language_model.layers]
    assert not any("forward" in vars(layer) for layer in layers)
    assert {name: getattr(torch._dynamo.config, name) for name in compiled.RECOMPILE_LIMITS} == limits
    assert compiled._recompile_limit_state["live"] == live
    assert output_collector._holders["count"] == held  # let go of on the way out
    monkeypatch.setattr(compiled, "_compiled_forward", real)
    handle = compile_model(model)  # wraps lazily: nothing compiles until a forward
    assert isinstance(output_capturing._active_collector, output_collector.TraceableCollector)
    assert output_collector._holders["count"] == held + 1
    handle.remove()
    handle.remove()  # a second removal lets go of nothing more
    assert not any("forward" in vars(layer) for layer in layers)
    assert output_collector._holders["count"] == held
    if held == 0:  # no other compiled model alive: the collector's own class is back
        assert type(output_capturing._active_collector) is output_collector._BASE
        with pytest.raises(RuntimeError, match="no compiled model holds"):
            output_collector.let_go()


def deep_tiny_model(decoder_layers: int):
    """The tiny model's recipe with more decoder layers than dynamo's default recompile limit (8)."""
    from transformers import LlavaNextForConditionalGeneration

    from globalcom2.models.tiny import INITIALIZER_RANGE, TEXT, VISION, byte_level_tokenizer, llava_v16_config

    text = {**TEXT, "num_hidden_layers": decoder_layers}
    config = llava_v16_config(byte_level_tokenizer(), VISION, text, INITIALIZER_RANGE)
    return LlavaNextForConditionalGeneration(config).eval()


def dynamo_code(layer: torch.nn.Module) -> types.CodeType:
    """The code object whose frames dynamo compiles for ``layer`` (:func:`compile_model`'s private copy)."""
    (compiled_fn,) = (
        cell.cell_contents
        for cell in layer.forward.__closure__
        if hasattr(cell.cell_contents, "_torchdynamo_orig_callable")
    )
    return compiled_fn._torchdynamo_orig_callable.__func__.__code__


def test_every_decoder_layer_of_a_deep_model_runs_compiled(prompts, monkeypatch):
    """Each decoder layer compiles to its own graphs (dynamo guards on its KV-cache slot): the prefill, the
    first decode step and the later ones (another cache layout). Past dynamo's default recompile limit of 8
    the rest would silently run eager, so a 7B (32 layers, 96 graphs) would be measured mostly uncompiled. A
    fourth step compiles nothing: a longer KV cache is a dynamic size. The eager backend keeps this fast: what
    is counted is dynamo's frames, not kernels."""
    from torch._dynamo.eval_frame import _debug_get_cache_entry_list
    from torch._dynamo.utils import counters

    model = deep_tiny_model(decoder_layers=12)
    dynamo_eager_backend(monkeypatch)
    limits = {name: getattr(torch._dynamo.config, name) for name in compiled.RECOMPILE_LIMITS}
    torch._dynamo.reset()
    counters.clear()
    with compile_model(model), torch.inference_mode():
        vision_layers = len(model.model.vision_tower.encoder.layers)
        assert torch._dynamo.config.recompile_limit == compiled.recompile_limit_for(vision_layers, 12, True)
        assert torch._dynamo.config.recompile_limit >= vision_layers + 6 * 12
        generate_steps(model, prompts[0], compiled.WARMUP_NEW_TOKENS)
        graphs = counters["stats"]["unique_graphs"]
        generate_steps(model, prompts[1], compiled.WARMUP_NEW_TOKENS + 2)  # another length, more steps
        # Each layer's graphs sit on its own copy of the code: none on the wrapper that transformers gives every
        # layer's forward, whose one list dynamo would scan at every call of every layer.
        shared = type(model.model.language_model.layers[0]).forward.__code__
        assert shared is type(model.model.vision_tower.encoder.layers[0]).forward.__code__
        assert _debug_get_cache_entry_list(shared) == []
        own = [dynamo_code(layer) for layer in model.model.language_model.layers]
        assert len(set(own)) == 12 and all(1 <= len(_debug_get_cache_entry_list(c)) <= 6 for c in own)
    assert counters["frames"]["ok"] == counters["frames"]["total"]  # no frame fell back to eager
    assert graphs >= 2 * 12  # each decoder layer's prefill and decode-step graphs
    assert counters["stats"]["unique_graphs"] == graphs  # the warm-up's length compiled them all
    assert {
        name: getattr(torch._dynamo.config, name) for name in limits
    } == limits  # restored with the handle
    torch._dynamo.reset()


def test_a_13b_raises_both_recompile_limits_past_dynamos_defaults():
    """A 13B (24 vision and 40 decoder layers) can need 272 graphs of the layers' shared code object: past
    dynamo's accumulated limit of 256 per code object, which would run the last layers eager without a
    word. Both limits are raised while a handle lives, and restored with the last one."""
    config = torch._dynamo.config
    before = {name: getattr(config, name) for name in compiled.RECOMPILE_LIMITS}
    needed = compiled.recompile_limit_for(24, 40, True)
    assert needed > 256
    compiled._raise_recompile_limit(needed)
    compiled._raise_recompile_limit(10)  # a second, smaller model lowers nothing
    try:
        assert all(getattr(config, name) >= needed for name in compiled.RECOMPILE_LIMITS)
    finally:
        compiled._release_recompile_limit()
        assert all(getattr(config, name) >= needed for name in compiled.RECOMPILE_LIMITS)
        compiled._release_recompile_limit()
    assert {name: getattr(config, name) for name in compiled.RECOMPILE_LIMITS} == before


def test_decode_steps_run_compiled_except_under_cuda_graphs(model, prompts, monkeypatch):
    """A decode step reaches the compiled decoder layers in ``default`` mode, and the eager ones under a
    CUDA-graph mode on a CUDA device (one new graph per KV length there; the module docstring says why; the
    CPU stands in for it here). ``max-autotune`` on the CPU replays no graph, so it compiles decode steps.
    The vision layers are compiled in every case."""
    calls: list[tuple[str, int]] = []

    def recording_compile(fn, mode, dynamic):
        def run(*args, **kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            calls.append((type(fn.__self__).__name__, hidden.shape[1]))
            return fn(*args, **kwargs)

        return run

    monkeypatch.setattr(compiled, "compile_problem", lambda device, mode: None)
    monkeypatch.setattr(compiled.torch, "compile", recording_compile)
    monkeypatch.setattr(compiled.torch.compiler, "cudagraph_mark_step_begin", lambda: None)
    replays_on_cuda = compiled._replays_cuda_graphs
    decoder = type(model.model.language_model.layers[0]).__name__
    for mode, as_cuda, decode_compiled in (
        ("default", True, True),
        ("reduce-overhead", True, False),
        ("max-autotune", False, True),
    ):
        replays = (lambda device, mode: mode in compiled.CUDA_GRAPH_MODES) if as_cuda else replays_on_cuda
        monkeypatch.setattr(compiled, "_replays_cuda_graphs", replays)
        calls.clear()
        with compile_model(model, mode), torch.inference_mode():
            generate_steps(model, prompts[0], 3)
        decode_calls = [name for name, length in calls if name == decoder and length == 1]
        assert len(decode_calls) == (2 * len(model.model.language_model.layers) if decode_compiled else 0), (
            mode
        )
        assert any(
            name != decoder for name, _ in calls
        )  # the vision layers, beside transformers' capture hooks


def test_cuda_graph_modes_mark_a_new_step_at_each_forward(model, prompts, monkeypatch):
    """Under a CUDA-graph mode every top-level forward starts a new CUDA-graph step, so a prefill's layers
    share one generation (pytorch/pytorch#152887); the mark is removed with the handle. CPU stands in for
    CUDA here: the hook's placement and lifetime are what is checked, and the GPU test checks its effect."""
    marks = []
    monkeypatch.setattr(compiled, "compile_problem", lambda device, mode: None)
    monkeypatch.setattr(compiled, "_replays_cuda_graphs", lambda device, mode: mode == "reduce-overhead")
    monkeypatch.setattr(compiled.torch, "compile", lambda fn, mode, dynamic: fn)
    monkeypatch.setattr(compiled.torch.compiler, "cudagraph_mark_step_begin", lambda: marks.append(1))
    with compile_model(model, "reduce-overhead"), torch.inference_mode():
        generate_steps(model, prompts[0], 3)
    assert len(marks) == 3  # the prefill and two decode steps
    generate_steps(model, prompts[0], 2)
    assert len(marks) == 3 and not model._forward_pre_hooks
    with compile_model(model, "default"):
        generate_steps(model, prompts[0], 2)
    assert len(marks) == 3


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["default", "reduce-overhead"])
def test_compiled_prefill_equals_eager_on_cuda(mode, images):
    """float32: greedy tokens identical and logits within reassociation; bfloat16: logits within bf16 rounding
    (the random tiny model's logits are nearly flat, so a bf16 near-tie may flip a greedy token). No graph
    break on CUDA either: each compiled layer, and GlobalCom²'s selection, is whole graphs."""
    from torch._dynamo.utils import counters

    from globalcom2.models.loader import load_tiny_llava_next

    counters.clear()
    for dtype, tolerance in ((torch.float32, 1e-3), (torch.bfloat16, 0.1)):
        model, processor = load_tiny_llava_next(seed=0, device="cuda", dtype=dtype)
        inputs = prompt_inputs(processor, images[(672, 672)]).to("cuda")
        inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
        with attach(model, "globalcom2", retention_ratio=0.25):
            tokens, logits = generate_steps(model, inputs, STEPS)
            with compile_model(model, mode):
                for _ in range(3):  # under CUDA graphs: warm-up, record, replay
                    compiled_tokens, compiled_logits = generate_steps(model, inputs, STEPS)
        if dtype == torch.float32:
            assert torch.equal(tokens, compiled_tokens)
        torch.testing.assert_close(compiled_logits.float(), logits.float(), atol=tolerance, rtol=tolerance)
    assert dict(counters["graph_break"]) == {} and counters["frames"]["ok"] > 0


@pytest.fixture
def fresh_dynamo():
    """No graphs, no shared code before or after the test: an eager-backend graph left on the shared code
    would only count against the recompile limits of later tests, but nothing should be left."""
    torch._dynamo.reset()
    SHARED.clear()
    yield
    torch._dynamo.reset()
    SHARED.clear()


def layer_codes(model) -> tuple[list[types.CodeType], list[types.CodeType]]:
    """The code objects a compiled model's vision and decoder layers run (:func:`dynamo_code`). Compare them
    by identity (:func:`ids`): dynamo keeps graphs on the object, and two copies of one code are equal."""
    inner = model.model
    return (
        [dynamo_code(layer) for layer in inner.vision_tower.encoder.layers],
        [dynamo_code(layer) for layer in inner.language_model.layers],
    )


def ids(codes: list[types.CodeType]) -> list[int]:
    return [id(code) for code in codes]


def graphs_on(codes: list[types.CodeType]) -> list[int]:
    """How many graphs dynamo keeps on each code object."""
    from torch._dynamo.eval_frame import _debug_get_cache_entry_list

    return [len(_debug_get_cache_entry_list(code)) for code in codes]


def test_a_later_model_of_the_same_signature_runs_the_graphs_compiled_for_an_earlier_one(
    prompts, monkeypatch, fresh_dynamo
):
    """A sweep's next cell loads its model anew. Its layers run the code objects the first model's ran, so
    dynamo finds their graphs and compiles no frame, and each model still computes with its own weights (the
    graphs take them as inputs). The vision layers share one code object; each decoder layer has its own.
    Every frame compiled (none fell back to eager), and the second model's layers ran graphs (each code
    object holds some, as many as after the first model)."""
    from torch._dynamo.utils import counters

    dynamo_eager_backend(monkeypatch)
    runs = []
    for seed in (1, 2):
        torch.manual_seed(seed)  # other weights, the same config
        model = deep_tiny_model(decoder_layers=2)
        with torch.inference_mode():
            eager = generate_steps(model, prompts[0], compiled.WARMUP_NEW_TOKENS)
        before = counters["frames"]["total"]
        with compile_model(model) as handle, torch.inference_mode():
            assert handle.signature is not None
            compiled_run = generate_steps(model, prompts[0], compiled.WARMUP_NEW_TOKENS)
            codes = layer_codes(model)
            graphs = [graphs_on(part) for part in codes]
        runs.append((eager, compiled_run, counters["frames"]["total"] - before, codes, graphs))
    (first_eager, _, first_frames, first_codes, first_graphs) = runs[0]
    (second_eager, _, second_frames, second_codes, second_graphs) = runs[1]
    assert first_frames > 0 and second_frames == 0 and compiled.failed_frames() == 0
    assert [ids(codes) for codes in first_codes] == [ids(codes) for codes in second_codes]
    assert second_graphs == first_graphs and all(count >= 1 for part in second_graphs for count in part)
    vision, decoder = first_codes
    assert len(set(ids(vision))) == 1 and len(set(ids(decoder))) == len(decoder) == 2
    assert not torch.allclose(first_eager[1], second_eager[1])  # the two models do differ
    for (tokens, logits), (compiled_tokens, compiled_logits), *_ in runs:
        assert torch.equal(tokens, compiled_tokens)
        torch.testing.assert_close(compiled_logits, logits, atol=1e-4, rtol=1e-4)


def test_a_compiled_layer_is_one_graph_and_the_output_collector_is_restored(
    prompts, monkeypatch, fresh_dynamo
):
    """transformers' output-capturing hook inside every CLIP layer reads a ``ContextVar``, which dynamo cannot
    trace: each vision layer broke into two graphs around it. While compiled, the collector is one dynamo
    reads (``globalcom2.models.output_collector``): no graph break, the hidden states LLaVA-NeXT takes from
    the tower still collected (the answers equal eager's), no recompilation on a second call, and the
    collector's own class back once the last compiled model lets go of it."""
    from torch._dynamo.utils import counters

    collector = output_capturing._active_collector
    own_class, held = type(collector), output_collector._holders["count"]
    dynamo_eager_backend(monkeypatch)
    torch.manual_seed(0)
    first, second = deep_tiny_model(decoder_layers=2), deep_tiny_model(decoder_layers=2)
    with torch.inference_mode():
        eager = generate_steps(first, prompts[0], compiled.WARMUP_NEW_TOKENS)
    counters.clear()
    with compile_model(first) as handle, torch.inference_mode():
        assert handle.holds_collector and isinstance(collector, output_collector.TraceableCollector)
        with compile_model(second):  # two holders: the first to let go leaves it traceable
            pass
        assert isinstance(collector, output_collector.TraceableCollector)
        compiled_run = generate_steps(first, prompts[0], compiled.WARMUP_NEW_TOKENS)
        frames = dict(counters["frames"])
        again = generate_steps(first, prompts[0], compiled.WARMUP_NEW_TOKENS)
    assert dict(counters["graph_break"]) == {} and frames["total"] == frames["ok"] > 0
    assert dict(counters["frames"]) == frames  # the second call compiled nothing
    assert type(collector) is own_class and output_collector._holders["count"] == held
    assert held or not hasattr(collector, "mirror")
    for tokens, logits in (compiled_run, again):
        assert torch.equal(tokens, eager[0])
        torch.testing.assert_close(logits, eager[1], atol=1e-4, rtol=1e-4)


@pytest.mark.slow
def test_under_inductor_a_later_model_computes_with_its_own_weights_and_is_freed(model, prompts):
    """What the eager backend cannot show: inductor's code for the first model does not hold its weights as
    constants, so the tiny model of another seed (another folder, another path) compiles nothing and gives its
    own eager answers; and the graphs it ran keep none of its tensors alive once it is deleted."""
    import gc
    import weakref

    from torch._dynamo.utils import counters

    from globalcom2.models.loader import load_tiny_llava_next

    other, _ = load_tiny_llava_next(seed=1)
    failed = compiled.failed_frames()
    results = []
    for each in (model, other):
        with torch.inference_mode():
            eager = generate_steps(each, prompts[1], compiled.WARMUP_NEW_TOKENS)
        before = counters["frames"]["total"]
        with compile_model(each), torch.inference_mode():
            results.append((eager, generate_steps(each, prompts[1], compiled.WARMUP_NEW_TOKENS)))
    assert counters["frames"]["total"] == before and compiled.failed_frames() == failed
    assert not torch.allclose(results[0][0][1], results[1][0][1])
    for (tokens, logits), (compiled_tokens, compiled_logits) in results:
        assert torch.equal(tokens, compiled_tokens)
        torch.testing.assert_close(compiled_logits, logits, atol=1e-4, rtol=1e-4)
    weight = weakref.ref(other.model.language_model.layers[0].mlp.up_proj.weight)
    del other, each
    gc.collect()
    assert weight() is None


def test_under_cuda_graphs_or_freezing_every_layer_and_compile_runs_code_of_its_own(model, monkeypatch):
    """A recorded CUDA graph bakes in its weights' addresses and holds a memory pool, and inductor's freezing
    makes the weights constants: no graph may serve another layer or a later model there."""
    from torch._inductor import config as inductor_config

    cpu = torch.device("cpu")
    assert compiled.reuses_graphs(cpu, "default")
    assert not compiled.reuses_graphs(torch.device("cuda"), "reduce-overhead")
    assert compiled.reuses_graphs(cpu, "max-autotune")  # no CUDA graphs on a CPU
    with inductor_config.patch({"triton.cudagraphs": True}):  # not monkeypatch: its undo deletes the entry
        assert not compiled.reuses_graphs(cpu, "default")
    monkeypatch.setattr(compiled, "REUSE_GRAPHS", False)
    assert not compiled.reuses_graphs(cpu, "default")
    monkeypatch.setattr(compiled, "REUSE_GRAPHS", True)
    with compile_model(model) as handle:  # wraps lazily: nothing compiles without a forward
        shared = layer_codes(model)
    assert handle.signature is not None and len(set(ids(shared[0]))) == 1
    fresh = []
    with inductor_config.patch(freezing=True):
        assert not compiled.reuses_graphs(cpu, "default")
        for _ in range(2):
            with compile_model(model) as handle:
                assert handle.signature is None
                fresh.append(layer_codes(model))
    assert not inductor_config.freezing
    for vision, decoder in fresh:
        assert len(set(ids(vision))) == len(vision) and len(set(ids(decoder))) == len(decoder)
    assert not set(ids(fresh[0][0] + fresh[0][1])) & set(
        ids(fresh[1][0] + fresh[1][1] + shared[0] + shared[1])
    )


def test_a_setting_that_forbids_sharing_switched_on_after_compiling_is_refused_at_the_forward(model, prompts):
    """Graphs compile at the first forward: freezing switched on after ``compile_model`` shared the code
    would make the first layer's weights constants of the graph every vision layer runs."""
    from torch._inductor import config as inductor_config

    with (
        compile_model(model),
        torch.inference_mode(),
        inductor_config.patch(freezing=True),
        pytest.raises(RuntimeError, match="freezing"),
    ):
        model(**prompts[0])
    assert not model._forward_pre_hooks  # removed with the handle


def test_a_compile_in_which_a_frame_failed_leaves_its_signature_unshared(model, monkeypatch):
    """dynamo marks a frame it gave up on (a recompile limit, a swallowed error) on the code object, and a
    later model would run that layer eager without a word: such a compile forgets its signature, and the
    next model gets fresh code. (A failure is counted as dynamo counts it: a frame tried, not compiled.)"""
    from torch._dynamo.utils import counters

    with compile_model(model) as handle:
        codes = layer_codes(model)
    assert handle.signature in SHARED
    with compile_model(model) as handle:
        assert ids(layer_codes(model)[1]) == ids(codes[1])
        monkeypatch.setitem(counters["frames"], "total", counters["frames"]["total"] + 1)
    assert handle.signature not in SHARED
    with compile_model(model):
        assert not set(ids(layer_codes(model)[1])) & set(ids(codes[1]))


@pytest.mark.gpu
def test_on_cuda_a_later_model_compiles_nothing_and_computes_with_its_own_weights(images):
    """The graph reuse on CUDA in ``default`` mode (Triton kernels take the weights as arguments): the tiny
    model of a second seed, loaded after the first, compiles no frame, and each model's compiled greedy
    answers and logits are its own eager ones (float32)."""
    from torch._dynamo.utils import counters

    from globalcom2.models.loader import load_tiny_llava_next

    results, frames = [], []
    for seed in (0, 1):
        model, processor = load_tiny_llava_next(seed=seed, device="cuda", dtype=torch.float32)
        inputs = prompt_inputs(processor, images[(672, 672)]).to("cuda")
        with torch.inference_mode():
            eager = generate_steps(model, inputs, compiled.WARMUP_NEW_TOKENS)
        before = counters["frames"]["total"]
        with compile_model(model, "default"), torch.inference_mode():
            results.append((eager, generate_steps(model, inputs, compiled.WARMUP_NEW_TOKENS)))
        frames.append(counters["frames"]["total"] - before)
        del model
    assert frames[1] == 0
    assert not torch.allclose(results[0][0][1], results[1][0][1])
    for (tokens, logits), (compiled_tokens, compiled_logits) in results:
        assert torch.equal(tokens, compiled_tokens)
        torch.testing.assert_close(compiled_logits, logits, atol=1e-3, rtol=1e-3)
