"""What a checkpoint's weights are, for a cell's identity: the content the loader reads, not its name.

A results store keyed on ``model.pretrained`` alone serves a cell computed with other weights once the
folder behind the name changes: a retrained ``tiny-trained`` after a ``git pull``, a re-converted local
folder, a new revision of a hub repository. :func:`checkpoint_identity` names the content instead, so any
of these is a new cell (``globalcom2/cells.py``, ``globalcom2/store.py``):

* **A hub id** (``llava-hf/llava-v1.6-vicuna-7b-hf``, with ``model.revision`` if one is given): the
  repository and the commit that ``from_pretrained`` will load, a git commit fixing every file of the
  repository. It is resolved as transformers resolves it (``loader.hub_commit``, :func:`globalcom2.hub.hub_file`): online, the
  hub's ``main`` (or the given branch or tag), falling back to the cached snapshot when the hub cannot be
  reached; offline (the Makefile's default), the cached snapshot (``…/snapshots/<commit>/``).
  ``globalcom2.run`` then loads that commit (``load_llava_next(revision=commit)``), so a ``main`` that moves
  between the two reads cannot put other weights under this identity.
* **A folder** (a local path, ``tiny-trained``, and ``tiny[:seed]``, which is built into a folder on first
  use): the SHA-256 of each file in it that the loaders read (:data:`LOADED_SUFFIXES`: weights, configs,
  tokenizer and templates; not logs, optimiser states or READMEs). A 7B checkpoint (about 14 GB) takes
  seconds to tens of seconds to hash, so each file's digest is kept under ``<cache_dir>/sha256/``, keyed
  by the file's device, inode, size, modification and change times (ns), read from the open file before
  and after hashing (a file that changes while it is hashed is not cached). ``ctime`` cannot be set by
  ``cp -p``, ``rsync -t`` or ``touch``, so a file rewritten later gets a new key; the blind spot is a
  same-size rewrite within one tick of the filesystem's clock (seconds on some network filesystems).
* **Random weights** (``random_init``): ``None``. They are drawn from the architecture and seed that the
  identity already holds.

A checkpoint that cannot be resolved gets ``{"unresolved": <name>, "reason": …}``: a dry run still lists
its cell, and ``globalcom2.run`` refuses to run and store a cell whose weights it cannot name.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from globalcom2.file_digest import file_sha256
from globalcom2.models.loader import hub_commit, resolve_checkpoint

#: What ``from_pretrained`` and ``AutoProcessor.from_pretrained`` read from a folder: weights, configs,
#: tokenizer files (``tokenizer.json``, ``tokenizer.model``, ``vocab.json``, ``merges.txt``) and templates.
LOADED_SUFFIXES = (".safetensors", ".bin", ".json", ".jinja", ".model", ".txt", ".tiktoken")

#: Files with those suffixes that no loader reads: training records and states (the project's own
#: ``training_record.json``, transformers' ``Trainer`` and accelerate's checkpoints, a training log). Left in,
#: an edit to a record's prose, with the weights unchanged, would re-run every cell of the model. A file not
#: named here is hashed: an unknown file costs a re-run, never a stale cell.
NOT_LOADED = frozenset(
    {
        "training_record.json",
        "trainer_state.json",
        "training_args.bin",
        "optimizer.bin",
        "scheduler.bin",
        "scaler.bin",
        "log.txt",
    }
)


def checkpoint_identity(
    pretrained: str, *, random_init: bool = False, revision: str | None = None
) -> dict[str, Any] | None:
    """The content ``load_llava_next(pretrained, random_init=random_init, revision=revision)`` loads, as plain
    JSON values. ``revision`` (a hub id's branch, tag or commit) is resolved to its commit, so two names of
    one commit are one identity.

    Returns:
        ``None`` for random weights; ``{"hub": repo, "commit": sha}`` for a hub id;
        ``{"files": {name: sha256}}`` for a folder; ``{"unresolved": name, "reason": why}`` otherwise.
    """
    if random_init:
        return None
    try:
        folder = _folder(pretrained)
        if folder is not None:
            return {"files": folder_digests(folder)}
        return {"hub": pretrained, "commit": hub_commit(pretrained, revision)}
    # an unreadable file, a malformed tiny seed, a hub id not cached and unreachable (or missing, gated, invalid)
    except (OSError, ValueError) as err:
        return {"unresolved": pretrained, "reason": f"{type(err).__name__}: {err}"}


def folder_digests(folder: Path) -> dict[str, str]:
    """``{file name: SHA-256}`` of every regular file directly in ``folder`` that the loaders read
    (:data:`LOADED_SUFFIXES` less :data:`NOT_LOADED`; hidden files such as ``hf download --local-dir``'s
    ``.cache/`` excluded)."""
    return {
        path.name: file_sha256(path)
        for path in sorted(folder.iterdir())
        if not path.name.startswith(".")
        and path.suffix in LOADED_SUFFIXES
        and path.name not in NOT_LOADED
        and path.is_file()
    }


def _folder(pretrained: str) -> Path | None:
    """The folder ``load_llava_next`` reads ``pretrained`` from (its own :func:`resolve_checkpoint`:
    ``tiny[:seed]`` built on first use, ``tiny-trained`` or its ``FileNotFoundError``), if it is one."""
    path = Path(resolve_checkpoint(pretrained))
    return path if path.is_dir() else None
