"""lmms-eval gen_kwargs -> generate() arguments, and stop strings."""

from __future__ import annotations

import pytest

from globalcom2.protocol.generation import GenerationSettings, cut_at_stop


def settings(**kwargs):
    return GenerationSettings.from_gen_kwargs(kwargs, default_max_new_tokens=1024)


def test_defaults_are_greedy_with_the_default_length():
    s = settings(until=["\n\n"])
    assert s.generate_kwargs() == {"max_new_tokens": 1024, "do_sample": False, "num_beams": 1}
    assert s.until == ("\n\n",)


def test_explicit_do_sample_false_wins_over_a_positive_temperature():
    # MM-Vet's YAML: temperature 0.2 with do_sample false -> greedy, no temperature passed on.
    s = settings(temperature=0.2, top_p=1.0, do_sample=False, max_new_tokens=1024)
    assert s.generate_kwargs() == {"max_new_tokens": 1024, "do_sample": False, "num_beams": 1}
    assert s.ignored == ("temperature",)  # named, so a merged --gen_kwargs temperature is not silent
    assert (
        settings(temperature=0, top_p=1.0, do_sample=False).ignored == ()
    )  # greedy's own spelling (GQA's YAML)
    assert settings(top_p=0.9, do_sample=False).ignored == ("top_p",)


def test_sampling_follows_temperature_when_do_sample_is_absent():
    assert settings(temperature=0).do_sample is False
    s = settings(temperature=0.7, top_p=0.9)
    assert s.generate_kwargs() == {
        "max_new_tokens": 1024, "do_sample": True, "num_beams": 1, "temperature": 0.7, "top_p": 0.9
    }  # fmt: skip


def test_beams_length_and_passthrough_keys():
    s = settings(num_beams=3, max_new_tokens=16.0, repetition_penalty=1.1, until="ASSISTANT:")
    assert s.generate_kwargs() == {
        "max_new_tokens": 16,
        "do_sample": False,
        "num_beams": 3,
        "repetition_penalty": 1.1,
    }
    assert s.until == ("ASSISTANT:",)


def test_unknown_keys_raise_and_llava_only_keys_are_ignored():
    with pytest.raises(ValueError, match=r"unsupported generation_kwargs \['num_return_sequences'\]"):
        settings(num_return_sequences=2)
    assert settings(image_aspect_ratio="original").ignored == ("image_aspect_ratio",)
    with pytest.raises(TypeError, match="max_new_tokens must be an integer"):
        settings(max_new_tokens="many")
    with pytest.raises(TypeError, match="until"):
        settings(until=[1])
    with pytest.raises(ValueError, match="do_sample=true needs temperature > 0"):
        settings(do_sample=True, temperature=0.0)  # transformers would refuse it at the first generate


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"temperature": -1}, "temperature must be >= 0"),
        ({"temperature": float("nan")}, "temperature must be >= 0"),
        ({"temperature": 0.7, "top_p": 1.5}, r"top_p must be in \(0, 1\]"),
        ({"temperature": 0.7, "top_p": 0}, r"top_p must be in \(0, 1\]"),
        ({"top_p": -0.1}, r"top_p must be in \(0, 1\]"),
        ({"until": ["\n", ""]}, "empty stop string"),
    ],
)
def test_settings_that_would_decode_otherwise_than_written_are_refused(kwargs, message):
    """A negative temperature decoded greedily, an empty stop string was dropped, and a top_p above 1 failed
    only inside generate: each is refused up front, naming the value."""
    with pytest.raises(ValueError, match=message):
        settings(**kwargs)
    assert settings(temperature=0, top_p=0).do_sample is False  # 17 lmms-eval YAMLs write greedy this way


def test_requests_with_equal_settings_share_a_key():
    assert settings(until=["\n"], temperature=0).key() == settings(until=["\n"], do_sample=False).key()
    assert settings(until=["\n"]).key() != settings(until=["\n\n"]).key()


@pytest.mark.parametrize(
    ("text", "until", "expected"),
    [
        ("yes\n\nno", ("\n\n",), ("yes", "\n\n")),
        ("A. cat ASSISTANT: B", ("\n\n", "ASSISTANT:"), ("A. cat ", "ASSISTANT:")),
        ("x\ny\n\n", ("\n\n", "\n"), ("x", "\n")),  # the earliest occurrence wins, whichever string
        ("plain", ("\n",), ("plain", None)),
        ("plain", (), ("plain", None)),
    ],
)
def test_cut_at_stop(text, until, expected):
    assert cut_at_stop(text, until) == expected
