"""The lmms-eval entry point (group ``lmms_eval.models``): registers ``globalcom2_llava_next``.

Kept apart from ``globalcom2.lmms.plugin`` on purpose. lmms-eval loads entry points while
``lmms_eval.models`` is being imported, and importing the plugin module imports ``lmms_eval.models``:
with the manifest in the plugin module, importing the plugin first would load this entry point
half-initialised, and lmms-eval would skip it with only a warning ("model not found" later).
This module imports nothing from lmms-eval until it is called.

The entry point exists only where the project is installed (``pip install -e .`` writes it into the
package metadata). Run from a checkout on ``PYTHONPATH`` alone, as on a prepared GPU machine with carried
wheels, lmms-eval never hears of the model; :func:`register` adds the same manifest by hand, and the CLI
calls it before it resolves ``--model``.
"""

from __future__ import annotations

from typing import Any

MODEL_ID = "globalcom2_llava_next"
CLASS_PATH = "globalcom2.lmms.plugin.GlobalCom2LlavaNext"


def manifests() -> list[Any]:
    """``[ModelManifest]`` for lmms-eval's registry (a simple-type model)."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return [ModelManifest(model_id=MODEL_ID, simple_class_path=CLASS_PATH)]


def register() -> None:
    """Add :func:`manifests` to lmms-eval's registry where its entry point did not (idempotent: the
    registry merges an identical manifest into the one already there)."""
    from lmms_eval.models import MODEL_REGISTRY_V2

    for manifest in manifests():
        MODEL_REGISTRY_V2.register_manifest(manifest)
