"""An overhead-free execution mode: the vision tower's and the LLM's layers run compiled in a prefill.

At the token counts compression leaves (a few hundred), a 7B prefill is bound by the host: every decoder
layer launches a few dozen small kernels from Python, and the GPU waits for them. ``torch.compile`` turns each
layer into a few fused kernels launched from one call (``mode="default"``), and with
``mode="reduce-overhead"`` (the default on CUDA) replays them as a CUDA graph, so the measured prefill shows
the work, not the launches.

What is compiled, and why exactly that:

* each CLIP encoder layer and each decoder layer's ``forward`` (the module's own hooks stay outside the
  compiled code, so the in-LLM methods' pre-hooks on the decoder layers act as in eager mode);
* decoder layers only for prompts longer than one token: decode steps grow the KV cache by one each, which
  under CUDA graphs would record a new graph per step;
* a layer runs eager whenever one of its submodules carries a hook (GlobalCom²'s [CLS] capture on the score
  layer's projections, an in-LLM method's scoring hook on an attention module), so a method's hooks always
  see eager tensors and its code is never traced.

Shapes are dynamic (``dynamic=True``), so a new prompt length does not recompile, and the decoder layer's
``layer_idx`` is a dynamic integer (``torch._dynamo.config.allow_unspec_int_on_nn_module``, set for the
process while a model is compiled), so all layers share one compiled graph instead of one per layer.
The first call compiles (seconds to minutes); harnesses report it apart (``SampleRecord.first_call``).
Outputs equal eager within floating-point reassociation, and greedy answers are identical on the tests'
prompts (``tests/models/test_compiled.py``).
"""

from __future__ import annotations

import importlib.util
import shutil
from collections.abc import Callable
from typing import Any

import torch

COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def default_compile_mode(device: torch.device | str) -> str:
    """``reduce-overhead`` (CUDA graphs) on CUDA, ``default`` elsewhere (CUDA graphs need a GPU)."""
    return "reduce-overhead" if str(device).startswith("cuda") else "default"


def resolve_compile(value: Any, device: torch.device | str) -> str | None:
    """A ``compile`` setting as a mode: ``False``/``None`` -> ``None`` (eager), ``True`` -> the device's
    default, a mode name -> itself; anything else raises with the valid choices."""
    if value is None or value is False:
        return None
    if value is True:
        return default_compile_mode(device)
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
        return None
    if device.type != "cpu":
        return f"compile mode is supported on CPU and CUDA, not on {device.type}"
    if mode == "reduce-overhead":
        return f"compile mode {mode!r} uses CUDA graphs, which need a CUDA device (this model is on {device})"
    if not any(shutil.which(cc) for cc in ("g++", "c++", "clang++")):
        return "torch.compile on CPU needs a C++ compiler (g++ or clang++) on PATH, and none was found"
    return None


class CompiledLayers:
    """The handle :func:`compile_model` returns; :meth:`remove` restores the eager forwards."""

    def __init__(self, mode: str, layers: list[torch.nn.Module]) -> None:
        self.mode = mode
        self._layers = layers

    @property
    def active(self) -> bool:
        return bool(self._layers)

    def remove(self) -> None:
        for layer in self._layers:
            del layer.forward  # the instance attribute; the class's forward shows through again
        self._layers = []

    def __enter__(self) -> CompiledLayers:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.active:
            self.remove()


def _has_hooks(modules: list[torch.nn.Module]) -> bool:
    return any(m._forward_hooks or m._forward_pre_hooks for m in modules)


def _compiled_forward(layer: torch.nn.Module, mode: str, prefill_only: bool) -> Callable[..., Any]:
    eager = layer.forward
    compiled = torch.compile(eager, mode=mode, dynamic=True)
    inner = [m for m in layer.modules() if m is not layer]  # hooks on these would be traced: run eager then

    def forward(*args: Any, **kwargs: Any) -> Any:
        hidden = args[0] if args else kwargs["hidden_states"]
        if (prefill_only and hidden.shape[1] <= 1) or _has_hooks(inner):
            return eager(*args, **kwargs)
        return compiled(*args, **kwargs)

    return forward


def compile_model(model: Any, mode: str | None = None) -> CompiledLayers:
    """Compile the vision tower's and the language model's layers of a LLaVA-NeXT ``model`` in place.

    Args:
        model: a loaded ``LlavaNextForConditionalGeneration``.
        mode: a ``torch.compile`` mode (:data:`COMPILE_MODES`); default: :func:`default_compile_mode`.

    Raises:
        RuntimeError: the backend cannot run here (the message says what is missing).
        ValueError: an unknown mode, or a model that is already compiled.
    """
    device = next(model.parameters()).device
    mode = mode or default_compile_mode(device)
    problem = compile_problem(device, mode)
    if problem:
        raise (ValueError if problem.startswith("unknown") else RuntimeError)(problem)
    inner = model.model
    vision_layers = list(inner.vision_tower.encoder.layers)
    decoder_layers = list(inner.language_model.layers)
    if any("forward" in vars(layer) for layer in vision_layers + decoder_layers):
        raise ValueError("this model's layers are already compiled (or their forward was replaced)")
    # layer_idx (the KV cache slot) becomes a graph input, so all layers share one compiled graph.
    torch._dynamo.config.allow_unspec_int_on_nn_module = True
    for layer in vision_layers:
        layer.forward = _compiled_forward(layer, mode, prefill_only=False)
    for layer in decoder_layers:
        layer.forward = _compiled_forward(layer, mode, prefill_only=True)
    return CompiledLayers(mode, vision_layers + decoder_layers)
