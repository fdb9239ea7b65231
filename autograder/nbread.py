"""Reading notebook files and finding exercise cells, with limits: the standard library (nbformat only to
upgrade notebooks older than version 4).

This module imports nothing else (no torch, nothing of the autograder package), so it can run on its own as a
small child process with a memory and a time limit (`python -I nbread.py`: see `main` for the request and
the answer). notebook.py starts it that way for notebooks that come from learners, and imports the same
functions to read trusted notebooks in its own process (release, tests).

Rules for finding an exercise's cell (also described in notebook.py): the first code cell tagged
`exercise:<name>`, else the last code cell that defines the exercise's symbol at top level. Among several
notebooks, the one named like the exercise's lab notebook is looked at first, then the others by path; a tag
in any notebook wins over a definition in any notebook.
"""

from __future__ import annotations

import ast
import json
import os
import re
import stat
import sys

# Limits on what a notebook may be. Learner notebooks with outputs are a few MB; solution cells a few thousand
# characters. Anything larger is refused before any parsing, with a message naming the limit and the size.
MAX_NOTEBOOK_BYTES = 20 * 1024 * 1024  # the .ipynb file, checked with stat before it is read
MAX_CELL_CHARS = 200_000  # the source of one code cell (a worst-case cell parses in about 0.5 s, 200 MB)
MAX_CELLS = 2000  # cells of any kind in one notebook
# Limits of the reading child (notebook.py starts it): resident data and wall-clock time for one request.
CHILD_MEMORY_BYTES = 1024 * 1024 * 1024  # RLIMIT_DATA: heap and anonymous mappings; no torch is imported here
CHILD_TIME_S = 30.0


class NotebookError(ValueError):
    """The file is not a readable notebook (missing, too large, empty, invalid JSON, not nbformat 4).

    str(error) is "<path>: <reason>"; `reason` alone is the part without the path. NotebookError(message) with
    one argument takes a whole message, such as the problem extract_exercise_sources returns."""

    def __init__(self, path: object, reason: str | None = None) -> None:
        super().__init__(str(path) if reason is None else f"{path}: {reason}")
        self.reason = str(path) if reason is None else reason


# -- reading one file -------------------------------------------------------------------------------------------


def read_text(path: str, follow_links: bool = True) -> str:
    """The file's text, after checking that it is a plain file within MAX_NOTEBOOK_BYTES.

    follow_links=False: a symbolic link is refused (O_NOFOLLOW), even one swapped in after the caller looked."""
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | (0 if follow_links else getattr(os, "O_NOFOLLOW", 0))
    try:
        fd = os.open(path, flags)  # O_NONBLOCK: a FIFO named x.ipynb must not hang the reader
    except FileNotFoundError:
        raise NotebookError(path, "no such file") from None
    except OSError as exc:
        if os.path.islink(path) and not follow_links:
            raise NotebookError(path, "symbolic links are not accepted") from None
        raise NotebookError(path, f"cannot open the file ({exc.strerror})") from None
    with os.fdopen(fd, "rb") as f:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise NotebookError(path, "not a plain file")
        check_size(path, info.st_size)
        data = f.read(MAX_NOTEBOOK_BYTES + 1)
    check_size(path, len(data))  # the file may have grown since fstat
    return data.decode("utf-8", errors="replace")


def check_size(path: object, size: int) -> None:
    if size_problem(size):
        raise NotebookError(path, size_problem(size))


def size_problem(size: int) -> str:
    if size <= MAX_NOTEBOOK_BYTES:
        return ""
    return (f"the file is {size:,} bytes; notebooks larger than {MAX_NOTEBOOK_BYTES:,} bytes are not accepted "
            "(clear large outputs and save again)")


