"""The engine stays readable: no function in reference/ runs over 50 lines (the Triton kernels excepted: a
kernel is one unit of GPU work and reads best whole), and no two modules of reference/ import each other,
directly or through others (data flows one way: tools -> engine -> scheduling -> memory & execution)."""

from __future__ import annotations

import ast
from pathlib import Path

REFERENCE = Path(__file__).resolve().parent.parent / "reference"
MAX_FUNCTION_LINES = 50
KERNEL_FILES = {"attention/triton_ops.py", "models/fused.py"}


def modules() -> dict[str, ast.Module]:
    return {path.relative_to(REFERENCE).as_posix(): ast.parse(path.read_text()) for path in REFERENCE.rglob("*.py")}


def test_no_function_in_reference_runs_over_50_lines():
    too_long = []
    for name, tree in modules().items():
        if name in KERNEL_FILES:
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    too_long.append(f"{name}:{node.lineno} {node.name} ({length} lines)")
    assert not too_long, too_long


def module_name(relative: str) -> str:
    parts = relative[: -len(".py")].split("/")
    return ".".join(["reference"] + (parts[:-1] if parts[-1] == "__init__" else parts))


def imported_modules(name: str, tree: ast.Module, known: set[str]) -> set[str]:
    """Modules of `reference` that `name` imports (at any depth of its code), resolved to module names."""
    package = name if name in known and any(k.startswith(name + ".") for k in known) else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            base = package
            for _ in range(max(node.level - 1, 0)):
                base = base.rpartition(".")[0]
            target = (f"{base}.{node.module}" if node.module else base) if node.level else node.module or ""
            candidates = [target] + [f"{target}.{alias.name}" for alias in node.names]
        elif isinstance(node, ast.Import):
            candidates = [alias.name for alias in node.names]
        else:
            continue
        found |= {c for c in candidates if c in known and c != name}
    return found


def test_reference_has_no_import_cycles():
    trees = {module_name(relative): tree for relative, tree in modules().items()}
    known = set(trees)
    graph = {name: imported_modules(name, tree, known) for name, tree in trees.items()}
    # A package imports its submodules from __init__; a submodule importing its own package's name is that edge
    # back, not a design cycle, so edges from a module to a package that contains it are left out.
    graph = {name: {t for t in targets if not name.startswith(t + ".")} for name, targets in graph.items()}
    cycles = []
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done

    def visit(name: str, path: list[str]) -> None:
        state[name] = 1
        for target in sorted(graph[name]):
            if state.get(target) == 1:
                cycles.append(path[path.index(target):] + [target] if target in path else [name, target])
            elif target not in state:
                visit(target, path + [target])
        state[name] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    assert not cycles, cycles
