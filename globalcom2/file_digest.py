"""A file's SHA-256, cached by the file's identity: for what a cell's identity names by content (a checkpoint's
files, ``globalcom2.models.fingerprint``; a benchmark's data files, ``globalcom2.data.local``).

Hashing a 7B checkpoint or a benchmark's image shards takes seconds to tens of seconds, so each digest is
kept under ``<cache_dir>/sha256/``, keyed by the file's path, device, inode, size, modification and change
times (ns), read from the open file before and after hashing (a file that changes while it is hashed is not
cached). ``ctime`` cannot be set by ``cp -p``, ``rsync -t`` or ``touch``, so a file rewritten later gets a new
key; the blind spot is a same-size rewrite within one tick of the filesystem's clock.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
from pathlib import Path

from globalcom2.atomic import atomic_write_text
from globalcom2.paths import cache_dir

_CHUNK = 8 << 20  # bytes read at a time while hashing
_HEX64 = re.compile(r"[0-9a-f]{64}")  # a well-formed digest-cache entry


def file_sha256(path: Path) -> str:
    """The file's SHA-256, from the digest cache when the open file's identity and times match an entry."""
    with path.open("rb") as handle:
        before = _stat_key(os.fstat(handle.fileno()))
        entry = cache_dir() / "sha256" / hashlib.sha256(f"{path.resolve()}\0{before}".encode()).hexdigest()
        with contextlib.suppress(OSError, ValueError):
            digest = entry.read_text(encoding="ascii").strip()
            if _HEX64.fullmatch(digest):
                return digest
        hasher = hashlib.sha256()
        while block := handle.read(_CHUNK):
            hasher.update(block)
        digest = hasher.hexdigest()
        if _stat_key(os.fstat(handle.fileno())) == before:  # unchanged while read: safe to remember
            with contextlib.suppress(OSError):  # a read-only cache costs a re-hash, never a wrong digest
                entry.parent.mkdir(parents=True, exist_ok=True)
                atomic_write_text(entry, digest)
    return digest


def _stat_key(stat: os.stat_result) -> str:
    return f"{stat.st_dev}:{stat.st_ino}:{stat.st_size}:{stat.st_mtime_ns}:{stat.st_ctime_ns}"
