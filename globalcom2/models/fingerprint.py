"""What a checkpoint's weights are, for a cell's identity: the content the loader reads, not its name.

A results store keyed on ``model.pretrained`` alone serves a cell computed with other weights once the
folder behind the name changes: a retrained ``tiny-trained`` after a ``git pull``, a re-converted local
folder, a new revision of a hub repository. :func:`checkpoint_identity` names the content instead, so any
of these is a new cell (``globalcom2/cells.py``, ``globalcom2/store.py``):

* **A hub id** (``llava-hf/llava-v1.6-vicuna-7b-hf``): the repository and the commit that
  ``from_pretrained`` will load. A git commit fixes every file of the repository. Offline (the Makefile's
  default), that is the cached snapshot (``…/snapshots/<commit>/``); online, it is the hub's current
  ``main``, which ``from_pretrained`` downloads, falling back to the cached snapshot when the hub cannot
  be reached, as transformers does.
* **A folder** (a local path, ``tiny-trained``, and ``tiny[:seed]``, which is built into a folder on first
  use): the SHA-256 of each file in it that is not hidden. A 7B checkpoint (about 14 GB) takes seconds to
  tens of seconds to hash, so each file's digest is kept under ``<cache_dir>/sha256/``, keyed by the
  file's resolved path, size, modification time (ns) and inode: a file rewritten later gets a new key.
  The one blind spot is a rewrite in place to the same size within one tick of the filesystem's clock.
* **Random weights** (``random_init``): ``None``. They are drawn from the architecture and seed that the
  identity already holds.

A checkpoint that cannot be found yet gets ``{"unresolved": <name>}``: a dry run still lists its cell, and
a real run is stopped by the checkpoint check that follows (``CellSpec.check_environment``).
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from globalcom2.atomic import atomic_write_text
from globalcom2.hub import hub_offline
from globalcom2.models.base import tiny_seed
from globalcom2.models.preload import named_checkpoint
from globalcom2.models.tiny import tiny_checkpoint
from globalcom2.paths import cache_dir

_CHUNK = 8 << 20  # bytes read at a time while hashing


def checkpoint_identity(pretrained: str, *, random_init: bool = False) -> dict[str, Any] | None:
    """The content ``load_llava_next(pretrained, random_init=random_init)`` loads, as plain JSON values.

    Returns:
        ``None`` for random weights; ``{"hub": repo, "commit": sha}`` for a hub id;
        ``{"files": {name: sha256}}`` for a folder; ``{"unresolved": name}`` when neither is found.
    """
    if random_init:
        return None
    folder = _folder(pretrained)
    if folder is not None:
        return {"files": folder_digests(folder)}
    commit = _hub_commit(pretrained)
    return {"hub": pretrained, "commit": commit} if commit else {"unresolved": pretrained}


def folder_digests(folder: Path) -> dict[str, str]:
    """``{file name: SHA-256}`` of every regular file directly in ``folder`` whose name does not start with
    a dot (``hf download --local-dir`` keeps its bookkeeping in ``.cache/``)."""
    return {
        path.name: file_sha256(path)
        for path in sorted(folder.iterdir())
        if not path.name.startswith(".") and path.is_file()
    }


def file_sha256(path: Path) -> str:
    """The file's SHA-256, read from the digest cache when the file is unchanged since it was hashed."""
    resolved = path.resolve()
    stat = resolved.stat()
    key = hashlib.sha256(
        f"{resolved}\0{stat.st_size}\0{stat.st_mtime_ns}\0{stat.st_ino}".encode()
    ).hexdigest()
    cached = cache_dir() / "sha256" / key
    try:
        digest = cached.read_text(encoding="ascii").strip()
        if len(digest) == 64:
            return digest
    except OSError:
        pass
    hasher = hashlib.sha256()
    with resolved.open("rb") as handle:
        while block := handle.read(_CHUNK):
            hasher.update(block)
    digest = hasher.hexdigest()
    try:
        cached.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(cached, digest)
    except OSError:
        pass  # a read-only cache costs a re-hash next time, never a wrong digest
    return digest


def _folder(pretrained: str) -> Path | None:
    """The folder ``pretrained`` loads from, if it names one (``tiny[:seed]`` is built on first use)."""
    seed = tiny_seed(pretrained)
    if seed is not None:
        return tiny_checkpoint(seed)
    try:
        named = named_checkpoint(pretrained)
    except FileNotFoundError:
        return None
    if named is not None:
        return named
    path = Path(pretrained).expanduser()
    return path if path.is_dir() else None


def _hub_commit(repo: str) -> str | None:
    """The commit of ``repo`` that ``from_pretrained`` loads: the hub's ``main`` when online and reachable,
    else the cached snapshot's; ``None`` when neither is known (or ``repo`` is no hub id)."""
    from huggingface_hub import try_to_load_from_cache
    from huggingface_hub.errors import HFValidationError

    if not hub_offline():
        from huggingface_hub import HfApi

        try:
            sha = HfApi().model_info(repo).sha
            if sha:
                return sha
        except Exception:  # unreachable, private, missing: from_pretrained falls back to the cache too
            pass
    try:
        cached = try_to_load_from_cache(repo, "config.json")
    except HFValidationError:
        return None
    if isinstance(cached, str) and Path(cached).parent.parent.name == "snapshots":
        return Path(cached).parent.name
    return None
