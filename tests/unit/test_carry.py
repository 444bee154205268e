"""``make carry-wheels``: the wheels a prepared machine lacks, from what a traced command imports, minus what the
machine has at versions that satisfy every declared requirement (``globalcom2/carry.py``)."""

from __future__ import annotations

import json
import subprocess
import sys
from importlib import metadata

import pytest
from packaging.requirements import Requirement
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
    -e git+https://example.org/x.git#egg=my_x
    --index-url https://example.org/simple
    mylib @ file:///tmp/mylib
    weird==not-a-version
    """
    assert parse_have(text) == {  # what is installed from a URL or a checkout is there, at an unknown version
        "torch": Version("2.11.0"),
        "typing-extensions": Version("4.12.2"),
        "pandas": None,
        "my-x": None,
        "mylib": None,
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
    carried, constraints = select(
        needed, have, versions, requires, ENV_312, ["transformers>=5.23,<5.26", "torch>=2.4"]
    )
    assert carried == [
        # brought only because the carried transformers declares it (a fixed point, not one pass)
        Carried("huggingface-hub", "2.4.0", "the machine has 1.33.0; needs huggingface-hub<3.0,>=2.4.0"),
        Carried("lmms-eval", "9.9", "missing"),
        Carried("transformers", "5.25.0", "the machine has 5.17.0; needs transformers<5.26,>=5.23"),
    ]
    # pandas is kept: its version is unknown, so its requirement is left for --verify to check there
    assert [str(r) for r in constraints["pandas"]] == ['pandas>=1; python_version >= "3.9"']
    assert "torch" not in {c.name for c in carried}  # 2.11.0 meets both torch>=2.2 and torch>=2.4


def test_a_version_unknown_there_is_brought_when_a_requirement_caps_it():
    """A bare name is trusted unless a requirement caps it: an image newer than ``filelock<4`` would fail
    ``--verify`` there, and the checklist would skip every main-path step."""
    needed = {"lmms-eval", "filelock", "pandas", "fsspec"}
    versions = {"lmms-eval": "0.7.3", "filelock": "3.32.7", "pandas": "3.1.1", "fsspec": "2026.9.0"}
    requires = {"lmms-eval": ["filelock<4,>=3.16", "pandas>=1", "fsspec>=2023.5.0"]}
    have = parse_have("filelock\npandas\nfsspec")
    carried, _ = select(needed, have, versions, requires, ENV_312, [])
    assert carried == [
        Carried("filelock", "3.32.7", "the machine's version is unknown; filelock<4,>=3.16 caps it"),
        Carried("lmms-eval", "0.7.3", "missing"),
    ]  # pandas and fsspec: lower bounds only, kept
    assert [carry.caps_versions(Requirement(t)) for t in ("a<4", "a~=1.2", "a==1", "a>=1", "a!=2", "a")] == [
        True, True, True, False, False, False,
    ]  # fmt: skip


def test_a_foreign_platform_needs_the_targets_python(tmp_path, capsys):
    have = tmp_path / "freeze.txt"
    have.write_text("")
    with pytest.raises(SystemExit):
        carry.main(["--have", str(have), "--platform", "manylinux_2_28_x86_64"])
    assert "--platform needs --python-version" in capsys.readouterr().err


def test_markers_are_evaluated_for_the_targets_python():
    requires = {"lmms-eval": ['numpy<2; python_version < "3.12"']}
    have = parse_have("numpy==2.5.2")
    args = ({"lmms-eval", "numpy"}, have, {"lmms-eval": "1", "numpy": "1.26.4"}, requires)
    assert [c.name for c in select(*args, target_environment("3.12"), [])[0]] == ["lmms-eval"]
    assert [c.name for c in select(*args, target_environment("3.11"), [])[0]] == ["lmms-eval", "numpy"]


def test_a_traced_command_names_the_distributions_it_imports():
    modules = carry.imported_modules(["pytest", "--version"])
    assert {"pytest", "pluggy"} <= modules
    distributions, unclaimed = carry.distributions_of(modules)
    assert {"pytest", "pluggy"} <= distributions and not unclaimed
    assert "setuptools" not in distributions  # a venv's start-up (_distutils_hack) is not the command's
    assert carry.distributions_of({"globalcom2", "json", "no_such_top_level"}) == (
        set(),
        {"no_such_top_level"},
    )
    with pytest.raises(SystemExit, match="traced command failed"):
        carry.imported_modules(["globalcom2.no_such_module"])


def test_verify_names_what_is_missing_or_at_a_wrong_version(tmp_path):
    pytest_version = metadata.version("pytest")
    assert verify({"pytest": [f"=={pytest_version}", ">=1"], "pluggy": [""]}) == []
    assert verify({"pytest": ["<1"], "no-such-distribution-xyz": []}) == [
        "no-such-distribution-xyz: not installed",
        f"pytest {pytest_version}: needs <1",
    ]
    # pip install --target into a used folder keeps the old metadata beside the new: which one is read is luck
    for old_or_new in ("six-1.16.0.dist-info", "six-1.17.0.dist-info"):
        (tmp_path / old_or_new).mkdir()
    assert verify({"six": []}, path=[str(tmp_path)])[-1].startswith(
        f"six: 2 versions installed in {tmp_path}"
    )


def test_the_checker_imports_nothing_of_the_package():
    """Run by path there, it must not import ``globalcom2`` (whose ``__init__`` imports transformers, which
    refuses to import with some of the mismatches it should list)."""
    code = (
        "import runpy, sys; sys.argv = ['carry.py', '--help']\n"
        "try:\n    runpy.run_path(sys.argv_path, run_name='__main__')\nexcept SystemExit:\n    pass\n"
        "print(sorted(m for m in sys.modules if m.startswith(('globalcom2', 'torch', 'transformers'))))"
    ).replace("sys.argv_path", repr(str(carry.PROJECT_ROOT / "globalcom2" / "carry.py")))
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd="/")
    assert done.stdout.strip().splitlines()[-1] == "[]"


def test_a_machine_that_has_everything_gets_no_wheel_and_a_manifest_that_verifies_here(tmp_path, capsys):
    modules = carry.imported_modules(["pytest", "--version"])
    needed, _ = carry.distributions_of(modules)
    have = tmp_path / "freeze.txt"
    have.write_text("".join(f"{n}=={metadata.version(n)}\n" for n in sorted(needed)))
    out = tmp_path / "carry"
    out.mkdir()
    (out / "old-1.0-py3-none-any.whl").write_bytes(b"")  # a previous run's wheel: never two versions
    assert carry.main(["--have", str(have), "--out", str(out), "--trace", "pytest --version"]) == []
    assert not list(out.glob("*.whl"))
    checks = json.loads((out / carry.MANIFEST).read_text())
    assert set(checks) == {*needed, carry.PYTHON}
    assert checks[carry.PYTHON] == [f"=={sys.version_info.major}.{sys.version_info.minor}.*"]
    with pytest.raises(SystemExit) as verified:
        carry.main(["--verify", str(out)])
    assert verified.value.code == 0
    checks["pytest"] = ["<1"]
    (out / carry.MANIFEST).write_text(json.dumps(checks))
    with pytest.raises(SystemExit) as failed:
        carry.main(["--verify", str(out)])
    assert failed.value.code == 1 and "pytest" in capsys.readouterr().out


def test_wheels_chosen_for_another_python_fail_the_check_by_name(tmp_path, capsys):
    """Wheels chosen for Python 3.11 (a ``py311`` wheel among them) on the device's 3.12: the check said
    nothing of the interpreter, so the run went on with whatever imported."""
    other = f"3.{sys.version_info.minor + 1}"
    out = tmp_path / "carry"
    out.mkdir()
    (out / carry.MANIFEST).write_text(json.dumps({carry.PYTHON: [f"=={other}.*"]}))
    with pytest.raises(SystemExit) as failed:
        carry.main(["--verify", str(out)])
    assert failed.value.code == 1
    assert f"python {sys.version.split()[0]}: needs =={other}.*" in capsys.readouterr().out


@pytest.mark.slow
def test_the_default_traces_cover_both_front_doors(tmp_path):
    """``globalcom2.run`` and ``python -m globalcom2.lmms`` each import what the other does not: the CLI's
    results table needs ``pytablewriter``, which a carry traced from ``globalcom2.run`` alone left behind, so
    the CLI failed at its last step on a machine that had only the carried wheels."""
    run_cell, lmms_cli = carry.default_commands(tmp_path)
    assert run_cell[0] == "globalcom2.run" and lmms_cli[0] == "globalcom2.lmms"
    through_run, _ = carry.distributions_of(carry.imported_modules(run_cell))
    through_cli, _ = carry.distributions_of(carry.imported_modules(lmms_cli))
    assert {"lmms-eval", "hydra-core", "transformers"} <= through_run
    assert {"lmms-eval", "transformers", "pytablewriter"} <= through_cli
    assert "pytablewriter" not in through_run  # why the second trace exists
    assert list((tmp_path / "lmms_cli").rglob("*_results.json")), "the traced CLI cell wrote no results"
