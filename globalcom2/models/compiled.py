"""An overhead-free execution mode: the vision tower's and the LLM's layers run compiled.

At the token counts compression leaves (a few hundred), a 7B prefill is bound by the host: every decoder
layer launches a few dozen small kernels from Python, and the GPU waits for them. A decode step (one token)
is bound by the host at every token count. ``torch.compile`` fuses each layer into a few kernels launched
from one call, so the measured prefill and decode show more of the work and less of the launches.

What is compiled, and why exactly that:

* each CLIP encoder layer and each decoder layer's ``forward`` (the module's own hooks stay outside the
  compiled code, so the in-LLM methods' pre-hooks on the decoder layers act as in eager mode);
* the decoder layers in the prefill and in the decode steps, except where CUDA graphs replay (the
  CUDA-graph modes on a CUDA device): there in the prefill only, since decode steps grow the KV cache by one
  each, so CUDA graphs would record a new graph per step;
* a pre-LLM method's own work, when it offers a compiled form: the model carries its mode
  (:func:`compile_mode_of`), which the method reads from ``ImageContext.compile_mode`` (GlobalCom²'s
  selection after the allocation, ``globalcom2.methods.globalcom2.compiled_selection``);
* a layer runs eager whenever one of its submodules carries a hook (GlobalCom²'s [CLS] capture on the score
  layer's projections, an in-LLM method's scoring hook on an attention module), so a method's hooks always
  see eager tensors and its code is never traced. transformers' own output-capturing hooks do not count:
  ``capture_outputs`` installs them on every CLIP attention module at the vision tower's first call, and
  they stay, so counting them kept every vision layer eager. dynamo cannot trace the ``ContextVar.get``
  they read, which broke each vision layer's graph in two around the attention module's hook (the encoder
  layer's own, for hidden states, runs outside the compiled ``forward``); while a compiled model lives, the
  collector they read is one dynamo can trace (:mod:`globalcom2.models.output_collector`), so each layer is
  one graph, with the attention hook traced into it (it finds no attentions asked for, and returns). So under
  this mode a method with such a hook runs that one layer eager where vanilla runs it compiled (FastV's and
  SparseVLM's scoring layer, GlobalCom²'s score layer in CLIP), and its latency carries that layer's launch
  overhead; at R = 1 those methods attach no hook, so the identity with vanilla is untouched.

Shapes are dynamic (``dynamic=True``), so a new prompt length or a longer KV cache does not recompile; sizes
0 and 1 are specialised, so the one-token decode step and batch size 1 get graphs of their own, and so does
the second decode step, whose cache has another memory layout than the first's (:data:`WARMUP_NEW_TOKENS`).
Each decoder layer gets graphs of its own (``Cache.update`` indexes the cache's per-layer list with the
layer's ``layer_idx``, and dynamo guards on that slot), and the graphs' bodies are identical, so inductor's
FX graph cache compiles the first ones and serves the rest.

Which code object each layer runs, and so which graphs it finds, is :mod:`globalcom2.models.layer_code`'s:
a private copy per decoder layer (dynamo's per-call scan of a code object's graphs stays short), one copy
for all vision layers (dynamo traces one, not 24), and the same copies for a later model of the same
signature, so that a local sweep's next cell, which loads its model anew, compiles nothing. On the 2-core
CPU at the 7B's depths such a model compiled 120 dynamo frames in 53 s with sharing off, and none with it,
its first call taking what it takes eager (``make bench-compile-cost``, with and without ``--no-reuse``:
``results/efficiency/compile_cost_7b_cpu*.md``). Sharing is off where a graph must not
serve other weights: under the CUDA-graph modes on CUDA, inductor's ``triton.cudagraphs`` and its
``freezing`` (:func:`reuses_graphs`, read when :func:`compile_model` wraps the layers; a model forward under
a setting that no longer allows it is refused). dynamo also counts graphs against ``recompile_limit`` (8)
and ``accumulated_recompile_limit`` (256), past which it silently runs a layer eager; :func:`compile_model`
raises both to what the whole model can need (:func:`recompile_limit_for`; a 13B's 272), a margin kept from
when the layers shared one code object, and restores them when the last handle is removed. A compile during
which a frame failed (that limit, or an error dynamo swallowed) leaves its signature unshared for the next
model (:meth:`CompiledLayers.remove`).

**The default mode is ``default`` on every device**, not ``reduce-overhead`` (CUDA graphs). Two reasons,
both from compiling per layer: under inference, every call of a compiled function starts a new CUDA-graph
"generation", which frees the previous layer's outputs (the next layer's input and the KV cache) while they
are still in use (pytorch/pytorch#152887); and with dynamic shapes CUDA graphs record a new graph for each
new prompt length, inside the measured call. ``reduce-overhead`` (and ``max-autotune``) stay available by
name: for them :func:`compile_model` marks a new CUDA-graph step at each of the model's forwards
(``torch.compiler.cudagraph_mark_step_begin``, the remedy torch's own error message names), so one prefill's
layers form one generation; ``tests/models/test_compiled.py`` checks both modes on CUDA. Evaluations (cells,
the plugin) refuse them on CUDA (``globalcom2.run_spec.run_problems``): they meet new prompt lengths
throughout, and a call that records a graph is not flagged as one that compiled (dynamo's frame counter
does not move); ``make bench-efficiency`` warms every prompt first.

The first call compiles (seconds to minutes), and the first decode step and the first batch of a new size
compile again; harnesses report the first call apart (``SampleRecord.first_call``). Outputs equal eager
within floating-point reassociation, and greedy answers are identical on the tests' prompts
(``tests/models/test_compiled.py``).
"""

