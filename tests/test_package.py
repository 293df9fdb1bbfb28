"""The package as a whole: the top-level API, lazy imports, and no import cycles between modules."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import dfsnet

SRC = Path(dfsnet.__file__).parent


def _modules() -> dict[str, Path]:
    """Every module of the package by name, found on disk (walking with pkgutil would import
    the packages, and a cycle would then hide as a package it silently skips)."""
    out = {}
    for path in sorted(SRC.rglob("*.py")):
        parts = ("dfsnet", *path.relative_to(SRC).with_suffix("").parts)
        if parts[-1] == "__main__":  # runs the CLI when imported
            continue
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def _module_level_imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """dfsnet modules that ``name`` imports when it is imported (module level, not TYPE_CHECKING or
    function bodies): the edges that can form an import cycle."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()

    def visit(nodes) -> None:
        for node in nodes:
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                continue
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                if isinstance(node, ast.ClassDef):
                    visit(node.body)
                continue
            if isinstance(node, ast.Import):
                found.update(a.name for a in node.names if a.name.startswith("dfsnet"))
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(parts + ([base] if base else []))
                if base.startswith("dfsnet"):
                    found.add(base)
                    found.update(f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in modules)
            elif isinstance(node, (ast.If, ast.Try, ast.With)):
                visit(getattr(node, "body", []))
                visit(getattr(node, "orelse", []))
                for handler in getattr(node, "handlers", []):
                    visit(handler.body)
                visit(getattr(node, "finalbody", []))

    visit(tree.body)
    return {m for m in found if m in modules and m != name}


def test_no_import_cycle_inside_dfsnet():
    modules = _modules()
    graph = {name: _module_level_imports(name, path, modules) for name, path in modules.items()}
    cycles: list[list[str]] = []
    state: dict[str, int] = {}
    stack: list[str] = []

    def dfs(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                dfs(nxt)
        stack.pop()
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            dfs(name)
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_every_module_imports_on_its_own():
    # One interpreter, with dfsnet's modules dropped from sys.modules before each import: a module
    # that only imports after another one was imported first fails here.
    code = (
        "import importlib, sys\n"
        f"names = {sorted(_modules())!r}\n"
        "for name in names:\n"
        "    for loaded in [m for m in sys.modules if m == 'dfsnet' or m.startswith('dfsnet.')]:\n"
        "        del sys.modules[loaded]\n"
        "    importlib.import_module(name)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]


def test_import_dfsnet_is_light_and_offers_the_main_api():
    code = (
        "import sys, dfsnet\n"
        "heavy = [m for m in ('torch', 'faiss', 'matplotlib', 'timm', 'lightning') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
        "print(sorted(n for n in dfsnet.__all__ if n != '__version__'))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == str(sorted(["create_backbone", "DFSNet", "make_encoder", "HammingIndex",
                                                "ImageIndex", "run_experiment"]))


@pytest.mark.parametrize("name", ["create_backbone", "DFSNet", "make_encoder", "HammingIndex", "ImageIndex",
                                  "run_experiment"])
def test_top_level_names_are_the_library_objects(name):
    import importlib

    obj = getattr(dfsnet, name)
    assert obj is getattr(importlib.import_module(dfsnet._LAZY[name]), name)
    assert name in dir(dfsnet)


def test_unknown_attribute_is_an_attribute_error():
    with pytest.raises(AttributeError, match="no attribute 'nothing'"):
        dfsnet.nothing  # noqa: B018
