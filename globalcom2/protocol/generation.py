"""lmms-eval ``gen_kwargs`` -> ``model.generate`` arguments, and stop-string handling.

Every task YAML carries a ``generation_kwargs`` mapping; lmms-eval always adds ``until`` (default
``["\\n\\n"]``). The rules, chosen to match LLaVA's own evaluation scripts:

* ``do_sample`` given explicitly wins; otherwise sampling is on iff ``temperature > 0`` (LLaVA's
  ``do_sample=True if temperature > 0 else False``). MM-Vet's YAML says ``temperature: 0.2`` together with
  ``do_sample: false``, so it runs greedy, as the LLaVA paper's numbers were produced. A ``temperature > 0``
  or a ``top_p`` below 1 beside ``do_sample: false`` is thus unused: it is listed in ``ignored`` (the plugin warns
  once per task), so that a ``--gen_kwargs temperature=0.7`` merged into such a YAML is not silently greedy.
* Greedy decoding passes no ``temperature``/``top_p`` (they would only trigger transformers warnings).
* ``until`` strings cut the decoded answer at the first occurrence of any of them.
* Keys we do not understand raise, so a task can never silently run with settings we ignored; the only
  exception is ``image_aspect_ratio``, an option of the original LLaVA code base that does not apply
  to transformers' LLaVA-NeXT (always AnyRes), which is ignored with a warning.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

# Extra transformers ``generate`` arguments a task may set; passed through unchanged.
PASSTHROUGH_KEYS = frozenset(
    {"top_k", "repetition_penalty", "length_penalty", "min_new_tokens", "no_repeat_ngram_size"}
)
IGNORED_KEYS = {
    "image_aspect_ratio": "an option of the original LLaVA code; transformers' LLaVA-NeXT always uses AnyRes",
}
HANDLED_KEYS = frozenset({"until", "max_new_tokens", "temperature", "do_sample", "top_p", "num_beams"})


@dataclass(frozen=True)
class GenerationSettings:
    """The generation settings of one request, normalised.

    Attributes:
        until: stop strings; the answer is cut before the first one found.
        max_new_tokens: upper bound on generated tokens.
        do_sample: sample (``True``) or decode greedily / with beams (``False``).
        temperature: sampling temperature; ``None`` when decoding greedily.
        top_p: nucleus sampling mass; ``None`` when decoding greedily or not given.
        num_beams: beam width (1 = no beam search).
        extra: other ``generate`` arguments, passed through unchanged.
        ignored: keys that were present but deliberately ignored.
    """

    until: tuple[str, ...]
    max_new_tokens: int
    do_sample: bool
    temperature: float | None
    top_p: float | None
    num_beams: int
    extra: dict[str, Any] = field(default_factory=dict)
    ignored: tuple[str, ...] = ()

    @classmethod
    def from_gen_kwargs(
        cls, gen_kwargs: dict[str, Any] | None, default_max_new_tokens: int
    ) -> GenerationSettings:
        """Normalise a task's ``generation_kwargs``; unknown keys raise ``ValueError``."""
        kwargs = dict(gen_kwargs or {})
        unknown = sorted(set(kwargs) - HANDLED_KEYS - PASSTHROUGH_KEYS - set(IGNORED_KEYS))
        if unknown:
            raise ValueError(
                f"unsupported generation_kwargs {unknown}; supported: {sorted(HANDLED_KEYS | PASSTHROUGH_KEYS)} "
                f"(ignored: {sorted(IGNORED_KEYS)})"
            )
        until = _stop_strings(kwargs.get("until"))
        max_new_tokens = _as_int(kwargs.get("max_new_tokens", default_max_new_tokens), "max_new_tokens")
        num_beams = _as_int(kwargs.get("num_beams", 1), "num_beams")
        if max_new_tokens < 1 or num_beams < 1:
            raise ValueError(
                f"max_new_tokens and num_beams must be >= 1, got max_new_tokens={max_new_tokens}, num_beams={num_beams}"
            )
        temperature = kwargs.get("temperature")
        temperature = None if temperature is None else _as_float(temperature, "temperature")
        if temperature is not None and not temperature >= 0:  # NaN fails this too
            raise ValueError(
                f"temperature must be >= 0 (0: greedy), got {temperature}; a negative one would decode greedily "
                "without a word"
            )
        if "do_sample" in kwargs and kwargs["do_sample"] is not None:
            do_sample = kwargs["do_sample"]
            if not isinstance(do_sample, bool):
                raise TypeError(f"do_sample must be true or false, got {do_sample!r}")
        else:
            do_sample = temperature is not None and temperature > 0
        if do_sample and temperature is not None and temperature <= 0:
            raise ValueError(
                f"do_sample=true needs temperature > 0 (transformers refuses {temperature}); for greedy "
                "decoding set do_sample=false or leave it out"
            )
        top_p = kwargs.get("top_p")
        top_p = None if top_p is None else _as_float(top_p, "top_p")
        # 0 is what many lmms-eval YAMLs give beside greedy decoding, where it is unused; sampling needs > 0
        if top_p is not None and not (0 < top_p <= 1 or (top_p == 0 and not do_sample)):
            raise ValueError(
                f"top_p must be in (0, 1] when sampling (0 is accepted only beside greedy decoding), got {top_p}"
            )
        return cls(
            until=until,
            max_new_tokens=max_new_tokens,
            do_sample=do_sample,
            temperature=temperature if do_sample else None,
            top_p=top_p if do_sample else None,
            num_beams=num_beams,
            extra={k: kwargs[k] for k in sorted(PASSTHROUGH_KEYS & set(kwargs))},
            ignored=tuple(
                sorted(
                    (set(IGNORED_KEYS) & set(kwargs)) | _unused_sampling_keys(do_sample, temperature, top_p)
                )
            ),
        )

    def generate_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``model.generate`` (without the inputs)."""
        out: dict[str, Any] = {
            "max_new_tokens": self.max_new_tokens,
            "do_sample": self.do_sample,
            "num_beams": self.num_beams,
            **self.extra,
        }
        if self.do_sample:
            if self.temperature is not None:
                out["temperature"] = self.temperature
            if self.top_p is not None:
                out["top_p"] = self.top_p
        return out

    def key(self) -> str:
        """A canonical string: requests with equal keys can share a batch."""
        return json.dumps(
            {"until": self.until, **self.generate_kwargs()}, sort_keys=True, default=str, ensure_ascii=False
        )


def _unused_sampling_keys(do_sample: bool, temperature: float | None, top_p: float | None) -> set[str]:
    """The sampling settings given but unused because decoding is greedy (``temperature: 0`` and
    ``top_p: 1.0``, which most lmms-eval YAMLs carry beside ``do_sample: false``, change nothing, so they
    are not unused settings)."""
    if do_sample:
        return set()
    unused = {"temperature"} if temperature is not None and temperature > 0 else set()
    return unused | ({"top_p"} if top_p is not None and top_p != 1.0 else set())


def cut_at_stop(text: str, until: tuple[str, ...]) -> tuple[str, str | None]:
    """``text`` up to (excluding) the earliest stop string, and the stop string that matched (or ``None``)."""
    best, match = len(text), None
    for stop in until:
        index = text.find(stop)
        if 0 <= index < best:
            best, match = index, stop
    return text[:best], match


def _stop_strings(until: Any) -> tuple[str, ...]:
    if until is None:
        return ()
    if isinstance(until, str):
        until = [until]
    if not isinstance(until, (list, tuple)) or not all(isinstance(s, str) for s in until):
        raise TypeError(f"`until` must be a string or a list of strings, got {until!r}")
    if "" in until:  # it would match before the first token; dropping it would hide a typo
        raise ValueError(f"`until` holds an empty stop string, which matches at once: {list(until)!r}")
    return tuple(until)


def _as_int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise TypeError(f"{name} must be an integer, got {value!r}")
    return value


def _as_float(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {value!r}")
    return float(value)


def parse_key_values(text: str, raw_keys: frozenset[str] = frozenset()) -> dict[str, Any]:
    """An lmms-eval ``k=v,k=v`` string (``--model_args``, ``--gen_kwargs``) as a mapping, values typed as
    lmms-eval types them (``true``/``false``, integers, numbers, else strings; lmms_eval/utils.py
    ``simple_parse_args_string`` in 0.7.3), except the ``raw_keys``, kept as written; a comma inside
    ``[...]`` or ``{...}`` belongs to the value.

    Raises:
        ValueError: an entry without ``=`` or with an empty key (the message names it), or a key twice.
    """
    parsed: dict[str, Any] = {}
    for entry in _split_top_level(text.strip()):
        if not entry.strip():
            continue
        key, sep, value = entry.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ValueError(f"{entry.strip()!r} is not key=value")
        if key in parsed:
            raise ValueError(f"{key!r} is given twice")
        parsed[key] = value.strip() if key in raw_keys else _typed(value.strip())
    return parsed


def _split_top_level(text: str) -> list[str]:
    parts, depth, current = [], 0, []
    for char in text:
        depth += char in "[{"
        depth -= char in "]}"
        if char == "," and depth == 0:
            parts.append("".join(current))
            current = []
        else:
            current.append(char)
    parts.append("".join(current))
    return parts


def _typed(value: str) -> Any:
    if value.lower() in ("true", "false"):
        return value.lower() == "true"
    for kind in (int, float):
        try:
            return kind(value)
        except ValueError:
            pass
    return value


#: Generation settings that are counts, and those that are real numbers: how :func:`canonical_gen_kwargs`
#: types them.
INT_KEYS = frozenset({"max_new_tokens", "num_beams", "top_k", "min_new_tokens", "no_repeat_ngram_size"})
FLOAT_KEYS = frozenset({"temperature", "top_p", "repetition_penalty", "length_penalty"})


def canonical_gen_kwargs(settings: dict[str, Any]) -> dict[str, Any]:
    """``settings`` with each number typed by its key: a whole float count as an ``int`` (``16.0`` -> ``16``)
    and an integer real as a ``float`` (``0`` -> ``0.0``), as :class:`GenerationSettings` reads them, so one
    set of settings has one spelling (a cell's identity). ``TypeError`` for a count that is not whole."""
    out = dict(settings)
    for key, value in settings.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            continue  # a wrong type is GenerationSettings' to name
        if key in INT_KEYS:
            out[key] = _as_int(value, key)
        elif key in FLOAT_KEYS:
            out[key] = float(value)
    return out


def format_gen_kwargs(settings: dict[str, Any], name: str = "gen_kwargs") -> str:
    """``settings`` as lmms-eval's ``k=v,k=v`` string, keys sorted, which :func:`parse_gen_kwargs` reads back
    to the same mapping; ``ValueError`` naming a value that string cannot hold (a list, a ``,`` or ``=``)."""
    parts = []
    for key, value in sorted(settings.items()):
        text = str(value).lower() if isinstance(value, bool) else str(value)
        if (
            not isinstance(value, (bool, int, float, str))
            or any(c in text for c in ",=[]{}")
            or (isinstance(value, str) and _typed(text) != value)
        ):
            raise ValueError(
                f"{name}: {key}={value!r} cannot be written as lmms-eval's 'key=value,key=value' (numbers, "
                "true/false and plain words only)"
            )
        parts.append(f"{key}={text}")
    text = ",".join(parts)
    if parse_key_values(text) != dict(settings):  # e.g. a value with leading or trailing spaces
        raise ValueError(
            f"{name}: {settings!r} does not survive lmms-eval's 'key=value,key=value' (values are stripped "
            "and typed); numbers, true/false and plain words only"
        )
    return text


def parse_gen_kwargs(text: str, name: str = "gen_kwargs") -> dict[str, Any]:
    """lmms-eval's ``k=v,k=v`` generation string as a dict, or ``ValueError`` naming the bad part."""
    try:
        parsed = parse_key_values(text)
    except ValueError as err:
        raise ValueError(f"{name}={text!r} is not of the form 'key=value,key=value' ({err})") from None
    GenerationSettings.from_gen_kwargs(parsed, 1)  # unknown keys and bad values raise here
    return parsed