from __future__ import annotations

import functools
import importlib.util
import os
import shutil
import sys
from collections.abc import Callable
from typing import Any

import torch

from globalcom2.models import output_collector
from globalcom2.models.layer_code import SHARED, Codes, compile_signature, layer_code

COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
#: What ``compile=true`` means on every device (the module docstring says why not ``reduce-overhead``).
DEFAULT_COMPILE_MODE = "default"
#: The modes that replay CUDA graphs: each model forward marks a new CUDA-graph step under them.
CUDA_GRAPH_MODES = ("reduce-overhead", "max-autotune")
#: Room in dynamo's recompile limit, past what :func:`recompile_limit_for` counts, for a dtype change or a
#: shape that specialises.
RECOMPILE_MARGIN = 8


def resolve_compile(value: Any) -> str | None:
    """A ``compile`` setting as a mode: ``False``/``None`` -> ``None`` (eager), ``True`` ->
    :data:`DEFAULT_COMPILE_MODE`, a mode name -> itself; anything else raises with the valid choices."""
    if value is None or value is False:
        return None
    if value is True:
        return DEFAULT_COMPILE_MODE
    if isinstance(value, str) and value in COMPILE_MODES:
        return value
    raise ValueError(f"compile must be true, false or one of {', '.join(COMPILE_MODES)}; got {value!r}")


def compile_problem(device: torch.device | str, mode: str) -> str | None:
    """Why ``torch.compile`` cannot run here in ``mode`` (``None`` when it can): inductor needs a C++
    compiler for CPU code and Triton for GPU code; CUDA graphs need a CUDA device."""
    device = torch.device(device)
    if mode not in COMPILE_MODES:
        return f"unknown compile mode {mode!r}; valid: {', '.join(COMPILE_MODES)}"
    if device.type == "cuda":
        if importlib.util.find_spec("triton") is None:
            return "torch.compile on CUDA needs Triton (pip install triton), which is not installed"
        # Triton builds a small C launcher per kernel with $CC, else gcc, else clang (triton/runtime/build.py).
        compilers = [os.environ["CC"]] if os.environ.get("CC") else ["gcc", "clang"]
        if not any(shutil.which(cc) for cc in compilers):
            return f"torch.compile on CUDA needs a C compiler for Triton's launchers ({' or '.join(compilers)}), none found"
        return None
    if device.type != "cpu":
        return f"compile mode is supported on CPU and CUDA, not on {device.type}"
    if mode == "reduce-overhead":
        return f"compile mode {mode!r} uses CUDA graphs, which need a CUDA device (this model is on {device})"
    if not any(shutil.which(cc) for cc in ("g++", "c++", "clang++")):
        return "torch.compile on CPU needs a C++ compiler (g++ or clang++) on PATH, and none was found"
    return None


#: The attribute :func:`compile_model` sets on the model it compiled (its mode), and ``remove`` deletes.
MODE_ATTRIBUTE = "_globalcom2_compile_mode"


