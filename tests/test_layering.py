"""Imports flow one way: entry points -> runners -> registry -> methods -> building blocks -> basics.

Every module of the project is assigned a layer by its folder (the README's "Code layout" draws the same
diagram). A module may import modules of its own layer and of lower layers only; a method's folder never imports
another method's folder (what two methods share belongs in ``models/blocks``); no two folders import each other,
and neither do the two top-level packages: ``utils`` (basics, and runners that receive a codec from their entry
script) never imports ``models``. The check reads the source with ``ast``, so it sees imports inside functions too.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Lowest first. A folder key ends with "/"; "utils/" means the modules directly in utils/ (not its subfolders).
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("basics", ("utils/",)),
    ("building blocks", ("models/blocks/",)),
    ("methods", ("models/*/",)),  # every method folder under models/ other than blocks/
    ("registry", ("models/",)),
    ("runners", ("utils/training/", "utils/evaluation/")),
    ("entry points", ("./", "scripts/")),
]
RANK = {name: i for i, (name, _) in enumerate(LAYERS)}


def project_modules() -> dict[str, Path]:
    """Dotted module name -> file, for every project module (tests excluded: they may import anything)."""
    modules = {}
    for path in sorted(ROOT.rglob("*.py")):
        rel = path.relative_to(ROOT)
        if rel.parts[0] in {".venv", "tests", "runs", "build"} or any(p.startswith(".") for p in rel.parts):
            continue
        name = ".".join(rel.with_suffix("").parts)
        modules[name.removesuffix(".__init__")] = path
    return modules


def folder_of(path: Path) -> str:
    rel = path.relative_to(ROOT).parent.as_posix()
    return "./" if rel == "." else rel + "/"


def layer_of(path: Path) -> str:
    folder = folder_of(path)
    if folder == "models/blocks/":
        return "building blocks"
    if folder.startswith("models/") and folder.count("/") == 2:
        return "methods"
    for name, folders in LAYERS:
        if folder in folders:
            return name
    raise AssertionError(f"{path.relative_to(ROOT)}: its folder {folder} has no layer; add it to LAYERS")


def imported_modules(path: Path, modules: dict[str, Path]) -> set[str]:
    """Project modules that ``path`` imports (``from a.b import c`` counts a.b.c when that is a module)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        for name in names:
            while name and name not in modules:
                name = name.rpartition(".")[0]
            if name and modules[name] != path:
                found.add(name)
    return found


MODULES = project_modules()
EDGES = {name: imported_modules(path, MODULES) for name, path in MODULES.items()}


@pytest.mark.parametrize("module", sorted(MODULES))
def test_no_import_from_a_higher_layer(module: str) -> None:
    path = MODULES[module]
    mine = layer_of(path)
    for target in sorted(EDGES[module]):
        theirs = layer_of(MODULES[target])
        assert RANK[theirs] <= RANK[mine], f"{module} ({mine}) imports {target} ({theirs}), a higher layer"
        if mine == theirs == "methods":
            assert folder_of(MODULES[target]) == folder_of(path), f"{module} imports another method: {target}"


def test_no_two_folders_import_each_other() -> None:
    folders: dict[str, set[str]] = {}
    for module, targets in EDGES.items():
        src = folder_of(MODULES[module])
        folders.setdefault(src, set()).update(folder_of(MODULES[t]) for t in targets)
    pairs = sorted(
        (a, b) for a, outs in folders.items() for b in outs if a < b and a in folders.get(b, set())
    )
    assert not pairs, f"folders importing each other: {pairs}"


def test_utils_never_imports_models() -> None:
    """The top-level packages are layers too: models -> utils, never back."""
    upward = sorted(
        f"{module} imports {target}"
        for module, targets in EDGES.items()
        if module.startswith("utils")
        for target in targets
        if target.startswith("models")
    )
    assert not upward, upward


def test_every_layer_is_populated_and_the_checker_catches_a_violation(tmp_path: Path) -> None:
    assert {layer_of(p) for p in MODULES.values()} == set(RANK)
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from models.registry import load_codec\n")
    assert "models.registry" in imported_modules(bad, MODULES)
