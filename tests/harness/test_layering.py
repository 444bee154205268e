"""The package's import graph: layered top to bottom, without cycles; the data package free of lmms-eval.

Read from the source (AST), so a function-level import that dodges a cycle counts as an import, and so does
one under ``if TYPE_CHECKING:`` (a circle of types is still a circle).
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import globalcom2

PACKAGE_DIR = Path(globalcom2.__file__).parent
#: The package's layers, top to bottom: a unit (a subpackage, or a module of the package's top level;
#: ``globalcom2`` is the package's own ``__init__``, the public API) may import its own layer and the layers
#: below it, never one above.
LAYERS: list[list[str]] = [
    ["run"],  # the Hydra entry point
    ["worker", "report"],  # one cell's evaluation; tables and plots from the records
    ["cells", "tracking", "training"],  # a cell's spec from Hydra; wandb; make train-tiny
    ["lmms"],  # everything that talks to lmms-eval
    ["run_spec", "perf"],  # the front door of the plugin and of a cell; the benchmarks
    ["globalcom2"],  # attach, load_llava_next, list_methods
    ["protocol", "efficiency", "store", "data", "answer_journal"],
    ["records", "sample_records", "hooks"],
    ["methods", "models"],
    ["scoring"],
    [
        "anyres",
        "budget",
        "registry",
        "tensor_cache",
        "stage_timing",
        "file_digest",
        "atomic",
        "lock_files",
        "paths",
        "hub",
        "prompts",
        "provenance",
        "redaction",
        "wheelhouse",  # run by path before any environment exists: the standard library only
        "carry",  # make carry-wheels: what a prepared machine lacks
    ],
]
# Top to bottom; a models module may import the modules of any earlier layer (see globalcom2.models.base).
MODELS_LAYERS = [
    # which code objects compiled layers run, and transformers' output collector made traceable (compiled
    # imports both)
    ["layer_code", "output_collector"],
    ["base", "compiled", "batch_invariant"],
    ["geometry", "tiny"],
    ["tiny_trained", "random_init"],
    ["preload"],
    ["loader"],
    ["fingerprint"],  # names the folder the loader reads, through the loader's own resolve_checkpoint
]


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE_DIR.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def all_modules() -> dict[str, Path]:
    return {module_name(p): p for p in PACKAGE_DIR.rglob("*.py")}


def _type_checking_only(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)


def imports(path: Path, modules: dict[str, Path]) -> dict[str, bool]:
    """``{imported name: at module level?}`` for every import in ``path``, those under ``if TYPE_CHECKING:``
    included (as module-level); a ``from package import module`` names the module."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    typing_only = {id(n) for block in ast.walk(tree) if _type_checking_only(block) for n in ast.walk(block)}
    found: dict[str, bool] = {}
    for node in ast.walk(tree):
        names: list[str] = []
        if isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names = [
                f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules else node.module
                for a in node.names
            ]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        for name in names:
            found[name] = found.get(name, False) or node in tree.body or id(node) in typing_only
    return found


def internal_graph() -> dict[str, set[str]]:
    modules = all_modules()
    return {
        m: {name for name in imports(p, modules) if name in modules and name != m} for m, p in modules.items()
    }


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of ``graph`` (as a path that ends where it starts), or ``None``."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt) :], nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start)):
            return cycle
    return None


def test_the_package_has_no_import_cycle_even_through_function_level_imports():
    assert find_cycle(internal_graph()) is None