def parse_notebook(text: str, path: object = "notebook") -> dict:
    """The nbformat-4 notebook in `text`, as plain JSON data; NotebookError if empty, invalid or over a limit.

    Version 4 (what Jupyter has written since 2015) is read with the json module alone; nbformat is imported
    only to upgrade an older notebook (its import costs seconds: its schema validator builds a grammar)."""
    if not text.strip():
        raise NotebookError(path, "the file is empty")
    try:
        document = json.loads(text)
    except (ValueError, RecursionError) as exc:  # RecursionError: JSON nested deeper than the parser's stack
        raise NotebookError(path, f"not a valid notebook ({type(exc).__name__}: {str(exc)[:200]})") from None
    except MemoryError:
        raise NotebookError(path, "the notebook is too large to read (out of memory)") from None
    version = document.get("nbformat") if isinstance(document, dict) else None
    if type(version) is not int:
        raise NotebookError(path, "not a valid notebook (no nbformat version number)")
    if version > 4:
        raise NotebookError(path, f"not a valid notebook (nbformat version {version} is not supported)")
    if version < 4:
        document = _upgrade(text, path)
    cells = document.get("cells")
    if not isinstance(cells, list):
        raise NotebookError(path, "the notebook has no list of cells")
    if len(cells) > MAX_CELLS:
        raise NotebookError(path, f"the notebook has {len(cells):,} cells; at most {MAX_CELLS:,} are accepted")
    for index, cell in enumerate(cells):
        if not isinstance(cell, dict):
            raise NotebookError(path, f"not a valid notebook (cell {index + 1} is not an object)")
        if cell.get("cell_type") == "code" and len(cell_source(cell)) > MAX_CELL_CHARS:
            raise NotebookError(path, f"code cell {index + 1} has {len(cell_source(cell)):,} characters; code "
                                      f"cells of more than {MAX_CELL_CHARS:,} characters are not accepted")
    return document


def _upgrade(text: str, path: object) -> dict:
    import nbformat

    try:
        return nbformat.reads(text, as_version=4)
    except MemoryError:
        raise NotebookError(path, "the notebook is too large to read (out of memory)") from None
    except Exception as exc:  # nbformat raises several types for bad structure
        raise NotebookError(path, f"not a valid notebook ({type(exc).__name__}: {str(exc)[:200]})") from None


def read_notebook(path: str, follow_links: bool = True) -> dict:
    return parse_notebook(read_text(path, follow_links), path)


# -- cells ------------------------------------------------------------------------------------------------------


def cell_source(cell) -> str:
    source = cell.get("source", "")
    if isinstance(source, list):
        return "".join(part for part in source if isinstance(part, str))
    return source if isinstance(source, str) else ""


def cell_tags(cell) -> list[str]:
    metadata = cell.get("metadata")
    tags = metadata.get("tags", []) if isinstance(metadata, dict) else []
    return [tag for tag in tags if isinstance(tag, str)] if isinstance(tags, list) else []


def plain_python(source: str) -> str:
    """Comment out IPython-only lines (%magic, !shell) so the cell runs as plain Python."""
    lines = []
    for line in source.splitlines():
        stripped = line.lstrip()
        lines.append(line.replace(stripped, "# " + stripped, 1) if stripped.startswith(("%", "!")) else line)
    return "\n".join(lines) + "\n"


def top_level_definitions(source: str) -> frozenset[str]:
    """Names defined at top level by `def`, `async def` or `class`; empty if the cell does not parse.

    A hostile cell can be too deep for the parser (RecursionError) or too large for memory: it defines nothing."""
    try:
        tree = ast.parse(plain_python(source))
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return frozenset()
    return frozenset(node.name for node in tree.body
                     if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)))


def defines(source: str, symbol: str) -> bool:
    """Whether `source` defines `symbol` at top level (a def, an async def or a class)."""
    return might_define(source, symbol) and symbol in top_level_definitions(source)


def might_define(source: str, symbol: str) -> bool:
    """A cheap test that is true for every cell defining `symbol` at top level (whose `def`/`class` starts a
    line), so cells that cannot define it are never parsed."""
    pattern = r"^\f*(?:async[\s\\]+)?(?:def|class)[\s\\]+" + re.escape(symbol) + r"\b"
    return re.search(pattern, source, re.MULTILINE) is not None


