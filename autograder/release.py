"""`release`: learner notebooks generated from the solution notebooks, deterministically.

Solution notebooks live in autograder/<lab>/ with the learner notebooks' file names. In an exercise cell (tag
`exercise:<name>`) every region from a `### BEGIN SOLUTION` line to the next `### END SOLUTION` line, both
included, becomes one line `raise NotImplementedError("<name>: ...")` at the BEGIN line's indentation. Markers
outside exercise cells, or unbalanced ones, are errors. Outputs and execution counts are dropped, cell metadata
is reduced to its tags, and notebook metadata to the kernel spec and language name, so the same solution always
releases to byte-identical files.
"""

from __future__ import annotations

import copy
from pathlib import Path

import nbformat

from .notebook import cell_source, cell_tags

BEGIN, END = "### BEGIN SOLUTION", "### END SOLUTION"
PACKAGE_DIR = Path(__file__).resolve().parent
REPO_ROOT = PACKAGE_DIR.parent


class ReleaseError(ValueError):
    pass


def stub_line(name: str, indent: str) -> str:
    return f'{indent}raise NotImplementedError("{name}: not implemented yet -- write this part, then run the check below")'


def strip_solution(source: str, name: str, where: str) -> str:
    """Replace each BEGIN..END SOLUTION region of `source` with the NotImplementedError line."""
    out: list[str] = []
    inside = False
    regions = 0
    for number, line in enumerate(source.split("\n"), start=1):
        marker = line.strip()
        if marker == BEGIN:
            if inside:
                raise ReleaseError(f"{where}, line {number}: {BEGIN} inside another solution region")
            inside = True
            regions += 1
            out.append(stub_line(name, line[: len(line) - len(line.lstrip())]))
        elif marker == END:
            if not inside:
                raise ReleaseError(f"{where}, line {number}: {END} without a {BEGIN}")
            inside = False
        elif not inside:
            out.append(line)
    if inside:
        raise ReleaseError(f"{where}: {BEGIN} is never closed")
    if regions == 0:
        raise ReleaseError(f"{where}: an exercise cell without a {BEGIN} region")
    return "\n".join(out)


def release_notebook(solution: nbformat.NotebookNode, label: str = "notebook") -> nbformat.NotebookNode:
    """The learner version of a solution notebook (a new object; the input is not modified)."""
    notebook = copy.deepcopy(solution)
    for index, cell in enumerate(notebook.cells):
        source = cell_source(cell)
        names = [tag.split(":", 1)[1] for tag in cell_tags(cell) if tag.startswith("exercise:")]
        where = f"{label}, cell {index}"
        if names:
            if len(names) > 1 or cell.cell_type != "code":
                raise ReleaseError(f"{where}: an exercise cell must be one code cell with one exercise tag")
            source = strip_solution(source, names[0], where)
        elif BEGIN in source or END in source:
            raise ReleaseError(f"{where}: solution markers outside an exercise cell")
        cell.source = source
        tags = cell_tags(cell)
        cell.metadata = nbformat.NotebookNode({"tags": tags} if tags else {})
        if cell.cell_type == "code":
            cell.outputs = []
            cell.execution_count = None
    metadata = nbformat.NotebookNode()
    if "kernelspec" in solution.metadata:
        metadata.kernelspec = copy.deepcopy(solution.metadata.kernelspec)
    if "language_info" in solution.metadata:
        metadata.language_info = nbformat.NotebookNode({"name": solution.metadata.language_info.get("name", "python")})
    notebook.metadata = metadata
    return notebook


def released_text(solution_path: Path) -> str:
    solution = nbformat.read(str(solution_path), as_version=4)
    return nbformat.writes(release_notebook(solution, solution_path.name)) + "\n"


def release_lab(lab_folder: str, source_dir: Path | None = None, out_dir: Path | None = None,
                check_only: bool = False) -> list[Path]:
    """Write (or, with check_only, compare) the learner notebooks of one lab; return the paths that changed."""
    source_dir = source_dir or PACKAGE_DIR / lab_folder
    out_dir = out_dir or REPO_ROOT / lab_folder
    solutions = sorted(source_dir.glob("*.ipynb"))
    if not solutions:
        raise ReleaseError(f"no solution notebooks in {source_dir}")
    changed = []
    for path in solutions:
        text = released_text(path)
        target = out_dir / path.name
        if target.is_file() and target.read_text(encoding="utf-8") == text:
            continue
        changed.append(target)
        if not check_only:
            out_dir.mkdir(parents=True, exist_ok=True)
            target.write_text(text, encoding="utf-8")
    return changed


def lab_folders() -> list[str]:
    """Labs that have solution notebooks (autograder/<lab>/*.ipynb)."""
    return sorted({path.parent.name for path in PACKAGE_DIR.glob("lab*/*.ipynb")})
