"""Compression methods. Importing this package registers every method in :data:`METHODS`."""

from globalcom2.methods import fastv, globalcom2, random_keep, sparsevlm, vanilla  # noqa: F401  (registration side effect)
from globalcom2.methods.base import (
    METHODS,
    CompressionMethod,
    ImageContext,
    ImageStats,
    InLLMMethod,
    LayerStats,
    PreLLMMethod,
    register_method,
)


def list_methods() -> list[str]:
    """Names of the registered compression methods."""
    return METHODS.names()


__all__ = [
    "METHODS",
    "CompressionMethod",
    "ImageContext",
    "ImageStats",
    "InLLMMethod",
    "LayerStats",
    "PreLLMMethod",
    "list_methods",
    "register_method",
]
