"""``attach(model, method, **params)``: the single public way to put a compression method on a model."""

from __future__ import annotations

from typing import Any

from globalcom2.hooks.handle import Attachment
from globalcom2.hooks.pre_llm import PreLLMAdapter
from globalcom2.methods import METHODS, PreLLMMethod
from globalcom2.models.llava_next import check_llava_next_anyres


def attach(model: Any, method: str, **params: Any) -> Attachment:
    """Attach the registered compression ``method`` to ``model`` (this instance only).

    Args:
        model: a loaded ``LlavaNextForConditionalGeneration`` with AnyRes (e.g. ``llava-hf/llava-v1.6-vicuna-7b-hf``).
        method: a registered name, see :func:`globalcom2.list_methods`.
        **params: the method's hyperparameters, e.g. ``retention_ratio=0.25``.

    Returns:
        An :class:`Attachment`; ``.remove()`` restores the model exactly.

    Raises:
        TypeError/ValueError: a model that is not LLaVA-NeXT AnyRes, an unknown method or parameter, or a
            parameter outside its valid range (the message names the value and the valid choices).
    """
    check_llava_next_anyres(model)
    instance = METHODS.create(method, **params)
    if isinstance(instance, PreLLMMethod):
        adapter = PreLLMAdapter(model, instance)
        adapter.install()
        return Attachment(instance, adapter.stats, adapter.uninstall)
    raise NotImplementedError(
        f"method {method!r} acts at stage {instance.stage!r}, which has no attach point yet"
    )
