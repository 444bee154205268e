"""model_args strings -> typed method parameters, via the method's own signature."""

from __future__ import annotations

from typing import Literal

import pytest

from globalcom2.methods.params import (
    check_attn_compatibility,
    coerce,
    coerce_method_params,
    parse_attn_implementation,
)


@pytest.mark.parametrize(
    ("value", "annotation", "expected"),
    [
        (1, float, 1.0),
        ("0.25", float, 0.25),
        (3, int, 3),
        ("-2", int, -2),
        ("true", bool, True),
        (False, bool, False),
        (1, bool, True),  # lmms-eval's model_args parser turns "1" into the int 1
        (0, bool, False),
        (2.5, str, "2.5"),
        ("none", int | None, None),
        (4, int | None, 4),
        ("b", Literal["a", "b"], "b"),
        (2, Literal[1, 2], 2),
        ("[2, 6, 15]", list[int], [2, 6, 15]),
        ("[2, 6]", tuple[int, ...], (2, 6)),
    ],
)
def test_coerce(value, annotation, expected):
    result = coerce(value, annotation, "p")
    assert result == expected and type(result) is type(expected)


@pytest.mark.parametrize(
    ("value", "annotation", "message"),
    [
        (1.5, int, "p must be an integer"),
        ("--2", int, "p must be an integer, got '--2'"),
        (True, int, "p must be an integer"),
        ("yes please", bool, "p must be true or false"),
        (2, bool, "p must be true or false"),
        ("high", float, "p must be a number"),
        ("c", Literal["a", "b"], r"p must be one of \['a', 'b'\]"),
        ("3", list[int], "p must be a list"),
    ],
)
def test_coerce_refuses_what_does_not_fit(value, annotation, message):
    with pytest.raises(ValueError, match=message):
        coerce(value, annotation, "p")


def test_method_params_follow_the_method_signature():
    assert coerce_method_params("random", {"retention_ratio": 1, "seed": "7"}) == {
        "retention_ratio": 1.0,
        "seed": 7,
    }
    with pytest.raises(
        ValueError, match=r"method 'random' does not take 'ratio'\. Its parameters: retention_ratio, seed"
    ):
        coerce_method_params("random", {"ratio": 0.5})
    with pytest.raises(ValueError, match=r"unknown compression method 'randm'\. Did you mean 'random'"):
        coerce_method_params("randm", {})


def test_attention_compatibility_and_parsing():
    check_attn_compatibility("random", "sdpa")
    check_attn_compatibility("vanilla", {"text_config": "eager", "vision_config": "sdpa"})
    with pytest.raises(ValueError, match="does not support attn_implementation 'flash_attention_2'"):
        check_attn_compatibility("random", "flash_attention_2")
    assert parse_attn_implementation('{"text_config": "eager"}') == {"text_config": "eager"}
    with pytest.raises(ValueError, match="not valid JSON"):
        parse_attn_implementation("{text_config: eager}")
