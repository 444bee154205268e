"""The lmms-eval entry point (group ``lmms_eval.models``): registers ``globalcom2_llava_next``.

Kept apart from ``globalcom2.lmms.plugin`` on purpose. lmms-eval loads entry points while
``lmms_eval.models`` is being imported, and importing the plugin module imports ``lmms_eval.models``:
with the manifest in the plugin module, importing the plugin first would load this entry point
half-initialised, and lmms-eval would skip it with only a warning ("model not found" later).
This module imports nothing from lmms-eval until it is called.
"""

from __future__ import annotations

from typing import Any

MODEL_ID = "globalcom2_llava_next"
CLASS_PATH = "globalcom2.lmms.plugin.GlobalCom2LlavaNext"


def manifests() -> list[Any]:
    """``[ModelManifest]`` for lmms-eval's registry (a simple-type model)."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return [ModelManifest(model_id=MODEL_ID, simple_class_path=CLASS_PATH)]