class Cells:
    """One notebook's code cells, each parsed at most once (however many symbols are looked for)."""

    def __init__(self, notebook) -> None:
        self.sources = [cell_source(cell) for cell in notebook["cells"] if cell.get("cell_type") == "code"]
        self.tags = [cell_tags(cell) for cell in notebook["cells"] if cell.get("cell_type") == "code"]
        self._definitions: dict[int, frozenset[str]] = {}

    def tagged(self, tag: str) -> str | None:
        return next((source for source, tags in zip(self.sources, self.tags) if tag in tags), None)

    def defining(self, symbol: str) -> str | None:
        for index in reversed(range(len(self.sources))):  # the last definition wins, as when the notebook runs
            source = self.sources[index]
            if might_define(source, symbol):
                if index not in self._definitions:
                    self._definitions[index] = top_level_definitions(source)
                if symbol in self._definitions[index]:
                    return source
        return None


def find(notebooks: list[tuple[str, Cells]], exercises: list[dict]) -> list[dict]:
    """For each exercise ({"name", "tag", "symbol", "notebook"}): {"source", "how", "path"}, how being "tag",
    "definition" or "missing". `notebooks` are (path, Cells) of the readable notebooks."""
    found = []
    for exercise in exercises:
        ordered = sorted(notebooks, key=lambda item: (os.path.basename(item[0]) != exercise.get("notebook"),
                                                      str(item[0])))
        answer = {"source": None, "how": "missing", "path": None}
        for how, lookup, key in (("tag", Cells.tagged, "tag"), ("definition", Cells.defining, "symbol")):
            hit = next(((path, source) for path, cells in ordered
                        if (source := lookup(cells, exercise[key])) is not None), None)
            if hit:
                answer = {"source": plain_python(hit[1]), "how": how, "path": hit[0]}
                break
        found.append(answer)
    return found


def answer(request: dict) -> dict:
    """What the child answers: {"problems": ["" or the reason each path is unreadable], "found": find(...)}."""
    follow_links = bool(request.get("follow_links", True))
    problems, readable = [], []
    for path in request["paths"]:
        try:
            readable.append((path, Cells(read_notebook(path, follow_links))))
            problems.append("")
        except NotebookError as exc:
            problems.append(exc.reason)
        except MemoryError:
            problems.append("the notebook is too large to read (out of memory)")
    return {"problems": problems, "found": find(readable, request["exercises"])}


# -- the limited child -----------------------------------------------------------------------------------------


def limit_this_process(memory_bytes: int, time_s: float) -> None:
    """Cap this process's data memory and CPU time (the parent also stops it after `time_s` of wall time).

    RLIMIT_DATA, not RLIMIT_AS: address space says little about memory (a CUDA torch maps gigabytes of it);
    this process maps only Python, and its heap is what a hostile notebook could grow."""
    try:
        import resource
    except ImportError:  # not a POSIX system: the parent's time limit still applies
        return
    for limit, value in ((resource.RLIMIT_DATA, int(memory_bytes)), (resource.RLIMIT_CPU, int(time_s) + 5)):
        soft, hard = resource.getrlimit(limit)
        if hard != resource.RLIM_INFINITY:
            value = min(value, hard)
        if soft == resource.RLIM_INFINITY or soft > value:
            resource.setrlimit(limit, (value, hard))


def main() -> int:
    """Request on stdin: {"paths": [...], "exercises": [{"name", "tag", "symbol", "notebook"}], "follow_links",
    "memory_bytes", "time_s"}. Answer on stdout: the JSON of `answer(request)`."""
    request = json.loads(sys.stdin.read())
    limit_this_process(request.get("memory_bytes", CHILD_MEMORY_BYTES), request.get("time_s", CHILD_TIME_S))
    json.dump(answer(request), sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