def unit_of(module: str) -> str:
    """``globalcom2.lmms.plugin`` -> ``lmms``; ``globalcom2.cells`` -> ``cells``; ``globalcom2`` -> ``globalcom2``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def upward_imports(graph: dict[str, set[str]], layers: list[list[str]]) -> list[str]:
    """Every import of ``graph`` from a unit to a unit of a higher layer, as ``"a.b -> c.d (layer i < j)"``."""
    level = {unit: index for index, layer in enumerate(layers) for unit in layer}
    found = []
    for module, targets in sorted(graph.items()):
        for target in sorted(targets):
            here, there = level[unit_of(module)], level[unit_of(target)]
            if there < here:
                found.append(f"{module} -> {target} (layer {here} imports layer {there})")
    return found


def test_every_unit_of_the_package_has_a_layer():
    units = {unit_of(name) for name in all_modules()}
    listed = [unit for layer in LAYERS for unit in layer]
    assert len(listed) == len(set(listed)), "a unit is listed twice"
    assert units == set(listed)


def test_no_module_imports_from_a_layer_above_it():
    assert upward_imports(internal_graph(), LAYERS) == []


def test_an_upward_import_and_a_type_checking_import_are_seen(tmp_path):
    """The checks can fail: a low unit importing a high one is reported, also under ``TYPE_CHECKING``."""
    graph = {
        "globalcom2.records": {"globalcom2.lmms.plugin"},
        "globalcom2.lmms.plugin": {"globalcom2.records"},
    }
    assert upward_imports(graph, LAYERS) == [
        "globalcom2.records -> globalcom2.lmms.plugin (layer 7 imports layer 3)"
    ]
    module = tmp_path / "m.py"
    module.write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from globalcom2.lmms import plugin\n"
    )
    assert imports(module, {"globalcom2.lmms.plugin": module})["globalcom2.lmms.plugin"] is True


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_every_models_module_has_a_layer():
    found = {name.rpartition(".")[2] for name in all_modules() if name.startswith("globalcom2.models.")}
    assert found == {m for layer in MODELS_LAYERS for m in layer}


def test_each_models_module_imports_only_the_layers_above_it_and_only_at_module_level():
    modules = all_modules()
    allowed: set[str] = set()
    for layer in MODELS_LAYERS:
        for module in layer:
            found = imports(modules[f"globalcom2.models.{module}"], modules)
            siblings = {
                n.rpartition(".")[2]: top for n, top in found.items() if n.startswith("globalcom2.models.")
            }
            assert all(siblings.values()), f"{module} imports a sibling inside a function: {siblings}"
            assert set(siblings) <= allowed, (
                f"{module} imports {sorted(set(siblings) - allowed)}, not above it"
            )
        allowed.update(layer)


@pytest.mark.parametrize("forbidden", ["lmms_eval", "globalcom2.lmms"])
def test_the_data_package_does_not_depend_on_lmms_eval(forbidden):
    modules = all_modules()
    for name, path in modules.items():
        if name.startswith("globalcom2.data"):
            bad = [n for n in imports(path, modules) if n == forbidden or n.startswith(f"{forbidden}.")]
            assert not bad, f"{name} imports {bad}"


def test_a_function_level_import_is_seen(tmp_path):
    """The checks above can fail: an import inside a function is found and marked as not module-level."""
    module = tmp_path / "m.py"
    module.write_text("import lmms_eval\n\ndef f():\n    from globalcom2.models.loader import x\n")
    assert imports(module, {}) == {"lmms_eval": True, "globalcom2.models.loader": False}


def test_importing_the_data_package_loads_no_lmms_eval():
    """What the data modules import, transitively, in a fresh interpreter: neither lmms-eval nor our
    integration package comes in (the static check above sees only each module's own imports)."""
    data = sorted(name for name in all_modules() if name.startswith("globalcom2.data"))
    probe = (
        f"import importlib, sys\nfor m in {data!r}: importlib.import_module(m)\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'lmms_eval' or m.startswith('globalcom2.lmms')))"
    )
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "[]"


def test_the_benchmarks_import_only_torch_transformers_pandas_and_pillow():
    """``globalcom2.perf`` runs on GPU machines that have torch and transformers but not the evaluation stack:
    importing every benchmark loads none of lmms-eval, Hydra, OmegaConf, datasets or wandb."""
    perf = sorted(name for name in all_modules() if name.startswith("globalcom2.perf"))
    heavy = ("lmms_eval", "hydra", "omegaconf", "datasets", "wandb")
    probe = (
        f"import importlib, sys\nfor m in {perf!r}: importlib.import_module(m)\n"
        f"print(sorted({{m.split('.')[0] for m in sys.modules}} & set({heavy!r})))"
    )
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "[]"


def test_the_gpu_checklist_starts_without_torch_or_transformers():
    """The checklist's first step reports which carried wheels are wrong; it must start where transformers
    refuses to import (the package's public names load on first use, ``globalcom2/__init__.py``)."""
    probe = (
        "import sys, globalcom2.perf.gpu_checklist, globalcom2.carry\n"
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'transformers', 'numpy'}))"
    )
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "[]"


def test_every_package_folder_has_an_init_module():
    """A folder without ``__init__.py`` still imports (a namespace package) in an editable install, but a
    wheel leaves it out, and a ``.gitignore`` pattern once kept ``globalcom2/data/__init__.py`` from a clone."""
    folders = {path.parent for path in PACKAGE_DIR.rglob("*.py")}
    assert [
        str(f.relative_to(PACKAGE_DIR)) for f in sorted(folders) if not (f / "__init__.py").is_file()
    ] == []
