"""Every registered method's ``params()`` rebuilds it: a record's parameters reproduce the method that made it."""

from __future__ import annotations

import pytest

from globalcom2 import attach
from globalcom2.methods import METHODS, PreLLMMethod

#: Non-default parameters per method, so the round trip is tested off the defaults too. A newly registered
#: method is covered by the default case without an entry here.
NON_DEFAULT: dict[str, dict[str, object]] = {
    "globalcom2": {"retention_ratio": 0.3, "score_layer": -2, "attention": "softmax", "alpha": 0.25},
    "fastv": {"retention_ratio": 0.3, "K": 3, "budget_basis": "patches"},
    "sparsevlm": {"retention_ratio": 0.3, "prune_layers": (1, 2)},
    "random": {"retention_ratio": 0.3, "seed": 7},
}


def _cases() -> list[tuple[str, dict[str, object]]]:
    cases = [(name, {} if name == "vanilla" else {"retention_ratio": 0.5}) for name in METHODS.names()]
    return cases + sorted(NON_DEFAULT.items())


@pytest.mark.parametrize(("name", "params"), _cases(), ids=lambda v: v if isinstance(v, str) else "")
def test_params_rebuild_an_equal_method(name, params):
    method = METHODS.create(name, **params)
    rebuilt = METHODS.create(name, **method.params())  # an unknown key would raise here
    assert type(rebuilt) is type(method)
    assert rebuilt.params() == method.params()
    assert {k: method.params()[k] for k in params} == params, "params() must report what was passed"


def test_globalcom2_score_settings_are_derived_not_stored():
    method = METHODS.create("globalcom2", retention_ratio=0.5, score_layer=-3, attention="softmax")
    assert isinstance(method, PreLLMMethod)
    assert (method.vision_score_layer, method.vision_score_kind) == (-3, "softmax")
    assert "vision_score_layer" not in method.params() and "vision_score_kind" not in method.params()


def test_attach_takes_the_built_instance(model):
    method = METHODS.create("random", retention_ratio=0.5, seed=3)
    with attach(model, method) as handle:
        assert handle.method is method, "attach must use the caller's instance, not build another"


def test_attach_refuses_an_instance_with_parameters(model):
    with pytest.raises(TypeError, match="either a method name"):
        attach(model, METHODS.create("random", retention_ratio=0.5), retention_ratio=0.25)
