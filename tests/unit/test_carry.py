"""``make carry-wheels``: the wheels a prepared machine lacks, from what a traced command imports, minus what the
machine has at versions that satisfy every declared requirement (``globalcom2/carry.py``)."""

from __future__ import annotations

import json
from importlib import metadata

import pytest
from packaging.version import Version

from globalcom2 import carry
from globalcom2.carry import Carried, parse_have, select, target_environment, verify

ENV_312 = target_environment("3.12")


def test_a_pip_freeze_or_bare_names_give_the_machines_distributions():
    text = """
    # pip list --format=freeze
    Torch==2.11.0
    typing_extensions==4.12.2
    pandas
    -e git+https://example.org/x.git#egg=x
    mylib @ file:///tmp/mylib
    weird==not-a-version
    """
    assert parse_have(text) == {
        "torch": Version("2.11.0"),
        "typing-extensions": Version("4.12.2"),
        "pandas": None,
        "weird": None,
    }


def test_missing_and_too_old_distributions_are_carried_and_the_rest_kept():
    needed = {"transformers", "lmms-eval", "torch", "pandas", "huggingface-hub"}
    versions = {n: "9.9" for n in needed} | {"transformers": "5.25.0", "huggingface-hub": "2.4.0"}
    requires = {
        "transformers": ["huggingface-hub<3.0,>=2.4.0", "torch>=2.2"],
        "lmms-eval": [
            'pandas>=1; python_version >= "3.9"',
            'tomli; python_version < "3.11"',
            "pytest; extra == 'dev'",
        ],
    }
    have = parse_have("transformers==5.17.0\ntorch==2.11.0\npandas\nhuggingface-hub==1.33.0")
    carried, unchecked = select(
        needed, have, versions, requires, ENV_312, ["transformers>=5.23,<5.26", "torch>=2.4"]
    )
    assert carried == [
        # brought only because the carried transformers declares it (a fixed point, not one pass)
        Carried("huggingface-hub", "2.4.0", "the machine has 1.33.0; needs huggingface-hub<3.0,>=2.4.0"),
        Carried("lmms-eval", "9.9", "missing"),
        Carried("transformers", "5.25.0", "the machine has 5.17.0; needs transformers<5.26,>=5.23"),
    ]
    assert unchecked == ["pandas"]  # kept: its version is unknown, so it is reported, not assumed wrong


def test_markers_are_evaluated_for_the_targets_python():
    requires = {"lmms-eval": ['numpy<2; python_version < "3.12"']}
    have = parse_have("numpy==2.5.2")
    args = ({"lmms-eval", "numpy"}, have, {"lmms-eval": "1", "numpy": "1.26.4"}, requires)
    assert [c.name for c in select(*args, target_environment("3.12"), [])[0]] == ["lmms-eval"]
    assert [c.name for c in select(*args, target_environment("3.11"), [])[0]] == ["lmms-eval", "numpy"]


def test_a_traced_command_names_the_distributions_it_imports():
    modules = carry.imported_modules(["pytest", "--version"])
    assert {"pytest", "pluggy"} <= modules
    assert {"pytest", "pluggy"} <= carry.distributions_of(modules)
    assert carry.PROJECT_DISTRIBUTION not in carry.distributions_of({"globalcom2"})
    with pytest.raises(SystemExit, match="traced command failed"):
        carry.imported_modules(["globalcom2.no_such_module"])


def test_verify_names_what_is_missing_or_at_a_wrong_version():
    pytest_version = metadata.version("pytest")
    assert verify({"pytest": [f"=={pytest_version}", ">=1"], "pluggy": [""]}) == []
    assert verify({"pytest": ["<1"], "no-such-distribution-xyz": []}) == [
        "no-such-distribution-xyz: not installed",
        f"pytest {pytest_version}: needs <1",
    ]


def test_a_machine_that_has_everything_gets_no_wheel_and_a_manifest_that_verifies_here(tmp_path, capsys):
    modules = carry.imported_modules(["pytest", "--version"])
    needed = carry.distributions_of(modules)
    have = tmp_path / "freeze.txt"
    have.write_text("".join(f"{n}=={metadata.version(n)}\n" for n in sorted(needed)))
    out = tmp_path / "carry"
    out.mkdir()
    (out / "old-1.0-py3-none-any.whl").write_bytes(b"")  # a previous run's wheel: never two versions
    assert carry.main(["--have", str(have), "--out", str(out), "--trace", "pytest --version"]) == []
    assert not list(out.glob("*.whl"))
    checks = json.loads((out / carry.MANIFEST).read_text())
    assert set(checks) == needed
    with pytest.raises(SystemExit) as verified:
        carry.main(["--verify", str(out)])
    assert verified.value.code == 0
    checks["pytest"] = ["<1"]
    (out / carry.MANIFEST).write_text(json.dumps(checks))
    with pytest.raises(SystemExit) as failed:
        carry.main(["--verify", str(out)])
    assert failed.value.code == 1 and "pytest" in capsys.readouterr().out
