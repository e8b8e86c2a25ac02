"""The package's shape, as docs/architecture.md promises it: small modules and short functions, no import
cycle, every in-package import at the top of its file, and the layers below held as a rule: a module
imports only from its own layer or lower ones (plus the few extra rules in ``NEVER``).

``LAYERS`` and ``NEVER`` are the one statement of the layering; scripts/architecture_graph.py draws
docs/architecture.png from them and from the same import scan.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "gpt2lab"
MODULES = sorted(PACKAGE.rglob("*.py"))
MAX_MODULE_LINES = 400
MAX_FUNCTION_LINES = 60

# Bottom to top. An entry names a module or a subpackage (all of its modules); "gpt2lab" is the package's
# own __init__ (the public API) only. Levels follow the imports: kv_cache sits below the core because the
# compiled decoder in kernels/ builds caches; kernel_report imports the model, so it is in cli/.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("base", ("gpt2lab.errors", "gpt2lab.files", "gpt2lab.outputs")),
    ("definitions", ("gpt2lab.config", "gpt2lab.tokenizer", "gpt2lab.kv_cache")),
    ("formats, data, kernels", ("gpt2lab.checkpoints", "gpt2lab.data", "gpt2lab.kernels")),
    (
        "core",
        (
            "gpt2lab",
            "gpt2lab.model",
            "gpt2lab.attention",
            "gpt2lab.sliding_window",
            "gpt2lab.generation",
            "gpt2lab.generation_limits",
            "gpt2lab.loading",
            "gpt2lab.analysis",
            "gpt2lab.plots",
        ),
    ),  # fmt: skip
    ("eval", ("gpt2lab.eval",)),
    ("train", ("gpt2lab.train",)),
    ("study", ("gpt2lab.study",)),
    ("apps", ("gpt2lab.cli", "gpt2lab.serve", "gpt2lab.__main__")),
]

# Imports the levels alone would allow, refused all the same: (importer, imported) -> why.
NEVER: dict[tuple[str, str], str] = {
    ("gpt2lab.model", "gpt2lab.kernels"): "the model is plain PyTorch; kernels are swapped in from outside",
    ("gpt2lab.attention", "gpt2lab.kernels"): "attention is plain PyTorch; kernels are swapped in from outside",
    ("gpt2lab.checkpoints", "gpt2lab.model"): "checkpoints read and write configs and tensors, never the model",
}

# In-package imports that may sit inside a function: modules that import an optional third-party
# package at their top and refuse to load without it. module -> the extra it needs.
NEEDS_AN_EXTRA = {
    "gpt2lab.eval.harness": "lm-eval",
    "gpt2lab.serve.app": "serve (fastapi, uvicorn)",
    "gpt2lab.serve.schema": "serve (pydantic, starlette)",
}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


ALL = {module_name(p) for p in MODULES}


@dataclass(frozen=True)
class Import:
    target: str  # a gpt2lab module
    line: int
    in_function: bool


def _targets(node: ast.Import | ast.ImportFrom, package: str) -> set[str]:
    if isinstance(node, ast.Import):
        return {alias.name for alias in node.names}
    base = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
    target = ".".join([*base, *([node.module] if node.module else [])])
    # "from gpt2lab.cli import arguments" names the module gpt2lab.cli.arguments
    return {f"{target}.{a.name}" for a in node.names if f"{target}.{a.name}" in ALL} or {target}


def scan_imports(path: Path) -> list[Import]:
    """Every gpt2lab module ``path`` imports, with its line and whether the import sits in a function."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: list[Import] = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.Import | ast.ImportFrom):
                found.extend(Import(t, child.lineno, in_function) for t in _targets(child, package) if t in ALL)
            visit(child, in_function or isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda))

    visit(ast.parse(path.read_text()), False)
    return found


def _matches(module: str, entry: str) -> bool:
    return module == entry or (entry != "gpt2lab" and module.startswith(entry + "."))