def compile_mode_of(model: Any) -> str | None:
    """The mode ``model`` is compiled in by :func:`compile_model`, ``None`` when it runs eager: what a
    pre-LLM method's own work follows (``ImageContext.compile_mode``)."""
    return getattr(model, MODE_ATTRIBUTE, None)


class CompiledLayers:
    """The handle :func:`compile_model` returns; :meth:`remove` restores the eager forwards."""

    def __init__(
        self,
        mode: str,
        layers: list[torch.nn.Module],
        hooks: list[Any],
        model: Any = None,
        signature: str | None = None,
        holds_collector: bool = False,
    ) -> None:
        self.mode = mode
        #: whether this handle holds transformers' output collector traceable (:mod:`.output_collector`)
        self.holds_collector = holds_collector
        #: the :func:`~globalcom2.models.layer_code.compile_signature` whose shared code the layers run;
        #: ``None``: code of their own
        self.signature = signature
        self._layers = layers
        self._hooks = hooks
        self._model = model
        # dynamo's counters when it was made
        self._frames_before = (compile_attempts(), failed_frames(), graph_breaks())

    @property
    def active(self) -> bool:
        return bool(self._layers)

    def frames(self) -> dict[str, int]:
        """The dynamo frames compiled, given up on (those ran eager), and the graph breaks that split a
        compiled frame (0 in LLaVA-NeXT's layers; :mod:`.output_collector` removed the last), in this process
        since the handle was made: the process's counters, so another model compiling meanwhile counts too."""
        failed = failed_frames() - self._frames_before[1]
        return {
            "compiled": compile_attempts() - self._frames_before[0] - failed,
            "failed": failed,
            "graph_breaks": graph_breaks() - self._frames_before[2],
        }

    def remove(self) -> None:
        for layer in self._layers:
            del layer.forward  # the instance attribute; the class's forward shows through again
        for hook in self._hooks:
            hook.remove()
        if self._layers:
            _release_recompile_limit()
        if self.holds_collector:
            output_collector.let_go()
            self.holds_collector = False
        if self.signature is not None and self.frames()["failed"]:
            # a frame dynamo gave up on stays marked on the shared code: the next model compiles afresh
            SHARED.forget(self.signature)
        if self._model is not None and MODE_ATTRIBUTE in vars(self._model):
            delattr(self._model, MODE_ATTRIBUTE)
        self._layers, self._hooks, self._model = [], [], None

    def __enter__(self) -> CompiledLayers:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.active:
            self.remove()


#: dynamo's two limits that :func:`compile_model` raises: ``recompile_limit`` (graphs per module instance of a
#: code object) and ``accumulated_recompile_limit`` (graphs of a code object in all, 256 by default: a 13B's
#: 40 decoder layers with their 24 vision layers can need more, and past it dynamo runs the rest eager).
RECOMPILE_LIMITS = ("recompile_limit", "accumulated_recompile_limit")
#: Those limits before the first live handle raised them, and how many handles are live.
_recompile_limit_state: dict[str, Any] = {"live": 0, "saved": {}}


#: The calls of a ``generate`` that meet every graph a decoder layer needs: the prefill, the first decode step
#: (its KV cache is the prefill's keys and values, strided views of the projections) and a later one (a
#: contiguous cache grown by ``torch.cat``); dynamo guards on that layout, so each is a graph of its own. A
#: warm-up of this many new tokens compiles them all at its batch size, so a timed call at that size (batch 1,
#: or any size above 1) does not compile.
WARMUP_NEW_TOKENS = 3


def compile_attempts() -> int:
    """Frames dynamo has been asked to compile in this process so far (its ``frames.total`` counter).

    A call that runs only cached graphs adds none, so an increase across a timed call means that call
    compiled (a guard the warm-up never failed, a size it never met) and its time is mostly compilation:
    the profiler flags it (``Measurement.compiled``). 0 while dynamo has not been imported, when nothing can
    have compiled (reading the counter then would import it, a second's work)."""
    utils = sys.modules.get("torch._dynamo.utils")
    return 0 if utils is None else int(utils.counters["frames"]["total"])


