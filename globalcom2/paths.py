"""The project root, and the folders derived from it: the one place a module finds the checkout.

``configs/paths/default.yaml`` states the same folders for Hydra (``${project_root:}`` resolves to
:data:`PROJECT_ROOT`); ``globalcom2.run`` exports its ``data_dir`` and ``tasks_dir`` through
:data:`DATA_DIR_ENV` and :data:`TASKS_DIR_ENV`, so an override reaches every process of a cell.
"""

from __future__ import annotations

import os
from pathlib import Path

#: The folder holding ``pyproject.toml`` (the harness is installed editable: ``make install``).
PROJECT_ROOT = Path(__file__).resolve().parents[1]
DATA_DIR_ENV = "GLOBALCOM2_DATA_DIR"
TASKS_DIR_ENV = "GLOBALCOM2_TASKS_DIR"
CACHE_DIR_ENV = "GLOBALCOM2_CACHE"


def data_dir() -> Path:
    """``$GLOBALCOM2_DATA_DIR`` or ``<project root>/data``."""
    value = os.environ.get(DATA_DIR_ENV, "").strip()
    return Path(value).expanduser().resolve() if value else PROJECT_ROOT / "data"


def cache_dir() -> Path:
    """``$GLOBALCOM2_CACHE`` or ``~/.cache/globalcom2``: what the harness builds once and reuses (the random
    tiny checkpoints, the demo dataset)."""
    return Path(os.environ.get(CACHE_DIR_ENV, Path.home() / ".cache" / "globalcom2"))


def tasks_dir() -> Path:
    """``$GLOBALCOM2_TASKS_DIR`` or ``<project root>/tasks`` (pass it to lmms-eval as ``--include_path``)."""
    value = os.environ.get(TASKS_DIR_ENV, "").strip()
    folder = Path(value).expanduser().resolve() if value else PROJECT_ROOT / "tasks"
    if not folder.is_dir():
        raise FileNotFoundError(
            f"task folder {folder} not found; the harness must be installed editable (`make install`)"
            + (f", or {TASKS_DIR_ENV} must name an existing folder" if value else "")
        )
    return folder