def layer_of(module: str) -> int | None:
    """The level of ``module`` on the map (its most specific entry), or None when the map misses it."""
    hits = [(len(e), level) for level, (_, entries) in enumerate(LAYERS) for e in entries if _matches(module, e)]
    return max(hits)[1] if hits else None


@dataclass(frozen=True)
class Violation:
    path: Path
    line: int
    importer: str
    target: str
    why: str

    def __str__(self) -> str:
        where = self.path.relative_to(PACKAGE.parent)
        return f"{where}:{self.line}: {self.importer} imports {self.target} ({self.why})"


def broken_rules(importer: str, target: str) -> list[str]:
    """Why ``importer`` may not import ``target`` (empty when it may)."""
    mine, theirs = layer_of(importer), layer_of(target)
    found = []
    if mine is not None and theirs is not None and theirs > mine:
        found.append(f"{LAYERS[mine][0]} may not import {LAYERS[theirs][0]}")
    found += [why for (low, high), why in NEVER.items() if _matches(importer, low) and _matches(target, high)]
    return found


def layer_violations() -> list[Violation]:
    """Every import that runs against the map, with its file, line and the rule it breaks."""
    return [
        Violation(path, imp.line, module_name(path), imp.target, why)
        for path in MODULES
        for imp in scan_imports(path)
        for why in broken_rules(module_name(path), imp.target)
    ]


def test_the_scan_sees_the_package():
    assert {"gpt2lab.model", "gpt2lab.attention", "gpt2lab.checkpoints", "gpt2lab.checkpoints.hf"} <= ALL
    imports = scan_imports(PACKAGE / "cli" / "models.py")
    assert any(i.target == "gpt2lab.cli.arguments" and not i.in_function for i in imports)  # from gpt2lab.cli import
    assert any(i.target == "gpt2lab.eval.harness" and i.in_function for i in imports)  # the one lazy import there


def test_the_map_sees_every_module_and_spots_an_upward_import():
    assert not [m for m in sorted(ALL) if layer_of(m) is None], "modules missing from LAYERS"
    assert layer_of("gpt2lab") < layer_of("gpt2lab.eval.loss") < layer_of("gpt2lab.train.loop")
    assert layer_of("gpt2lab.checkpoints.hf") == layer_of("gpt2lab.kernels.quantize") < layer_of("gpt2lab.model")
    assert layer_of("gpt2lab.serve.app") == layer_of("gpt2lab.cli.main")  # a future app package sits beside cli
    assert broken_rules("gpt2lab.eval.harness", "gpt2lab.train.run") == ["eval may not import train"]
    assert broken_rules("gpt2lab.kernels.quantize", "gpt2lab.model") == ["formats, data, kernels may not import core"]
    assert broken_rules("gpt2lab.model", "gpt2lab.kernels.cpu_linear") == [NEVER[("gpt2lab.model", "gpt2lab.kernels")]]
    assert broken_rules("gpt2lab.checkpoints.hf", "gpt2lab.model") == [
        "formats, data, kernels may not import core",
        NEVER[("gpt2lab.checkpoints", "gpt2lab.model")],
    ]
    assert broken_rules("gpt2lab.train.loop", "gpt2lab.eval.loss") == []
    assert broken_rules("gpt2lab.loading", "gpt2lab.kernels.precision") == []  # the core applies kernels


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


@pytest.mark.parametrize("path", MODULES, ids=lambda p: module_name(p))
def test_in_package_imports_are_at_the_top(path):
    lazy = [
        f"line {i.line}: {i.target}"
        for i in scan_imports(path)
        if i.in_function and i.target not in NEEDS_AN_EXTRA and i.target != module_name(path)
    ]
    assert not lazy, f"{module_name(path)} imports gpt2lab modules inside functions: {'; '.join(lazy)}"


def test_layers():
    violations = layer_violations()
    assert not violations, "imports against the layer map:\n" + "\n".join(map(str, violations))


def test_no_import_cycles():
    graph = {module_name(p): {i.target for i in scan_imports(p)} - {module_name(p)} for p in MODULES}
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