def failed_frames() -> int:
    """Frames dynamo tried to compile in this process and gave up on (a recompile limit, an error it
    swallowed): such a frame runs eager without a word. 0 while dynamo has not been imported."""
    utils = sys.modules.get("torch._dynamo.utils")
    if utils is None:
        return 0
    frames = utils.counters["frames"]
    return int(frames["total"]) - int(frames["ok"])


def graph_breaks() -> int:
    """Graph breaks dynamo has met in this process so far: each splits a compiled frame into graphs entered
    from Python, with the host work between them. 0 while dynamo has not been imported."""
    utils = sys.modules.get("torch._dynamo.utils")
    return 0 if utils is None else int(sum(utils.counters["graph_break"].values()))


def recompile_limit_for(vision_layers: int, decoder_layers: int, decode_compiled: bool) -> int:
    """The graphs one model's compiled layers can need from the code object they share: one per vision
    layer (they share one; counted per layer to stay safe), and per decoder layer one for each specialised
    case it meets, batch size 1 or more times the prefill and, where compiled, the first and the later decode
    steps (:data:`WARMUP_NEW_TOKENS`); plus :data:`RECOMPILE_MARGIN`."""
    cases_per_decoder_layer = 2 * (3 if decode_compiled else 1)
    return vision_layers + cases_per_decoder_layer * decoder_layers + RECOMPILE_MARGIN


def _raise_recompile_limit(limit: int) -> None:
    config = torch._dynamo.config
    if _recompile_limit_state["live"] == 0:
        _recompile_limit_state["saved"] = {name: getattr(config, name) for name in RECOMPILE_LIMITS}
    _recompile_limit_state["live"] += 1
    for name in RECOMPILE_LIMITS:
        setattr(config, name, max(getattr(config, name), limit))


def _release_recompile_limit() -> None:
    _recompile_limit_state["live"] -= 1
    if _recompile_limit_state["live"] == 0:
        for name, value in _recompile_limit_state["saved"].items():
            setattr(torch._dynamo.config, name, value)


def _replays_cuda_graphs(device: torch.device, mode: str) -> bool:
    return device.type == "cuda" and mode in CUDA_GRAPH_MODES


#: Whether compiled layers may share code (:mod:`globalcom2.models.layer_code`) at all; ``make
#: bench-compile-cost --no-reuse`` turns it off to measure what sharing saves.
REUSE_GRAPHS = True


def reuses_graphs(device: torch.device, mode: str) -> bool:
    """Whether layers share graphs, with each other (the vision layers) and with earlier models of their
    signature (:mod:`globalcom2.models.layer_code`): not where CUDA graphs replay (a recorded graph bakes in
    its weights' addresses and holds a memory pool: the CUDA-graph modes on CUDA, or inductor's
    ``triton.cudagraphs``), nor under inductor's ``freezing`` (the weights become constants)."""
    from torch._inductor import config as inductor_config  # what torch.compile imports first thing anyway

    return (
        REUSE_GRAPHS
        and not _replays_cuda_graphs(device, mode)
        and not inductor_config.triton.cudagraphs
        and not inductor_config.freezing
    )


def _refuse_unshareable(mode: str, model: torch.nn.Module, args: Any) -> None:
    """A forward pre-hook where layers share graphs (bound to the compile ``mode``): graphs compile lazily, at
    a forward, so an inductor setting switched on after :func:`compile_model` (``freezing``,
    ``triton.cudagraphs``), or the model moved to a device where the mode replays CUDA graphs, would bake
    one layer's or one model's weights into code that others run. Refused instead."""
    if not reuses_graphs(next(model.parameters()).device, mode):
        raise RuntimeError(
            "inductor's freezing or triton.cudagraphs was switched on, or the model moved to CUDA under a "
            "CUDA-graph mode, after compile_model shared this model's layer code; set it (or move the model) "
            "before compile_model, which then gives each layer code of its own"
        )


def _mark_cuda_graph_step(module: torch.nn.Module, args: Any) -> None:
    """A forward pre-hook: the layers this forward runs form one CUDA-graph generation (module docstring)."""
    torch.compiler.cudagraph_mark_step_begin()


#: The name of transformers' output-capturing forward hook (``transformers/utils/output_capturing.py``,
#: ``install_output_capuring_hook``), which a model decorated with ``capture_outputs`` installs on every module
#: whose output it can return (CLIP's attention modules, at the vision tower's first call), and which stays.
TRANSFORMERS_CAPTURE_HOOK = "output_capturing_hook"


