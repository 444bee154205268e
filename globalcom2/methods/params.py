"""A method's parameters from a command line: typed by its own signature; its budget word; attention support.

``--model_args k=v,...`` reaches the plugin as keyword arguments that lmms-eval has already guessed
types for (``"0.25"`` -> 0.25, ``"1"`` -> 1, ``"true"`` -> True, anything else stays a string), and Hydra
overrides arrive as YAML scalars. A method's keyword-only ``__init__`` signature is the single source of truth
for its parameters: its type hints convert those values into the declared types, and anything that does not
fit is refused with the parameter's name, the value and what was expected. Nothing here loads a model, so all
of it runs before one is loaded (``globalcom2.run_spec`` is the one caller for both entry points).
"""

from __future__ import annotations

import inspect
import json
import re
import types
import typing
from collections.abc import Callable
from typing import Any, Literal, Union

from globalcom2.methods import METHODS

_TRUE = {"true", "yes", "1"}
_FALSE = {"false", "no", "0"}


def method_parameters(method: str) -> dict[str, inspect.Parameter]:
    """The keyword parameters of a registered method's ``__init__`` (an unknown method raises)."""
    cls = METHODS.get(method)
    return {
        name: p
        for name, p in inspect.signature(cls.__init__).parameters.items()
        if name != "self" and p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)
    }


def coerce_method_params(
    method: str, raw: dict[str, Any], spell: Callable[[str], str] | None = None
) -> dict[str, Any]:
    """Convert ``raw`` (values from a command line) to the types ``method``'s ``__init__`` declares.

    Args:
        spell: how the caller spells a parameter in messages (``method.params.K`` in Hydra); default: its name.

    Raises:
        ValueError: unknown method, unknown parameter (the accepted ones are listed), or a value that
            does not fit the declared type.
    """
    cls = METHODS.get(method)
    params = method_parameters(method)
    unknown = sorted(set(raw) - set(params))
    if unknown:
        raise ValueError(
            f"method {method!r} does not take {', '.join(map(repr, unknown))}. "
            f"Its parameters: {', '.join(params) or '(none)'}."
        )
    hints = typing.get_type_hints(cls.__init__)
    spell = spell or (lambda name: name)
    return {name: coerce(value, hints.get(name, Any), spell(name)) for name, value in raw.items()}


def budget_kwargs(method: str, retention_ratio: float) -> dict[str, Any]:
    """``{"retention_ratio": R}`` for a method with a budget, ``{}`` for one without (``vanilla``): the one
    place that knows which methods take the budget word."""
    return {"retention_ratio": retention_ratio} if METHODS.get(method).has_budget else {}


def check_attn_compatibility(method: str, attn_implementation: str | dict[str, str]) -> None:
    """Raise ``ValueError`` unless ``method`` declares support for the attention implementation(s)."""
    cls = METHODS.get(method)
    supported = cls.supported_attn_implementations
    values = attn_implementation.values() if isinstance(attn_implementation, dict) else [attn_implementation]
    bad = sorted({v for v in values if v not in supported})
    if bad:
        raise ValueError(
            f"method {method!r} does not support attn_implementation {', '.join(map(repr, bad))}; "
            f"it supports {', '.join(sorted(supported))}. Pass attn_implementation=<one of those>."
        )


def parse_attn_implementation(value: Any) -> str | dict[str, str]:
    """``"sdpa"``, ``"eager"``, … or a JSON object per sub-config (``{"vision_config": "eager", ...}``)."""
    if isinstance(value, dict):
        parsed = value
    elif isinstance(value, str) and value.strip().startswith("{"):
        try:
            parsed = json.loads(value)
        except json.JSONDecodeError as err:
            raise ValueError(f"attn_implementation is not valid JSON: {value!r} ({err})") from err
    elif isinstance(value, str) and value:
        return value
    else:
        raise TypeError(f"attn_implementation must be a string or a mapping, got {value!r}")
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in parsed.items()):
        raise TypeError(f"attn_implementation mapping must map sub-config names to strings, got {parsed!r}")
    unknown = sorted(set(parsed) - set(ATTENTION_SUB_CONFIGS))
    if unknown:
        raise ValueError(
            f"attn_implementation names sub-configs {unknown}; LLaVA-NeXT's are {', '.join(ATTENTION_SUB_CONFIGS)}"
        )
    return dict(parsed)


#: The sub-configs of LLaVA-NeXT an ``attn_implementation`` mapping may name.
ATTENTION_SUB_CONFIGS = ("text_config", "vision_config")


def coerce(value: Any, annotation: Any, name: str) -> Any:
    """``value`` converted to ``annotation`` (bool, int, float, str, Literal, Optional, list/tuple)."""
    if annotation is Any or annotation is inspect.Parameter.empty:
        return value
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (Union, types.UnionType):
        if type(None) in args and (
            value is None or (isinstance(value, str) and value.lower() in {"none", "null"})
        ):
            return None
        errors = []
        for option in (a for a in args if a is not type(None)):
            try:
                return coerce(value, option, name)
            except (TypeError, ValueError) as err:
                errors.append(str(err))
        raise ValueError(f"{name}={value!r} fits none of {annotation}: {'; '.join(errors)}")
    if origin is Literal:
        for choice in args:
            try:
                candidate = coerce(value, type(choice), name)
            except (TypeError, ValueError):
                continue
            if candidate == choice:
                return choice
        raise ValueError(f"{name} must be one of {list(args)}, got {value!r}")
    if origin in (list, tuple) or annotation in (list, tuple):
        items = json.loads(value) if isinstance(value, str) else value
        if not isinstance(items, (list, tuple)):
            raise ValueError(f"{name} must be a list (JSON, e.g. '[2,6,15]'), got {value!r}")
        inner = args[0] if args else Any
        converted = [coerce(item, inner, f"{name}[{i}]") for i, item in enumerate(items)]
        return tuple(converted) if (origin or annotation) is tuple else converted
    if annotation is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in _TRUE | _FALSE:
            return value.lower() in _TRUE
        if isinstance(value, int) and value in (0, 1):  # lmms-eval's model_args parser reads "1" as int 1
            return bool(value)
        raise ValueError(f"{name} must be true or false, got {value!r}")
    if annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            # lmms-eval's model_args parser reads "-1" as the float -1.0 (str.isnumeric is False for it)
            return int(value)
        if isinstance(value, str) and re.fullmatch(r"-?\d+", value.strip()):
            return int(value)
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if annotation is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ValueError(f"{name} must be a number, got {value!r}")
    if annotation is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise ValueError(f"{name} must be a string, got {value!r}")
    return value
