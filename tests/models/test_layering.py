"""The models package is layered: each module imports only from the layers above it, at module level.

A function-level import of a sibling is how the old ``llava_next`` <-> ``random_init`` <-> ``tiny`` cycle
was held together; this test fails if one comes back.
"""

from __future__ import annotations

import ast
from pathlib import Path

import globalcom2.models

PACKAGE = "globalcom2.models"
# Top to bottom; a module may import the modules of any earlier layer (see globalcom2.models.base).
LAYERS = [["base"], ["geometry", "tiny"], ["tiny_trained", "random_init"], ["preload"], ["loader"]]


def sibling_imports(path: Path) -> tuple[set[str], set[str]]:
    """``(siblings imported at module level, siblings imported inside a function)`` of one module."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    top, nested = set(), set()
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.ImportFrom) and node.module:
            if node.module == PACKAGE:
                names = [alias.name for alias in node.names]
            elif node.module.startswith(f"{PACKAGE}."):
                names = [node.module.removeprefix(f"{PACKAGE}.").split(".")[0]]
        elif isinstance(node, ast.Import):
            names = [
                a.name.removeprefix(f"{PACKAGE}.").split(".")[0]
                for a in node.names
                if a.name.startswith(PACKAGE + ".")
            ]
        (top if node in tree.body else nested).update(names)
    return top, nested


def test_every_module_of_the_package_has_a_layer():
    folder = Path(globalcom2.models.__file__).parent
    modules = {p.stem for p in folder.glob("*.py")} - {"__init__"}
    assert modules == {m for layer in LAYERS for m in layer}


def test_each_module_imports_only_the_layers_above_it_and_only_at_module_level():
    folder = Path(globalcom2.models.__file__).parent
    allowed: set[str] = set()
    for layer in LAYERS:
        for module in layer:
            top, nested = sibling_imports(folder / f"{module}.py")
            assert not nested, f"{module} imports {sorted(nested)} inside a function"
            assert top <= allowed, f"{module} imports {sorted(top - allowed)}, which are not above it"
        allowed.update(layer)


def test_the_layering_check_catches_a_function_level_import(tmp_path):
    """The check above can fail: a function-level sibling import is reported."""
    module = tmp_path / "m.py"
    module.write_text(
        "from globalcom2.models.base import TINY\n\ndef f():\n    from globalcom2.models.loader import x\n"
    )
    assert sibling_imports(module) == ({"base"}, {"loader"})
