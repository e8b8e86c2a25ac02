"""The package's shape, as docs/architecture.md promises it: small modules, short functions, no import
cycles (imports inside functions count), and no private torch operator in the model or attention."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "gpt2lab"
MODULES = sorted(PACKAGE.rglob("*.py"))
MAX_MODULE_LINES = 400
MAX_FUNCTION_LINES = 60


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path) -> set[str]:
    """gpt2lab modules that ``path`` imports, at any depth of its code (relative imports resolved)."""
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.startswith("gpt2lab")}
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
            target = ".".join([*base, *([node.module] if node.module else [])])
            if target.startswith("gpt2lab"):
                # "from . import x" / "from .pkg import mod" name modules too
                found |= {f"{target}.{a.name}" for a in node.names if f"{target}.{a.name}" in ALL} or {target}
    return {name for name in found if name in ALL}


ALL = {module_name(p) for p in MODULES}


def test_the_scan_sees_the_package():
    assert {"gpt2lab.model", "gpt2lab.attention", "gpt2lab.checkpoints", "gpt2lab.checkpoints.hf"} <= ALL
    assert "gpt2lab.attention" in imported_modules(PACKAGE / "model.py")
    assert "gpt2lab.generation" in imported_modules(PACKAGE / "model.py")  # imported inside a method


@pytest.mark.parametrize("path", MODULES, ids=lambda p: module_name(p))
def test_module_and_functions_are_short(path):
    source = path.read_text()
    assert source.count("\n") <= MAX_MODULE_LINES, f"{path.name} has {source.count(chr(10))} lines"
    long = [
        f"{node.name} ({node.end_lineno - node.lineno + 1} lines)"
        for node in ast.walk(ast.parse(source))
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
        and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES
    ]
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines in {path.name}: {', '.join(long)}"


def test_no_import_cycles():
    graph = {module_name(p): imported_modules(p) - {module_name(p)} for p in MODULES}
    # A package's __init__ importing its own submodules is how a package exposes them, not a cycle.
    for name in graph:
        graph[name] = {m for m in graph[name] if not m.startswith(name + ".")}
    state: dict[str, int] = {}  # 1: on the current path, 2: finished

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycle = path[path.index(nxt) :] + [nxt]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt, [*path, nxt])
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])


@pytest.mark.parametrize("name", ["model.py", "attention.py"])
def test_no_private_torch_operator_in_the_model(name):
    source = (PACKAGE / name).read_text()
    assert "torch.ops" not in source and "torch._" not in source
