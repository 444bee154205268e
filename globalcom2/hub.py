"""The Hugging Face hub: whether it may be used (the one reading of the offline switches), which file a
hub id and revision resolve to (:func:`hub_file`, shared by the config check and the weights identity), and
which commit of a hub dataset ``datasets`` loads (:func:`hub_dataset_commit`, for the data identity).

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


def hub_dataset_commit(
    repo: str, config: str | None, revision: str | None = None, *, cache_dir: str | Path | None = None
) -> str:
    """The commit of hub dataset ``repo`` (configuration ``config``) that ``datasets.load_dataset`` loads when
    asked for ``revision`` (``None``: ``main``), with ``cache_dir`` its cache (``None``: ``datasets``'
    default).

    Online, the hub's commit for that revision (``HfApi.dataset_info``): ``datasets`` pins the same one as it
    starts (``datasets/load.py``, ``dataset_module_factory``: "We fix the commit_hash"), and a full commit is
    itself. Offline, or when the hub cannot be reached, ``datasets`` asks for no revision at all: it loads the
    most recently modified copy of the configuration in its own cache (:func:`datasets_cached_commit`), and
    that is the answer, whatever the hub cache's ``refs/main`` says. A ``revision`` asked for explicitly must
    then be that copy: a full commit equal to it, or a branch or tag whose hub-cache ref names it (a ref
    written when the branch or tag itself was downloaded; a run that pinned the commit writes none).

    Raises:
        ValueError: ``repo`` is not a valid hub id.
        FileNotFoundError: the hub cannot be asked and ``datasets`` has no cached copy, or the copy it would
            load is not the ``revision`` asked for.
    """
    from huggingface_hub import HfApi
    from huggingface_hub.utils import validate_repo_id

    validate_repo_id(repo)
    wanted = revision or "main"
    offline = hub_offline() or _env_on(DATASETS_OFFLINE)
    if not offline:
        if is_full_commit(wanted):
            return wanted
        try:
            sha = HfApi().dataset_info(repo, revision=wanted).sha
            if sha:
                return sha
            hub_said = "the hub named no commit"
        except Exception as err:  # network, authentication, a missing repo or revision: the cache is used
            hub_said = f"the hub said: {err}"
    why = f"offline: {', '.join(offline_reasons())}" if offline else hub_said
    at = f"{repo}@{wanted}" + (f" (configuration {config!r})" if config else "")
    try:
        cached = datasets_cached_commit(repo, config, cache_dir)
    except FileNotFoundError as err:
        raise FileNotFoundError(
            f"cannot tell which commit of dataset {at} would load ({why}): {err}"
        ) from None
    ref = _hub_ref(repo, revision) if revision is not None and revision != cached else cached
    if ref != cached:
        says = f"the hub cache's ref names {ref}" if ref else "nothing here says it is that commit"
        raise FileNotFoundError(
            f"dataset {at}: with the hub unasked ({why}), datasets loads its newest cached copy, commit {cached}, "
            f"whatever revision is asked for, and {revision!r} is not it ({says}); load {revision!r} once "
            f"online, or ask for {cached}"
        )
    return cached


def datasets_cached_commit(repo: str, config: str | None, cache_dir: str | Path | None = None) -> str:
    """The commit of the copy of hub dataset ``repo`` (configuration ``config``) that ``datasets`` loads with
    the hub unreachable: its "cache" module takes the most recently modified folder
    ``<cache_dir>/<owner>___<name>/<config>/<version>/<hash>`` (``datasets/packaged_modules/cache/cache.py``,
    ``_find_hash_in_cache``), whose ``<hash>`` is the commit it was downloaded at (``datasets/load.py``,
    ``HubDatasetModuleFactory``). Asked of that function itself, so the rule cannot drift from the library's.

    Raises:
        FileNotFoundError: no cached copy of that configuration, or one whose folder names no commit.
    """
    from datasets.packaged_modules.cache import cache as datasets_cache

    try:
        _, _, found = datasets_cache._find_hash_in_cache(
            dataset_name=repo,
            config_name=config,
            cache_dir=None if cache_dir is None else str(cache_dir),
            config_kwargs={},
            custom_features=None,
        )
    except ValueError as err:  # "Couldn't find cache for …", or several configurations and none named
        raise FileNotFoundError(str(err).replace("\n", "; ")) from None
    except KeyError as err:  # a dataset_info.json without the configuration's name
        raise FileNotFoundError(f"a cached copy of {repo} has a dataset_info.json without {err}") from None
    if found.endswith(".incomplete"):
        raise FileNotFoundError(
            f"the newest cached copy of {repo}, {found!r}, is a download in progress (or one killed half-way)"
        )
    if not is_full_commit(found):
        raise FileNotFoundError(
            f"the cached copy datasets would load, folder {found!r}, is not named by a hub commit"
        )
    return found


def _hub_ref(repo: str, revision: str) -> str | None:
    """The commit the hub cache's ``refs/<revision>`` of dataset ``repo`` names (written by every download
    of that branch or tag), or ``None``."""
    from huggingface_hub import constants

    ref = Path(constants.HF_HUB_CACHE) / f"datasets--{repo.replace('/', '--')}" / "refs" / revision
    try:
        return ref.read_text(encoding="utf-8").strip()
    except OSError:
        return None


def is_full_commit(text: str) -> bool:
    """Whether ``text`` is a git commit written in full (40 lowercase hex digits), as the hub names one."""
    return len(text) == 40 and _is_hex(text)


def _is_hex(text: str) -> bool:
    """Whether ``text`` is lowercase hex, as a git commit (or its prefix) is written."""
    return all(c in "0123456789abcdef" for c in text)
