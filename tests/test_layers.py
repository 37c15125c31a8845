"""The package's layering (docs/design.md), read from the source with `ast`, imports inside functions included:

    cli  >  bench | train | serve  >  compile | runtime  >  plugins  >  format  >  graphs  >  errors

A module imports only from its own layer's package or from layers below; the runtime (and what it stands on)
imports neither onnx nor torch; no two modules import each other, however indirectly. `graphs/` and `plugins/`
sit at the top of the repository and are installed as speccompile.graphs and speccompile.plugins.
"""
from __future__ import annotations

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
SOURCES = {"speccompile": ROOT / "speccompile", "speccompile.graphs": ROOT / "graphs",
           "speccompile.plugins": ROOT / "plugins"}
LAYERS = [("speccompile.cli",), ("speccompile.bench", "speccompile.train", "speccompile.serve"),
          ("speccompile.compile", "speccompile.runtime"), ("speccompile.plugins",), ("speccompile.format",),
          ("speccompile.graphs",), ("speccompile.errors",)]
RUNTIME_SIDE = ("speccompile.runtime",)
BUILD_ONLY = ("onnx", "torch", "transformers", "safetensors", "gguf", "onnx_ir")
MAX_MODULE_LINES = 400
MAX_FUNCTION_LINES = 60


def modules() -> dict[str, pathlib.Path]:
    found = {}
    for prefix, root in SOURCES.items():
        for path in root.rglob("*.py"):
            rel = path.relative_to(root).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            name = ".".join([prefix, *parts])
            if prefix == "speccompile" and name.startswith(("speccompile.graphs", "speccompile.plugins")):
                continue
            found[name] = path
    return found


def imports(name: str, path: pathlib.Path) -> set[str]:
    """Absolute names of every module `name` imports (anywhere in the file)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            out.add(base)
            out |= {f"{base}.{a.name}" for a in node.names}  # `from pkg import module`
    return out


def layer_of(module: str) -> int | None:
    for i, layer in enumerate(LAYERS):
        if any(module == p or module.startswith(p + ".") for p in layer):
            return i
    return None


MODULES = modules()
GRAPH = {m: {i for i in imports(m, p) if i in MODULES and i != m} for m, p in MODULES.items()}


def test_no_module_imports_a_layer_above_it():
    climbing = []
    for m, deps in GRAPH.items():
        own = layer_of(m)
        for d in deps:
            other = layer_of(d)
            if own is not None and other is not None and other < own:
                climbing.append(f"{m} -> {d}")
            same_layer_other_package = (other == own and own is not None and
                                        d.split(".")[:2] != m.split(".")[:2] and len(LAYERS[own]) > 1)
            if same_layer_other_package:
                climbing.append(f"{m} -> {d} (sideways)")
    assert not climbing, "imports against the layering:\n" + "\n".join(sorted(climbing))


def test_runtime_needs_neither_onnx_nor_torch():
    reached, todo = set(), [m for m in MODULES if m.startswith(RUNTIME_SIDE) or m == "speccompile"]
    while todo:  # every module the runtime imports, however indirectly
        m = todo.pop()
        if m not in reached:
            reached.add(m)
            todo += GRAPH[m]
    bad = [f"{m} -> {i}" for m in sorted(reached) for i in imports(m, MODULES[m]) if i.split(".")[0] in BUILD_ONLY]
    assert not bad, "\n".join(bad)


def test_no_import_cycles():
    state, stack, cycles = {}, [], []

    def visit(m):
        state[m] = "open"
        stack.append(m)
        for d in GRAPH[m]:
            if d.startswith(m + "."):  # a package importing its own submodule is not a cycle
                continue
            if state.get(d) == "open":
                cycles.append(stack[stack.index(d):] + [d])
            elif d not in state:
                visit(d)
        stack.pop()
        state[m] = "done"

    for m in sorted(GRAPH):
        if m not in state:
            visit(m)
    assert not cycles, "\n".join(" -> ".join(c) for c in cycles)


@pytest.mark.parametrize("module", sorted(MODULES))
def test_modules_and_functions_stay_short(module):
    tree = ast.parse(MODULES[module].read_text())
    lines = len(MODULES[module].read_text().splitlines())
    assert lines <= MAX_MODULE_LINES, f"{module}: {lines} lines"
    long = [f"{n.name} ({n.end_lineno - n.lineno + 1} lines)" for n in ast.walk(tree)
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.end_lineno - n.lineno + 1 > MAX_FUNCTION_LINES]
    assert not long, f"{module}: " + ", ".join(long)
