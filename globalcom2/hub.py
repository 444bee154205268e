"""Whether the Hugging Face hub may be used: the one reading of the offline switches.

Two switches matter: ``HF_HUB_OFFLINE`` (``from_pretrained``, ``hf_hub_download``) and
``HF_DATASETS_OFFLINE`` (``datasets``). huggingface_hub reads ``HF_HUB_OFFLINE`` once, when it is imported,
into ``huggingface_hub.constants.HF_HUB_OFFLINE``, and every download obeys that constant from then on.
So a switch counts as on when the environment says so now *or* the library latched it on at import:
setting ``HF_HUB_OFFLINE=0`` later in the same process cannot make the hub reachable, and we do not
pretend it can. ``make data`` sets the switches off before Python starts (``Makefile``), so its
downloads see an online hub.

Values are parsed as huggingface_hub parses them (``constants._is_true``: ``1``, ``ON``, ``YES``,
``TRUE``, any case).
"""

from __future__ import annotations

import os

HUB_OFFLINE = "HF_HUB_OFFLINE"
DATASETS_OFFLINE = "HF_DATASETS_OFFLINE"
OFFLINE_FLAGS = (HUB_OFFLINE, DATASETS_OFFLINE)
_TRUE_VALUES = {"1", "ON", "YES", "TRUE"}


def _env_on(name: str) -> bool:
    return os.environ.get(name, "").strip().upper() in _TRUE_VALUES


def offline_flags() -> list[str]:
    """The offline switches that are on, in :data:`OFFLINE_FLAGS` order (empty: the hub may be used)."""
    from huggingface_hub import constants

    on = []
    if _env_on(HUB_OFFLINE) or bool(constants.HF_HUB_OFFLINE):
        on.append(HUB_OFFLINE)
    if _env_on(DATASETS_OFFLINE):
        on.append(DATASETS_OFFLINE)
    return on


def hub_offline() -> bool:
    """``True`` when model files may not be fetched from the hub (``HF_HUB_OFFLINE`` is on)."""
    return HUB_OFFLINE in offline_flags()
