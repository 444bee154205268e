"""The lmms-eval plugin's own ``model_args`` (everything that is not a method parameter), typed and checked.

One home for these checks: the plugin's constructor and the pre-flight (``preflight.check_model_args``)
both build a :class:`PluginOptions`, so a bad ``batch_size`` or ``dtype`` is refused before any model
loads, with the same message on every entry point.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from globalcom2.lmms.generation import GenerationSettings, parse_gen_kwargs
from globalcom2.lmms.method_args import coerce
from globalcom2.lmms.protocols import DEFAULT_PROTOCOL, check_protocol
from globalcom2.models.base import DTYPE_CHOICES

#: The ``model_args`` keys :meth:`PluginOptions.from_model_args` takes.
PLUGIN_OPTION_NAMES = (
    "batch_size",
    "max_batch_size",
    "max_new_tokens",
    "warmup",
    "profile",
    "random_init",
    "dtype",
    "protocol",
    "generation_overrides",
    "compile",
)
#: Every ``model_args`` key the plugin itself takes (the rest are method parameters): the options above plus
#: what the plugin resolves on its own. ``tests/lmms/test_plugin.py`` checks it against the plugin's
#: signature, so the pre-flight need not import the plugin (a layer above it) to know them.
PLUGIN_ARG_NAMES = frozenset(
    {*PLUGIN_OPTION_NAMES, "pretrained", "method", "device", "attn_implementation", "records_path"}
)


@dataclass(frozen=True)
class PluginOptions:
    batch_size: int
    max_new_tokens: int
    warmup: int
    profile: bool
    random_init: bool
    dtype: str
    protocol: str = DEFAULT_PROTOCOL
    generation_overrides: dict[str, Any] | None = None
    compile: bool | str = False  # False, True (the device's default mode) or a torch.compile mode

    @classmethod
    def from_model_args(
        cls,
        *,
        batch_size: Any = 1,
        max_batch_size: Any = None,
        max_new_tokens: Any = 1024,
        warmup: Any = 1,
        profile: Any = True,
        random_init: Any = False,
        dtype: Any = "auto",
        protocol: Any = DEFAULT_PROTOCOL,
        generation_overrides: Any = None,
        compile: Any = False,
    ) -> PluginOptions:
        """Raises ``ValueError`` naming the argument, its value and what is valid."""
        if str(batch_size) == "auto" or max_batch_size is not None:
            raise ValueError("automatic batch sizes are not supported: pass an integer batch_size >= 1")
        options = cls(
            batch_size=coerce(batch_size, int, "batch_size"),
            max_new_tokens=coerce(max_new_tokens, int, "max_new_tokens"),
            warmup=coerce(warmup, int, "warmup"),
            profile=coerce(profile, bool, "profile"),
            random_init=coerce(random_init, bool, "random_init"),
            dtype=str(dtype),
            protocol=check_protocol(protocol),
            generation_overrides=_overrides(generation_overrides),
            compile=_compile_setting(compile),
        )
        if options.generation_overrides and options.protocol != "llava":
            raise ValueError(
                "generation_overrides apply under protocol=llava (whose generation settings are fixed); under "
                "protocol=lmms_eval pass lmms-eval's --gen_kwargs instead"
            )
        if options.generation_overrides:
            GenerationSettings.from_gen_kwargs(options.generation_overrides, options.max_new_tokens)
        for name, minimum in (("batch_size", 1), ("max_new_tokens", 1), ("warmup", 0)):
            if getattr(options, name) < minimum:
                raise ValueError(f"{name} must be an integer >= {minimum}, got {getattr(options, name)!r}")
        if options.dtype not in DTYPE_CHOICES:
            raise ValueError(f"dtype={options.dtype!r} is not a dtype; valid: {', '.join(DTYPE_CHOICES)}")
        return options


def _compile_setting(value: Any) -> bool | str:
    """``compile``: a boolean (also ``"true"``/``"false"`` from a ``model_args`` string) or a compile mode."""
    from globalcom2.models.compiled import COMPILE_MODES

    if isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    if isinstance(value, bool) or value in COMPILE_MODES:
        return value
    raise ValueError(f"compile must be true, false or one of {', '.join(COMPILE_MODES)}; got {value!r}")


def _overrides(value: Any) -> dict[str, Any] | None:
    """``generation_overrides``: a mapping, a JSON object string, or an lmms-eval ``k=v,k=v`` string."""
    if value is None or value == "" or value == {}:
        return None
    if isinstance(value, dict):
        return dict(value)
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("{"):
            import json

            try:
                parsed = json.loads(text)
            except json.JSONDecodeError as err:
                raise ValueError(f"generation_overrides is not valid JSON: {value!r} ({err})") from err
            if isinstance(parsed, dict):
                return parsed
        else:
            return parse_gen_kwargs(text, "generation_overrides")
    raise ValueError(f"generation_overrides must be a mapping or 'k=v,...', got {value!r}")
