"""The one reading of the Hugging Face offline switches (``globalcom2.hub``)."""

from __future__ import annotations

import huggingface_hub.constants
import pytest

from globalcom2.hub import DATASETS_OFFLINE, HUB_OFFLINE, hub_offline, offline_flags


@pytest.fixture
def online(monkeypatch):
    """Both switches off, in the environment and in huggingface_hub's import-time constant."""
    monkeypatch.setenv(HUB_OFFLINE, "0")
    monkeypatch.setenv(DATASETS_OFFLINE, "0")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    return monkeypatch


def test_no_switch_on_means_online(online):
    assert offline_flags() == [] and not hub_offline()


@pytest.mark.parametrize("value", ["1", "true", "YES", " on "])
def test_the_environment_switches_are_parsed_like_huggingface_hub(online, value):
    online.setenv(DATASETS_OFFLINE, value)
    assert offline_flags() == [DATASETS_OFFLINE] and not hub_offline()
    online.setenv(HUB_OFFLINE, value)
    assert offline_flags() == [HUB_OFFLINE, DATASETS_OFFLINE] and hub_offline()


def test_a_switch_latched_at_import_stays_on_whatever_the_environment_says_later(online):
    """huggingface_hub obeys its constant; "0" in the environment after import cannot make it download."""
    online.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    assert offline_flags() == [HUB_OFFLINE] and hub_offline()
