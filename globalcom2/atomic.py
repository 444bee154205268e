"""Atomic file writes: the one helper every record, sidecar and result file goes through.

Readers (a resumed sweep, ``aggregate``, a second runner) must see either the old file or the whole new
one, never a part: a temporary file in the same folder, fsynced, then ``os.replace``.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any


def atomic_write_text(path: str | os.PathLike[str], text: str) -> Path:
    """Write ``text`` to ``path`` so that readers see the old file or the whole new one, never a part."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return path


def atomic_write_json(path: str | os.PathLike[str], payload: Any, **dumps: Any) -> Path:
    """``payload`` as indented JSON with sorted keys (non-JSON values as ``str``), written atomically."""
    options = {"indent": 2, "sort_keys": True, "default": str, **dumps}
    return atomic_write_text(path, json.dumps(payload, **options) + "\n")
