"""A small name -> class registry with loud, helpful errors.

Pattern after EleutherAI/lm-evaluation-harness `lm_eval/api/registry.py` (one generic class, one instance
per kind, "did you mean" errors) and ModelTC/LightCompress `llmc/utils/registry_factory.py` (refuse
duplicate names). Written from scratch for this project.
"""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Callable
from typing import Any, Generic, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    """Maps names to classes (or factories) of one kind.

    Args:
        kind: what is registered, used in error messages ("compression method").
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, type[T]] = {}

    def register(self, name: str) -> Callable[[type[T]], type[T]]:
        """Class decorator that registers ``cls`` under ``name``; duplicate names are refused."""

        def decorator(cls: type[T]) -> type[T]:
            if name in self._entries and self._entries[name] is not cls:
                raise KeyError(
                    f"{self.kind} {name!r} is already registered to {self._entries[name].__qualname__}"
                )
            self._entries[name] = cls
            return cls

        return decorator

    def names(self) -> list[str]:
        """Registered names, sorted."""
        return sorted(self._entries)

    def get(self, name: str) -> type[T]:
        """The class registered under ``name``; an unknown name lists the valid ones."""
        if not isinstance(name, str) or name not in self._entries:
            hint = ""
            if isinstance(name, str):
                close = difflib.get_close_matches(name, self._entries, n=3)
                hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
            raise ValueError(f"unknown {self.kind} {name!r}.{hint} Registered: {', '.join(self.names())}.")
        return self._entries[name]

    def create(self, name: str, **params: Any) -> T:
        """Instantiate ``name`` with keyword ``params``; unknown or missing parameters list the accepted ones."""
        cls = self.get(name)
        signature = [
            p
            for p in inspect.signature(cls).parameters.values()
            if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)
        ]
        accepted = [p.name for p in signature]
        unknown = sorted(set(params) - set(accepted))
        if unknown:
            raise ValueError(
                f"{self.kind} {name!r} does not take {', '.join(map(repr, unknown))}. "
                f"Accepted parameters: {', '.join(accepted) or '(none)'}."
            )
        missing = [p.name for p in signature if p.default is p.empty and p.name not in params]
        if missing:
            raise ValueError(
                f"{self.kind} {name!r} needs {', '.join(missing)} (e.g. retention_ratio=0.25, the kept "
                f"fraction in (0, 1]). Accepted parameters: {', '.join(accepted)}."
                if missing == ["retention_ratio"]
                else f"{self.kind} {name!r} needs {', '.join(missing)}. Accepted parameters: {', '.join(accepted)}."
            )
        return cls(**params)

    def __contains__(self, name: object) -> bool:
        return name in self._entries
