"""The code objects compiled layers run, and which of them later models share (``compile=true``).

dynamo keeps the graphs it compiles, with their guards, on the code object a frame runs. So which code object
a compiled layer runs decides which graphs it can find:

* **A private copy per decoder layer.** In transformers 5.x every CLIP and LLaMA layer's ``forward`` is one
  wrapper (``GradientCheckpointingLayer``'s ``forward_with_checkpointing``), and dynamo scans a code object's
  entries at every call until one's guards pass. Each decoder layer has graphs of its own (dynamo guards on
  its KV-cache slot), so a 7B's 32 decoder layers would share one list of about a hundred entries. A copy
  per decoder layer keeps each layer's few graphs to itself: dynamo's cache lookup fell from 0.45 to 0.12 ms
  a layer call (CPU, random-init 7B depth, ``torch.profiler``).
* **One copy for all vision layers.** A CLIP layer differs from the next only in its weights, which the
  graphs take as inputs, so the first layer's graphs serve all 24 and dynamo traces one layer, not 24.
* **The same copies for a later model of the same signature.** A local sweep's cells share a process and
  each loads its model anew. :data:`SHARED` keeps the copies per :func:`compile_signature`, so the next
  cell's layers run the code objects the first cell's ran, and dynamo serves the graphs it traced then.
  Their guards check the inputs' shapes, dtypes and strides and the modules' attributes (the layer's type,
  not its identity), and the weights are graph inputs, not constants, so another model passes them and
  computes with its own weights. Hooks are not guarded (dynamo skips ``nn.Module`` hook guards); the
  compiled layer's wrapper runs a layer eager whenever a submodule carries a method's hook
  (``globalcom2.models.compiled``).

Where graphs must not be shared, the caller asks for fresh copies (``codes=None``): under CUDA graphs (a
recorded graph bakes in its weights' addresses and holds a memory pool) and under inductor's ``freezing``
(the weights become constants); ``globalcom2.models.compiled`` decides.

What a graph compiled for one model cannot know: a frame dynamo gave up on (at a recompile limit, or after
an error it swallowed) is marked on the code object, and later models would run that layer eager without a
word, their warm-ups compiling nothing. So a compile during which any frame failed forgets its signature
(:meth:`SharedCode.forget`), and the next model starts from fresh copies and compiles, and fails, visibly.
"""

from __future__ import annotations

import json
import types
from collections import OrderedDict
from typing import Any

#: Signatures whose copies :data:`SHARED` keeps, the most recently used: a process that compiles a 7B and
#: then a 13B keeps both, and one that sweeps many architectures does not keep them all.
KEPT_SIGNATURES = 4

#: A slot's copies, keyed by the original code object and the slot's name.
Codes = dict[tuple[types.CodeType, str], types.CodeType]


def compile_signature(model: Any, mode: str) -> str:
    """What a compiled model's layer graphs may depend on besides their inputs: the language model's and the
    vision tower's configs (the only ones the layers read; their paths left out, so two checkpoints of one
    architecture share graphs), each one's attention implementation, the dtype, the device and the compile
    mode. Models with the same signature run the same layer code; dynamo's guards still decide whether a
    graph fits, so the signature only keeps unrelated models' graphs apart (and below the recompile limits)."""
    config = model.config
    parts: dict[str, Any] = {}
    for name in ("text_config", "vision_config"):
        part = getattr(config, name)
        values = part.to_dict()
        values.pop("_name_or_path", None)
        parts[name] = {"config": values, "attn_implementation": part._attn_implementation}
    parameter = next(model.parameters())
    parts.update(dtype=str(parameter.dtype), device=str(parameter.device), mode=mode)
    return json.dumps(parts, sort_keys=True, default=str)


class SharedCode:
    """The layer copies of the :data:`KEPT_SIGNATURES` most recently compiled signatures (module docstring).

    Dropping a signature drops its copies, and with them dynamo's graphs on them once no live model runs
    them."""

    def __init__(self, capacity: int = KEPT_SIGNATURES) -> None:
        self.capacity = capacity
        self._codes: OrderedDict[str, Codes] = OrderedDict()

    def codes_for(self, signature: str) -> Codes:
        """The copies of ``signature`` (new and empty the first time), now the most recently used."""
        codes = self._codes.pop(signature, None)
        self._codes[signature] = codes if codes is not None else {}
        while len(self._codes) > self.capacity:
            self._codes.popitem(last=False)
        return self._codes[signature]

    def forget(self, signature: str) -> None:
        """The next model of ``signature`` gets fresh copies (a frame of this one failed to compile)."""
        self._codes.pop(signature, None)

    def clear(self) -> None:
        self._codes.clear()

    def __contains__(self, signature: object) -> bool:
        return signature in self._codes

    def __len__(self) -> int:
        return len(self._codes)


#: The process's shared copies.
SHARED = SharedCode()


def layer_code(forward: Any, name: str, codes: Codes | None) -> Any:
    """``forward`` (a module's bound method) running a copy of its function's code object, named ``name``.

    ``codes`` holds the copies already made (one signature's, :meth:`SharedCode.codes_for`): the copy for
    ``name`` is then the one earlier calls made, whose graphs are reused; ``None`` makes a fresh copy. The
    copy's closure and globals are the original's, so it behaves exactly as the original."""
    function = forward.__func__
    if codes is None:
        code = function.__code__.replace(co_name=name)
    else:
        code = codes.setdefault((function.__code__, name), function.__code__.replace(co_name=name))
    copy = types.FunctionType(code, function.__globals__, name, function.__defaults__, function.__closure__)
    copy.__kwdefaults__ = function.__kwdefaults__
    copy.__dict__.update(function.__dict__)
    return types.MethodType(copy, forward.__self__)
