"""A newly registered method appears in the sweep, the tables and the efficiency benchmark without a hand
edit: each reads the registry. A stand-in method is registered for the duration of a test to show it."""

from __future__ import annotations

import pytest
import yaml
from omegaconf import OmegaConf

import globalcom2.run  # noqa: F401  (registers the ${registered_methods:} resolver, as a sweep does)
from globalcom2.methods import METHODS
from globalcom2.methods.vanilla import Vanilla
from globalcom2.paths import PROJECT_ROOT
from globalcom2.perf.efficiency import default_variants
from globalcom2.report.plots import method_style
from globalcom2.report.tables import method_order

NEW = "zz_new_method"


@pytest.fixture
def new_method(monkeypatch):
    """A method registered under a new name, removed again after the test."""
    monkeypatch.setitem(METHODS._entries, NEW, type("NewMethod", (Vanilla,), {}))
    return NEW


def swept(path: str = "configs/sweep/methods_x_ratios.yaml") -> list[str]:
    """The methods the sweep config names, with its interpolations resolved as Hydra resolves them."""
    config = OmegaConf.create(yaml.safe_load((PROJECT_ROOT / path).read_text()))
    return str(OmegaConf.to_container(config, resolve=True)["hydra"]["sweeper"]["params"]["method"]).split(
        ","
    )


def test_every_registered_method_has_a_method_config():
    names = {
        yaml.safe_load(p.read_text())["name"] for p in (PROJECT_ROOT / "configs" / "method").glob("*.yaml")
    }
    assert set(METHODS.names()) <= names, f"add configs/method/<name>.yaml for {set(METHODS.names()) - names}"


def test_the_sweep_runs_every_registered_method_in_a_fixed_order():
    assert swept() == [
        *("vanilla", "random", "globalcom2", "fastv", "sparsevlm"),
        *("pdrop", "visionzip", "dart", "divprune"),
    ]
    assert sorted(swept()) == METHODS.names()


def test_a_new_method_is_swept_tabled_plotted_and_measured_without_an_edit(new_method):
    """Beyond its class, a new method needs only its configs/method file (checked above), not a list edit."""
    assert swept()[-1] == new_method
    assert method_order()[-1] == new_method and method_order()[0] == "vanilla"
    assert (
        method_style(new_method, new_method)["marker"] != method_style("globalcom2", "globalcom2")["marker"]
    )
    assert {(new_method, 0.25), (new_method, 0.1)} <= set(default_variants())


def test_the_efficiency_benchmark_keeps_the_papers_variants():
    """Tables 8/9: vanilla; GlobalCom² and random at the four ratios; FastV and SparseVLM at 0.25 and 0.1; then
    the later baselines at 0.25 and 0.1, by name."""
    four, two = [0.75, 0.5, 0.25, 0.1], [0.25, 0.1]
    assert default_variants() == [
        ("vanilla", 1.0),
        *[("globalcom2", r) for r in four],
        *[("random", r) for r in four],
        *[("fastv", r) for r in two],
        *[("sparsevlm", r) for r in two],
        *[(method, r) for method in ("dart", "divprune", "pdrop", "visionzip") for r in two],
    ]
