"""The one reading of the Hugging Face offline switches (``globalcom2.hub``)."""

from __future__ import annotations

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


def test_a_dataset_commit_comes_from_the_hub_online_and_from_the_cache_offline_or_unreachable(
    online, tmp_path
):
    """What ``datasets`` would load: the hub's ``main`` online (asked at that revision), the cache's ref when
    offline or when the hub fails, and a clear error when neither names one."""
    from types import SimpleNamespace

    from huggingface_hub import HfApi

    from globalcom2.hub import hub_dataset_commit

    online.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    asked = []

    def dataset_info(self, repo, revision=None):
        asked.append((repo, revision))
        return SimpleNamespace(sha="c" * 40)

    online.setattr(HfApi, "dataset_info", dataset_info)
    assert hub_dataset_commit("org/lite") == "c" * 40 and asked == [("org/lite", "main")]
    assert hub_dataset_commit("org/lite", "d" * 40) == "d" * 40 and len(asked) == 1  # a commit is itself
    refs = tmp_path / "datasets--org--lite" / "refs"
    refs.mkdir(parents=True)
    (refs / "main").write_text("e" * 40 + "\n")
    online.setenv(DATASETS_OFFLINE, "1")
    assert hub_dataset_commit("org/lite") == "e" * 40 and len(asked) == 1  # offline: the hub is not asked
    online.setenv(DATASETS_OFFLINE, "0")

    def unreachable(self, repo, revision=None):
        raise ConnectionError("no route to host")

    online.setattr(HfApi, "dataset_info", unreachable)
    assert hub_dataset_commit("org/lite") == "e" * 40
    with pytest.raises(FileNotFoundError, match=r"org/other@main.*the hub said: no route to host"):
        hub_dataset_commit("org/other")
