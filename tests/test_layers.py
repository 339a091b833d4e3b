"""Imports go one way: every module of tcpass/ imports only modules of its own layer or below, and no two
modules import each other (directly or around a cycle). Imports under ``TYPE_CHECKING`` do not count (they
never run); imports inside functions do (they run, and a cycle through them is a design cycle).

The layers, lowest first (a module's layer is that of the longest prefix listed):
"""

import ast
from pathlib import Path

import tcpass

LAYERS = [
    # contracts every layer agrees on, and leaf utilities
    ["tcpass.contracts", "tcpass.files", "tcpass.timing", "tcpass.noise", "tcpass.metrics", "tcpass.predictor",
     "tcpass.trace", "tcpass.export.index_ops", "tcpass.passes.emit", "tcpass.passes.token_axis",
     "tcpass.passes.cleanup"],
    ["tcpass.selectors", "tcpass.forecasters"],  # token selectors and forecasters (torch-free at import)
    ["tcpass.plan"],  # plans validate their selectors
    ["tcpass.schedule"],
    ["tcpass.controller"],  # one step controller for every executor
    ["tcpass.passes", "tcpass.adapters"],  # the rewrites; the model families
    ["tcpass.graphs", "tcpass.compile"],
    ["tcpass.torch_runtime", "tcpass.sampling", "tcpass.generate", "tcpass.flops"],  # the torch executor
    ["tcpass.export", "tcpass.calibrate", "tcpass.zoo"],  # ONNX, calibration, reference models
    ["tcpass.serve", "tcpass.cli", "tcpass"],  # entry points
]  # fmt: skip
PACKAGE = Path(tcpass.__file__).parent


def module_name(path: Path) -> str:
    name = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return name.removesuffix(".__init__")


def layer_of(module: str) -> int:
    best = max(
        ((len(prefix), i) for i, layer in enumerate(LAYERS) for prefix in layer if module == prefix
         or module.startswith(prefix + ".")),
        default=None,
    )  # fmt: skip
    assert best is not None, f"{module} is in no layer: add it to LAYERS in tests/test_layers.py"
    return best[1]


def imports_of(path: Path, modules: set[str]) -> set[str]:
    """tcpass modules ``path`` imports, at module level or in functions, not under TYPE_CHECKING."""
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                continue
            if isinstance(child, ast.ImportFrom) and child.module and child.module.startswith("tcpass"):
                found.add(child.module)
                found.update(f"{child.module}.{a.name}" for a in child.names if f"{child.module}.{a.name}" in modules)
            elif isinstance(child, ast.Import):
                found.update(a.name for a in child.names if a.name.startswith("tcpass"))
            visit(child)

    visit(ast.parse(path.read_text()))
    return found & modules


def import_graph() -> dict[str, set[str]]:
    paths = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    return {name: imports_of(path, set(paths)) - {name} for name, path in paths.items()}


def test_every_import_goes_to_the_same_layer_or_below():
    graph = import_graph()
    upward = sorted(
        f"{module} (layer {layer_of(module)}) imports {target} (layer {layer_of(target)})"
        for module, targets in graph.items()
        for target in targets
        if layer_of(target) > layer_of(module) and not module.startswith(target + ".")  # a package's own modules
    )
    assert not upward, "imports against the layers:\n" + "\n".join(upward)


def test_no_import_cycles():
    graph = import_graph()
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def walk(module: str) -> list[str] | None:
        state[module] = 1
        path.append(module)
        for target in sorted(graph[module]):
            if module.startswith(target + "."):  # a module importing its own package's __init__
                continue
            if state.get(target) == 1:
                return path[path.index(target) :] + [target]
            if target not in state and (cycle := walk(target)):
                return cycle
        path.pop()
        state[module] = 2
        return None

    for module in sorted(graph):
        if module not in state and (cycle := walk(module)):
            raise AssertionError("import cycle: " + " -> ".join(cycle))


def test_the_checks_see_an_upward_import_and_a_cycle(tmp_path):
    modules = {"tcpass.plan", "tcpass.torch_runtime"}
    lower = tmp_path / "plan.py"
    lower.write_text("def f():\n    from tcpass.torch_runtime import transform\n")
    assert imports_of(lower, modules) == {"tcpass.torch_runtime"}
    assert layer_of("tcpass.torch_runtime") > layer_of("tcpass.plan")
    guarded = tmp_path / "guarded.py"
    guarded.write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from tcpass.torch_runtime import x\n")
    assert imports_of(guarded, modules) == set()


MAX_FUNCTION_LINES = 80  # a whole function: signature, docstring and code (decorators aside)


def long_functions(source: str, max_lines: int = MAX_FUNCTION_LINES) -> list[tuple[str, int]]:
    """``(name, lines)`` of the functions in ``source`` longer than ``max_lines``, ``def`` to last line."""
    out = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            lines = node.end_lineno - node.lineno + 1
            if lines > max_lines:
                out.append((node.name, lines))
    return out


def test_no_function_is_longer_than_80_lines():
    found = {
        f"{path.relative_to(PACKAGE.parent)}:{name}": lines
        for path in sorted(PACKAGE.rglob("*.py"))
        for name, lines in long_functions(path.read_text())
    }
    assert not found, f"functions over {MAX_FUNCTION_LINES} lines (split them): {found}"
    long = '@decorated\ndef f(\n    x,\n):\n    """doc\n    more doc"""\n' + "    x = 1\n" * 76
    assert long_functions(long) == [("f", 81)] and long_functions(long.replace("    x = 1\n", "", 1)) == []
