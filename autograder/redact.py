"""The redacted view of the project that a grading sandbox sees (the way nbgrader strips solutions).

`build_view(dest, absent)` writes the Python files of the packages `reference` and `autograder` under `dest`,
leaving out what learner code must never read: `autograder/labs/` (the cases, with the hidden inputs' seeds),
the solution notebooks and every other non-Python file; hidden tests live outside the project and are never
copied. In the copy, each dotted name in `absent` ("reference.models.llama.RMSNorm") -- the reference
implementations of the exercises graded in that sandbox -- is replaced by a stub of the same name that raises
when used. The stub replaces the definition itself, so every re-export, import path, `sys.modules` entry or
file read in the sandbox finds only the stub: the implementation is absent, not hidden.

Everything else in `reference` still works, including the stand-ins (the references of the exercises an
exercise uses), which are simply not in `absent`. The copy is compiled to bytecode here, by the grader, since
the sandbox sees it read-only.
"""

from __future__ import annotations

import ast
import compileall
import shutil
from pathlib import Path

PACKAGES = ("reference", "autograder")
LEFT_OUT = ("autograder/labs",)  # relative folders never copied
REPO_ROOT = Path(__file__).resolve().parent.parent


class RedactionError(ValueError):
    """A name to redact that is not a top-level def or class of a module in the project."""


def stub_source(name: str, dotted: str, is_class: bool) -> str:
    message = f"{dotted} is absent while this exercise is graded: the exercise must be your own code"
    if is_class:
        return (f"class {name}:\n"
                f"    def __init__(self, *args, **kwargs):\n"
                f"        raise RuntimeError({message!r})\n")
    return f"def {name}(*args, **kwargs):\n    raise RuntimeError({message!r})\n"


def redact_source(source: str, names: dict[str, str], where: str) -> str:
    """`source` with each top-level def/class in `names` (symbol -> dotted name) replaced by a stub."""
    tree = ast.parse(source)
    lines = source.splitlines(keepends=True)
    found = {}
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and node.name in names:
            first = min([node.lineno] + [decorator.lineno for decorator in node.decorator_list])
            found[node.name] = (first, node.end_lineno, isinstance(node, ast.ClassDef))
    missing = set(names) - set(found)
    if missing:
        raise RedactionError(f"{where}: no top-level def or class named {', '.join(sorted(missing))}")
    for name, (first, last, is_class) in sorted(found.items(), key=lambda item: -item[1][0]):
        lines[first - 1:last] = [stub_source(name, names[name], is_class)]
    return "".join(lines)


def module_file(module: str, root: Path = REPO_ROOT) -> Path:
    """The source file of a dotted module name inside the project."""
    base = root.joinpath(*module.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    raise RedactionError(f"{module} is not a module of the project (looked for {base}.py and {base}/__init__.py)")


def absent_by_file(absent: list[str] | tuple[str, ...], root: Path = REPO_ROOT) -> dict[Path, dict[str, str]]:
    """Group dotted names by the file that defines them: {relative path: {symbol: dotted name}}."""
    by_file: dict[Path, dict[str, str]] = {}
    for dotted in absent:
        module, _, symbol = dotted.rpartition(".")
        if module.split(".")[0] not in PACKAGES or not symbol:
            raise RedactionError(f"{dotted}: only names inside {' or '.join(PACKAGES)} can be redacted")
        path = module_file(module, root).relative_to(root)
        by_file.setdefault(path, {})[symbol] = dotted
    return by_file


def build_view(dest: str | Path, absent: list[str] | tuple[str, ...] = (), root: Path = REPO_ROOT) -> Path:
    """Write the redacted packages under `dest` (created; must not exist yet) and return it."""
    dest = Path(dest)
    redactions = absent_by_file(absent, root)
    dest.mkdir(parents=True)
    for package in PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            relative = path.relative_to(root)
            if "__pycache__" in relative.parts or any(relative.is_relative_to(folder) for folder in LEFT_OUT):
                continue
            target = dest / relative
            target.parent.mkdir(parents=True, exist_ok=True)
            if relative in redactions:
                source = path.read_text(encoding="utf-8")
                target.write_text(redact_source(source, redactions[relative], str(relative)), encoding="utf-8")
            else:
                shutil.copyfile(path, target)
    compileall.compile_dir(str(dest), quiet=1, workers=1)
    return dest