def _is_method_hook(hook: Any) -> bool:
    """Any hook but transformers' own output capture, which only reads its collector and appends to it when
    one is active: it leaves the layer compiled, traced into the layer's graph (the module docstring)."""
    return getattr(hook, "__name__", None) != TRANSFORMERS_CAPTURE_HOOK


def _has_hooks(modules: list[torch.nn.Module]) -> bool:
    """Whether a hook other than transformers' output capture sits on one of ``modules`` (the layer then runs
    eager, so that a method's hook sees eager tensors)."""
    return any(
        _is_method_hook(hook)
        for m in modules
        for hook in (*m._forward_hooks.values(), *m._forward_pre_hooks.values())
    )


def _compiled_forward(
    layer: torch.nn.Module,
    mode: str,
    prefill_only: bool,
    name: str,
    codes: Codes | None,
) -> Callable[..., Any]:
    eager = layer.forward
    compiled = torch.compile(layer_code(eager, name, codes), mode=mode, dynamic=True)
    inner = [m for m in layer.modules() if m is not layer]  # hooks on these would be traced: run eager then

    def forward(*args: Any, **kwargs: Any) -> Any:
        hidden = args[0] if args else kwargs["hidden_states"]
        if (prefill_only and hidden.shape[1] <= 1) or _has_hooks(inner):
            return eager(*args, **kwargs)
        return compiled(*args, **kwargs)

    return forward


def compile_model(model: Any, mode: str | None = None) -> CompiledLayers:
    """Compile the vision tower's and the language model's layers of a LLaVA-NeXT ``model`` in place (the
    decoder layers for the decode steps too, except where CUDA graphs replay).

    Args:
        model: a loaded ``LlavaNextForConditionalGeneration``.
        mode: a ``torch.compile`` mode (:data:`COMPILE_MODES`); default: :data:`DEFAULT_COMPILE_MODE`.

    Raises:
        RuntimeError: the backend cannot run here (the message says what is missing).
        ValueError: an unknown mode, or a model that is already compiled.
    """
    device = next(model.parameters()).device
    mode = mode or DEFAULT_COMPILE_MODE
    problem = compile_problem(device, mode)
    if problem:
        raise (ValueError if problem.startswith("unknown") else RuntimeError)(problem)
    inner = model.model
    vision_layers = list(inner.vision_tower.encoder.layers)
    decoder_layers = list(inner.language_model.layers)
    layers = vision_layers + decoder_layers
    if any("forward" in vars(layer) for layer in layers):
        raise ValueError("this model's layers are already compiled (or their forward was replaced)")
    decode_compiled = not _replays_cuda_graphs(device, mode)  # the module docstring says why
    signature = compile_signature(model, mode) if reuses_graphs(device, mode) else None
    codes = SHARED.codes_for(signature) if signature is not None else None
    _raise_recompile_limit(recompile_limit_for(len(vision_layers), len(decoder_layers), decode_compiled))
    wrapped: list[Any] = []
    holds_collector = False
    try:
        holds_collector = output_collector.hold()  # CLIP layers without a graph break at the capture hook
        for index, layer in enumerate(vision_layers):
            name = "vision_layer_forward" if codes is not None else f"vision_layer_{index}_forward"
            layer.forward = _compiled_forward(layer, mode, False, name, codes)
            wrapped.append(layer)
        for index, layer in enumerate(decoder_layers):
            layer.forward = _compiled_forward(
                layer, mode, not decode_compiled, f"decoder_layer_{index}_forward", codes
            )
            wrapped.append(layer)
        hooks = []
        if _replays_cuda_graphs(device, mode):
            hooks.append(model.register_forward_pre_hook(_mark_cuda_graph_step))
        if codes is not None:
            hooks.append(model.register_forward_pre_hook(functools.partial(_refuse_unshareable, mode)))
    except BaseException:  # no handle to undo a half-compiled model with: leave it as it was
        for layer in wrapped:
            del layer.forward
        _release_recompile_limit()
        if holds_collector:
            output_collector.let_go()
        raise
    setattr(model, MODE_ATTRIBUTE, mode)
    return CompiledLayers(mode, layers, hooks, model, signature, holds_collector)
