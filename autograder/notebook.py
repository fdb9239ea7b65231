"""Reading a learner's notebook and taking out only its exercise cells (parent side; nothing is executed here).

A cell is exercise `<name>`'s when it carries the tag `exercise:<name>`. When no cell has the tag (a learner's
editor dropped cell metadata, or they rewrote the cell), the last code cell that defines the exercise's symbol
at top level (`def symbol` / `class symbol`) is used instead. IPython magics and shell escapes (lines starting
with % or !) are commented out, since the cell will run as plain Python.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import nbformat

from .spec import Lab


class NotebookError(ValueError):
    """The file is not a readable notebook (missing, empty, invalid JSON, not nbformat 4)."""


@dataclass(frozen=True)
class ExerciseSource:
    exercise: str
    source: str | None  # None: not found
    how: str  # "tag", "definition" or "missing"


def read_notebook(path: str | Path) -> nbformat.NotebookNode:
    path = Path(path)
    if not path.is_file():
        raise NotebookError(f"{path}: no such file")
    text = path.read_text(encoding="utf-8", errors="replace")
    if not text.strip():
        raise NotebookError(f"{path}: the file is empty")
    try:
        notebook = nbformat.reads(text, as_version=4)
    except Exception as exc:  # nbformat raises several types for bad JSON / bad structure
        raise NotebookError(f"{path}: not a valid notebook ({type(exc).__name__}: {str(exc)[:200]})") from None
    if not isinstance(notebook.get("cells"), list):
        raise NotebookError(f"{path}: the notebook has no list of cells")
    return notebook


def cell_source(cell) -> str:
    source = cell.get("source", "")
    return "".join(source) if isinstance(source, list) else str(source)


def cell_tags(cell) -> list[str]:
    tags = cell.get("metadata", {}).get("tags", [])
    return [tag for tag in tags if isinstance(tag, str)] if isinstance(tags, list) else []


def defines(source: str, symbol: str) -> bool:
    """Whether `source` defines `symbol` at top level (a def, an async def or a class)."""
    try:
        tree = ast.parse(plain_python(source))
    except (SyntaxError, ValueError):
        return False
    return any(
        isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and node.name == symbol
        for node in tree.body
    )


def plain_python(source: str) -> str:
    """Comment out IPython-only lines (%magic, !shell) so the cell runs as plain Python."""
    lines = []
    for line in source.splitlines():
        stripped = line.lstrip()
        lines.append(line.replace(stripped, "# " + stripped, 1) if stripped.startswith(("%", "!")) else line)
    return "\n".join(lines) + "\n"


def exercise_sources(notebook: nbformat.NotebookNode, lab: Lab, exercises: list[str]) -> list[ExerciseSource]:
    """The source of each named exercise's cell: by tag first, else by definition, else missing."""
    code_cells = [cell for cell in notebook["cells"] if cell.get("cell_type") == "code"]
    found = []
    for name in exercises:
        exercise = lab.exercise(name)
        tagged = [cell for cell in code_cells if exercise.tag in cell_tags(cell)]
        if tagged:
            found.append(ExerciseSource(name, plain_python(cell_source(tagged[0])), "tag"))
            continue
        defining = [cell for cell in code_cells if defines(cell_source(cell), exercise.symbol)]
        if defining:
            found.append(ExerciseSource(name, plain_python(cell_source(defining[-1])), "definition"))
        else:
            found.append(ExerciseSource(name, None, "missing"))
    return found
