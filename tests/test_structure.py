"""The package's layout rules (docs/architecture.md), checked on the source itself."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "diffusers_mixdq"
MAX_MODULE_LINES = 400
MAX_FUNCTION_LINES = 60


def _modules():
    return sorted(PACKAGE.rglob("*.py"))


def _rel(path: Path) -> str:
    return str(path.relative_to(PACKAGE.parent))


def test_no_module_over_the_line_limit():
    long = {_rel(p): n for p in _modules() if (n := len(p.read_text().splitlines())) > MAX_MODULE_LINES}
    assert not long, f"modules over {MAX_MODULE_LINES} lines: {long}"


def test_no_function_over_the_line_limit():
    long = {}
    for path in _modules():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_FUNCTION_LINES:
                    long[f"{_rel(path)}::{node.name}"] = n
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines: {long}"


def _imported_modules(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def test_optimum_quanto_is_imported_in_one_package_only():
    importers = {p.parent for p in _modules() if any(m.startswith("optimum") for m in _imported_modules(p))}
    assert len(importers) == 1, f"optimum.quanto is imported in several packages: {sorted(map(_rel, importers))}"


def test_no_folder_called_build_and_no_module_shadows_the_stdlib():
    folders = {p.name for p in PACKAGE.rglob("*") if p.is_dir()}
    assert "build" not in folders
    shadowing = [_rel(p) for p in _modules() if p.stem in sys.stdlib_module_names]
    assert not shadowing, f"modules named like standard-library modules: {shadowing}"


def test_no_import_cycles_between_subpackages():
    grimp = pytest.importorskip("grimp")
    sys.path.insert(0, str(PACKAGE.parent))
    graph = grimp.build_graph("diffusers_mixdq", include_external_packages=False)
    packages = [m for m in sorted(graph.modules) if graph.find_children(m)]
    cycles = []
    for package in packages:  # siblings at every level: subpackages, and modules inside each one
        children = sorted(graph.find_children(package))
        for a in children:
            for b in children:
                if a < b and graph.chain_exists(a, b, as_packages=True) and graph.chain_exists(b, a, as_packages=True):
                    cycles.append((a, b))
    assert not cycles, f"modules/packages that import each other (directly or through others): {cycles}"
