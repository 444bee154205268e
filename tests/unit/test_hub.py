"""The one reading of the Hugging Face offline switches (``globalcom2.hub``)."""

from __future__ import annotations

import functools
from pathlib import Path

import huggingface_hub.constants
import pytest

from globalcom2.hub import DATASETS_OFFLINE, HUB_OFFLINE, hub_offline, offline_reasons


@pytest.fixture
def online(monkeypatch):
    """Both switches off, in the environment and in huggingface_hub's import-time constant."""
    monkeypatch.setenv(HUB_OFFLINE, "0")
    monkeypatch.setenv(DATASETS_OFFLINE, "0")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    return monkeypatch


def test_no_switch_on_means_online(online):
    assert offline_reasons() == [] and not hub_offline()


@pytest.mark.parametrize("value", ["1", "true", "YES", "On"])
def test_a_switch_set_in_the_environment_is_named(online, value):
    online.setenv(DATASETS_OFFLINE, value)
    assert offline_reasons() == [f"{DATASETS_OFFLINE} is set"] and not hub_offline()
    online.setenv(HUB_OFFLINE, value)
    assert offline_reasons() == [f"{HUB_OFFLINE} is set", f"{DATASETS_OFFLINE} is set"] and hub_offline()


@pytest.mark.parametrize("value", ["0", "false", "", " 1 ", "y"])
def test_values_huggingface_hub_reads_as_off_are_off(online, value):
    online.setenv(HUB_OFFLINE, value)
    assert huggingface_hub.constants._is_true(value) is False  # the library's own parser agrees
    assert not hub_offline() and offline_reasons() == []


def test_a_switch_latched_at_import_stays_on_whatever_the_environment_says_later(online):
    """huggingface_hub obeys its constant (set from HF_HUB_OFFLINE or TRANSFORMERS_OFFLINE at import); "0"
    in the environment afterwards cannot make it download, and the reason says so."""
    online.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    assert hub_offline()
    (reason,) = offline_reasons()
    assert "imported" in reason and "TRANSFORMERS_OFFLINE" in reason


def test_a_dataset_commit_is_the_hubs_online_and_datasets_newest_cached_copy_offline_or_unreachable(
    online, tmp_path
):
    """Online, the hub's commit for the revision (which ``datasets`` then pins). Offline or unreachable,
    ``datasets`` asks for no revision: it loads its newest cached copy, so that is the commit, whatever the
    hub cache's ``refs/main`` says (that ref was the answer once, and named another commit than the one
    loaded); a revision asked for explicitly must be that copy."""
    from types import SimpleNamespace

    from helpers import cached_hub_dataset
    from huggingface_hub import HfApi

    from globalcom2.hub import hub_dataset_commit

    cache = tmp_path / "datasets"
    online.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    asked = []

    def dataset_info(self, repo, revision=None):
        asked.append((repo, revision))
        return SimpleNamespace(sha="c" * 40)

    online.setattr(HfApi, "dataset_info", dataset_info)
    commit = functools.partial(hub_dataset_commit, cache_dir=cache)
    assert commit("org/lite", "gqa") == "c" * 40 and asked == [("org/lite", "main")]
    assert commit("org/lite", "gqa", "d" * 40) == "d" * 40 and len(asked) == 1  # a commit is itself

    for sha, when in (("a" * 40, 1_000), ("b" * 40, 2_000)):
        cached_hub_dataset(cache, "org/lite", "gqa", sha, {"q": ["x"]}, "lite", mtime=when)
    refs = tmp_path / "hub" / "datasets--org--lite" / "refs"
    refs.mkdir(parents=True)
    (refs / "main").write_text("a" * 40)  # the hub cache's main: not what datasets loads offline
    online.setenv(DATASETS_OFFLINE, "1")
    assert commit("org/lite", "gqa") == "b" * 40 and len(asked) == 1  # offline: the hub is not asked
    assert commit("org/lite", "gqa", "b" * 40) == "b" * 40
    with pytest.raises(FileNotFoundError, match=r"newest cached copy, commit b{40}.*'a{40}'"):
        commit("org/lite", "gqa", "a" * 40)  # datasets would load b: refused, not recorded as a
    with pytest.raises(FileNotFoundError, match=r"'main' is not it \(the hub cache's ref names a{40}\)"):
        commit("org/lite", "gqa", "main")  # asked for by name, and the ref names another commit
    (refs / "v2").write_text("b" * 40)
    assert commit("org/lite", "gqa", "v2") == "b" * 40  # a tag whose ref is the cached copy
    (refs / "v1").write_text("a" * 40)
    with pytest.raises(FileNotFoundError, match=r"'v1' is not it \(the hub cache's ref names a{40}\)"):
        commit("org/lite", "gqa", "v1")
    online.setenv(DATASETS_OFFLINE, "0")

    def unreachable(self, repo, revision=None):
        raise ConnectionError("no route to host")

    online.setattr(HfApi, "dataset_info", unreachable)
    assert commit("org/lite", "gqa") == "b" * 40
    with pytest.raises(
        FileNotFoundError, match=r"org/other@main.*the hub said: no route to host.*find cache"
    ):
        commit("org/other", "gqa")
    with pytest.raises(FileNotFoundError, match=r"find cache for org/lite for config 'vqav2'"):
        commit("org/lite", "vqav2")


def test_the_cached_copy_named_is_the_one_datasets_loads_offline(tmp_path, monkeypatch):
    """The rule is the library's, checked against the library: ``load_dataset`` offline, even asked for the
    older commit, reads the newest copy's files, the commit :func:`datasets_cached_commit` names."""
    import datasets
    from helpers import cached_hub_dataset

    from globalcom2.hub import datasets_cached_commit

    monkeypatch.setattr(
        datasets.config, "HF_HUB_OFFLINE", True
    )  # latched at import, as HF_DATASETS_OFFLINE=1
    cache = tmp_path / "datasets"
    for sha, rows, when in (("a" * 40, ["old"], 2_000), ("b" * 40, ["new"], 1_000)):
        cached_hub_dataset(cache, "org/lite", "gqa", sha, {"q": rows}, "lite", mtime=when)
    assert datasets_cached_commit("org/lite", "gqa", cache) == "a" * 40
    loaded = datasets.load_dataset("org/lite", "gqa", cache_dir=str(cache), revision="b" * 40)
    assert loaded["lite"]["q"] == ["old"]
    assert Path(loaded["lite"].cache_files[0]["filename"]).parent.name == "a" * 40
    stray = cache / "org___lite" / "gqa" / "0.0.0" / ("a" * 40)
    stray.rename(stray.with_name("not-a-commit"))
    with pytest.raises(FileNotFoundError, match="'not-a-commit', is not named by a hub commit"):
        datasets_cached_commit("org/lite", "gqa", cache)
    (stray.with_name("not-a-commit")).rename(stray.with_name(f"{'a' * 40}.incomplete"))
    with pytest.raises(FileNotFoundError, match=r"a{40}\.incomplete', is a download in progress"):
        datasets_cached_commit("org/lite", "gqa", cache)
