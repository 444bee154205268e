import math

import pytest

from globalcom2.budget import kept_count, validate_retention_ratio
from globalcom2.methods import METHODS, list_methods
from globalcom2.registry import Registry


def test_methods_registered():
    assert {"vanilla", "random"} <= set(list_methods())


def test_unknown_method_lists_registered_names_and_suggests():
    with pytest.raises(ValueError) as err:
        METHODS.get("randmo")
    message = str(err.value)
    assert "'randmo'" in message and "Did you mean 'random'" in message
    for name in list_methods():
        assert name in message


def test_unknown_parameter_lists_accepted_ones():
    with pytest.raises(
        ValueError, match=r"does not take 'ratio'.*Accepted parameters: retention_ratio, seed"
    ):
        METHODS.create("random", ratio=0.5)


def test_duplicate_registration_refused():
    registry: Registry[object] = Registry("thing")

    @registry.register("a")
    class A:
        pass

    with pytest.raises(KeyError, match="already registered"):

        @registry.register("a")
        class B:
            pass


@pytest.mark.parametrize("value", [0, -0.1, 1.5, math.nan, math.inf])
def test_ratio_out_of_range(value):
    with pytest.raises(ValueError, match=r"retention_ratio must be in \(0, 1\].*" + str(value)[:3]):
        validate_retention_ratio(value)


@pytest.mark.parametrize("value", ["0.5", True, None, [0.5]])
def test_ratio_wrong_type(value):
    with pytest.raises(TypeError, match=r"retention_ratio must be a real number in \(0, 1\]"):
        validate_retention_ratio(value)


@pytest.mark.parametrize("value", [1, 1.0, 0.25, 1e-6])
def test_ratio_valid(value):
    assert validate_retention_ratio(value) == float(value)


def test_kept_count_is_floor():
    assert [kept_count(576, r) for r in (0.75, 0.5, 0.25, 0.1)] == [432, 288, 144, 57]
    assert kept_count(1176, 0.1) == 117
    assert kept_count(10, 1.0) == 10
