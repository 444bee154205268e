"""Whether the Hugging Face hub may be used: the one reading of the offline switches.

Two switches matter: ``HF_HUB_OFFLINE`` (``from_pretrained``, ``hf_hub_download``) and
``HF_DATASETS_OFFLINE`` (``datasets``). huggingface_hub decides once, when it is imported, from
``HF_HUB_OFFLINE`` or else ``TRANSFORMERS_OFFLINE`` (``huggingface_hub/constants.py``), into
``huggingface_hub.constants.HF_HUB_OFFLINE``, and every download obeys that constant from then on. So the
hub counts as offline when the environment says so now *or* the library latched it at import: setting
``HF_HUB_OFFLINE=0`` later in the same process cannot make the hub reachable, and we do not pretend it can.
``make data`` sets the switches off before Python starts (``Makefile``), so its downloads see an online
hub.

Values are parsed as huggingface_hub parses them (``constants._is_true``: ``1``, ``ON``, ``YES``, ``TRUE``,
in any case, and nothing else).
"""

from __future__ import annotations

import os

HUB_OFFLINE = "HF_HUB_OFFLINE"
DATASETS_OFFLINE = "HF_DATASETS_OFFLINE"
OFFLINE_FLAGS = (HUB_OFFLINE, DATASETS_OFFLINE)
_TRUE_VALUES = {"1", "ON", "YES", "TRUE"}


def _env_on(name: str) -> bool:
    return os.environ.get(name, "").upper() in _TRUE_VALUES


def _latched_at_import() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def hub_offline() -> bool:
    """``True`` when model files may not be fetched from the hub."""
    return _env_on(HUB_OFFLINE) or _latched_at_import()


def offline_reasons() -> list[str]:
    """Why the hub or the datasets library is offline, one phrase per switch that is on (empty: online)."""
    reasons = []
    if _env_on(HUB_OFFLINE):
        reasons.append(f"{HUB_OFFLINE} is set")
    elif _latched_at_import():
        reasons.append(
            f"huggingface_hub was imported with {HUB_OFFLINE} or TRANSFORMERS_OFFLINE on, which it keeps "
            "for the life of the process"
        )
    if _env_on(DATASETS_OFFLINE):
        reasons.append(f"{DATASETS_OFFLINE} is set")
    return reasons
