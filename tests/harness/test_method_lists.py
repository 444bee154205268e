"""A newly registered method appears in the sweep and the tables without a hand edit (or this fails)."""

from __future__ import annotations

import yaml

from globalcom2.methods import METHODS
from globalcom2.paths import PROJECT_ROOT


def test_every_registered_method_has_a_method_config():
    configs = {p.stem for p in (PROJECT_ROOT / "configs" / "method").glob("*.yaml")}
    names = {
        yaml.safe_load(p.read_text())["name"] for p in (PROJECT_ROOT / "configs" / "method").glob("*.yaml")
    }
    assert set(METHODS.names()) <= names, f"add configs/method/<name>.yaml for {set(METHODS.names()) - names}"
    assert configs


def test_the_methods_x_ratios_sweep_covers_every_registered_method():
    sweep = yaml.safe_load((PROJECT_ROOT / "configs" / "sweep" / "methods_x_ratios.yaml").read_text())
    swept = str(sweep["hydra"]["sweeper"]["params"]["method"]).replace(" ", "").split(",")
    method_files = {
        p.stem: yaml.safe_load(p.read_text())["name"]
        for p in (PROJECT_ROOT / "configs" / "method").glob("*.yaml")
    }
    assert {method_files[m] for m in swept} == set(METHODS.names())


def test_the_tables_order_every_registered_method():
    from globalcom2.report.tables import METHOD_ORDER

    assert set(METHODS.names()) <= set(METHOD_ORDER), "report/tables.py METHOD_ORDER misses a method"


def test_the_efficiency_benchmark_measures_every_registered_method():
    from globalcom2.benchmarks.efficiency import DEFAULT_VARIANTS

    assert {method for method, _ in DEFAULT_VARIANTS} == set(METHODS.names())
