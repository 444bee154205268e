"""The Hugging Face hub: whether it may be used (the one reading of the offline switches), and which file a
hub id and revision resolve to (:func:`hub_file`, shared by the config check and the weights identity).

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
from pathlib import Path

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


def hub_file(repo: str, filename: str, revision: str | None = None) -> Path:
    """``filename`` of hub repository ``repo`` at ``revision`` (a branch, tag or commit; ``None``: ``main``),
    found the way ``from_pretrained`` finds it, so that what we read is what it will load.

    Offline, the local cache (``refs/<revision>``, or ``snapshots/<commit>`` for a commit). Online,
    ``hf_hub_download``: the hub's ``revision``, which also moves the cache's ``refs/<revision>`` to it, or the
    cache when the hub cannot be reached (``huggingface_hub/file_download.py``, ``hf_hub_download``).

    Raises:
        ValueError: ``repo`` is not a valid hub id (``owner/name``).
        FileNotFoundError: not cached while offline, or neither on the hub nor in the cache.
    """
    from huggingface_hub import hf_hub_download, try_to_load_from_cache
    from huggingface_hub.utils import validate_repo_id

    validate_repo_id(repo)  # HFValidationError is a ValueError
    at = f"{repo}@{revision}" if revision else repo
    if hub_offline():
        cached = try_to_load_from_cache(repo, filename, revision=revision)
        if isinstance(cached, str):
            return Path(cached)
        if cached is not None:  # the cache remembers the hub saying the file does not exist
            raise FileNotFoundError(f"{at} has no {filename}, as the hub said when it was last asked")
        short = revision is not None and len(revision) < 40 and _is_hex(revision)
        raise FileNotFoundError(
            f"{filename} of {at} is not in the local Hugging Face cache and the hub is offline "
            f"({offline_reasons()[0]})"  # the hub's switch comes first
            + ("; offline, a commit must be given in full (40 characters)" if short else "")
        )
    try:
        return Path(hf_hub_download(repo, filename, revision=revision))
    except Exception as err:  # network, authentication, a missing repo or revision: none is readable
        raise FileNotFoundError(f"cannot read {filename} of {at} from the hub or the cache: {err}") from err


def snapshot_commit(path: Path) -> str:
    """The commit of the cache snapshot ``path`` (a file ``hub_file`` returned) lies in:
    ``…/models--owner--name/snapshots/<commit>/<file>``.

    Raises:
        ValueError: ``path`` is not inside a Hugging Face cache snapshot.
    """
    snapshot = path.parent
    if snapshot.parent.name != "snapshots" or not snapshot.name:
        raise ValueError(f"{path} is not in a Hugging Face cache snapshot")
    return snapshot.name


def hub_dataset_commit(repo: str, revision: str | None = None) -> str:
    """The commit hub dataset ``repo`` at ``revision`` (``None``: ``main``) resolves to, as ``datasets``
    resolves it to load it: the hub's, online (``HfApi.dataset_info``), else, offline or when the hub cannot
    be reached, the local cache's ``refs/<revision>`` (``datasets--owner--name/refs/main``, which a download
    writes). A full commit resolves to itself.

    Raises:
        ValueError: ``repo`` is not a valid hub id.
        FileNotFoundError: neither the hub nor the cache names a commit.
    """
    from huggingface_hub import HfApi, constants
    from huggingface_hub.utils import validate_repo_id

    validate_repo_id(repo)
    wanted = revision or "main"
    if len(wanted) == 40 and _is_hex(wanted):
        return wanted
    offline = hub_offline() or _env_on(DATASETS_OFFLINE)
    hub_said = ""
    if not offline:
        try:
            sha = HfApi().dataset_info(repo, revision=wanted).sha
            if sha:
                return sha
            hub_said = "the hub named no commit"
        except Exception as err:  # network, authentication, a missing repo or revision: try the cache
            hub_said = f"the hub said: {err}"
    ref = Path(constants.HF_HUB_CACHE) / f"datasets--{repo.replace('/', '--')}" / "refs" / wanted
    try:
        return ref.read_text(encoding="utf-8").strip()
    except OSError:
        where = f"offline: {', '.join(offline_reasons())}" if offline else hub_said
        raise FileNotFoundError(
            f"cannot tell which commit of dataset {repo}@{wanted} would load: not in the local cache ({ref}), "
            f"{where}"
        ) from None


def _is_hex(text: str) -> bool:
    """Whether ``text`` is lowercase hex, as a git commit (or its prefix) is written."""
    return all(c in "0123456789abcdef" for c in text)
