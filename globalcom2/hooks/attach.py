"""``attach(model, method, **params)``: the single public way to put a compression method on a model.

``method`` is a registered name (built here from ``params``) or an instance a caller already built and
validated, so a harness builds its method once and attaches that same object (``globalcom2.lmms.plugin``).
"""

from __future__ import annotations

from typing import Any

from globalcom2.hooks.handle import Attachment
from globalcom2.hooks.in_llm import InLLMAdapter
from globalcom2.hooks.llava_model import ModelAdapter
from globalcom2.hooks.pre_llm import PreLLMAdapter
from globalcom2.methods import METHODS, CompressionMethod, InLLMMethod, PreLLMMethod
from globalcom2.models.base import check_llava_next_anyres


def attach(model: Any, method: str | CompressionMethod, **params: Any) -> Attachment:
    """Attach the registered compression ``method`` to ``model`` (this instance only).

    One pre-LLM and one in-LLM method may be attached at the same time (e.g. GlobalCom² + FastV); the
    in-LLM method then sees the prompt the pre-LLM method produced.

    Args:
        model: a loaded ``LlavaNextForConditionalGeneration`` with AnyRes (e.g. ``llava-hf/llava-v1.6-vicuna-7b-hf``).
        method: a registered name, see :func:`globalcom2.list_methods`, or a method instance (then
            ``params`` must be empty: the instance already holds them).
        **params: the method's hyperparameters, e.g. ``retention_ratio=0.25``.

    Returns:
        An :class:`Attachment`; ``.remove()`` restores the model exactly.

    Raises:
        TypeError/ValueError: a model that is not LLaVA-NeXT AnyRes, an unknown method or parameter, or a
            parameter outside its valid range (the message names the value and the valid choices).
        RuntimeError: a method of the same stage is already attached.
    """
    check_llava_next_anyres(model)
    instance = _method_instance(method, params)
    method = method if isinstance(method, str) else (instance.name or type(instance).__name__)
    if isinstance(instance, PreLLMMethod):
        slot = "pre_llm"
    elif isinstance(instance, InLLMMethod):
        slot = "in_llm"
    else:
        raise NotImplementedError(
            f"method {method!r} acts at stage {instance.stage!r}, which has no attach point"
        )
    # Check and validate everything before the first change, so a failed attach leaves no trace.
    instance.check_model_config(model.config)  # layer indices, VisionZip's feature layer: as before a load
    ModelAdapter.ensure_free(model, slot, method)
    if slot == "pre_llm":
        stage: PreLLMAdapter | InLLMAdapter = PreLLMAdapter(
            model, instance
        )  # registers score hooks if needed
    else:
        stage = InLLMAdapter(model, instance)  # validates the method against this model
    adapter = ModelAdapter.of(model)
    adapter.occupy(slot, stage, method)
    if isinstance(stage, InLLMAdapter):
        stage.install()

    def detach() -> None:
        if isinstance(stage, InLLMAdapter):
            stage.uninstall()
        else:
            stage.close()
        adapter.release(slot, stage)

    return Attachment(instance, stage.stats, detach)


def _method_instance(method: str | CompressionMethod, params: dict[str, Any]) -> CompressionMethod:
    """``method`` built from its name and ``params``, or the instance itself (with no extra ``params``)."""
    if isinstance(method, CompressionMethod):
        if params:
            raise TypeError(
                f"attach got a built {type(method).__name__} and parameters {sorted(params)}; pass either a "
                "method name with its parameters or an instance alone"
            )
        return method
    return METHODS.create(method, **params)
