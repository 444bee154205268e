"""The handle ``attach`` returns: what is attached, what it did, and how to take it off."""

from __future__ import annotations

from collections.abc import Callable
from types import TracebackType

from globalcom2.methods.base import CompressionMethod, ImageStats, LayerStats


class Attachment:
    """A compression method attached to one model instance.

    Use it as a context manager or call :meth:`remove`; afterwards the model is exactly the unmodified
    model again (same classes, same attributes, no hooks).

    Attributes:
        method: the attached method with its hyperparameters.
        stats: realised counts since attaching (or since ``stats.clear()``): one :class:`ImageStats` per image for
            a pre-LLM method, one :class:`LayerStats` per batch row and prefill for an in-LLM method.
    """

    def __init__(
        self,
        method: CompressionMethod,
        stats: list[ImageStats] | list[LayerStats],
        detach: Callable[[], None],
    ) -> None:
        self.method = method
        self.stats = stats
        self._detach: Callable[[], None] | None = detach

    @property
    def attached(self) -> bool:
        return self._detach is not None

    def remove(self) -> None:
        """Restore the model. Calling it twice is an error, so a double removal never goes unnoticed."""
        if self._detach is None:
            raise RuntimeError(f"{self.method.name!r} was already removed from this model")
        detach, self._detach = self._detach, None
        detach()

    def __enter__(self) -> Attachment:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self.attached:
            self.remove()

    def __repr__(self) -> str:
        state = "attached" if self.attached else "removed"
        return f"<Attachment {self.method!r} {state}>"
