"""Reading a learner's notebook and taking out only its exercise cells (parent side; nothing is executed here).

A cell is exercise `<name>`'s when it carries the tag `exercise:<name>`. When no cell has the tag (a learner's
editor dropped cell metadata, or they rewrote the cell), the last code cell that defines the exercise's symbol
at top level (`def symbol` / `class symbol`) is used instead. IPython magics and shell escapes (lines starting
with % or !) are commented out, since the cell will run as plain Python.

Learner notebooks are untrusted: `extract_exercise_sources` / `extract_from_notebooks` check the file size with
stat, then parse in a child process with a memory and a time limit (nbread.py: the standard library only, plus
nbformat for notebooks older than version 4), so a huge or pathological notebook costs at most that child. The
limits (file size, code-cell size, cell count) are nbread's MAX_* constants; a notebook over one is unreadable,
with a message naming the limit and the size. `read_notebook` and `exercise_sources` parse in this process,
for trusted notebooks only (release, tests).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import nbformat

from . import nbread
from .nbread import (  # noqa: F401 (re-exported: release.py and the tests use them from here)
    CHILD_MEMORY_BYTES,
    CHILD_TIME_S,
    MAX_CELL_CHARS,
    MAX_CELLS,
    MAX_NOTEBOOK_BYTES,
    NotebookError,
    cell_source,
    cell_tags,
    defines,
    plain_python,
)
from .spec import Lab


@dataclass(frozen=True)
class ExerciseSource:
    exercise: str
    source: str | None  # None: not found
    how: str  # "tag", "definition" or "missing"


# -- trusted notebooks, parsed in this process -------------------------------------------------------------------


def read_notebook(path: str | Path) -> nbformat.NotebookNode:
    """A trusted notebook (the solution notebooks, tests): parsed here, with the same size limits."""
    return nbformat.from_dict(nbread.read_notebook(str(path)))


def exercise_sources(notebook, lab: Lab, exercises: list[str]) -> list[ExerciseSource]:
    """The source of each named exercise's cell in a notebook read by read_notebook: by tag, else by
    definition, else missing."""
    found = nbread.find([("notebook", nbread.Cells(notebook))], _wanted(lab, exercises))
    return [ExerciseSource(name, item["source"], item["how"]) for name, item in zip(exercises, found)]


# -- untrusted notebooks, parsed in a limited child --------------------------------------------------------------


def extract_exercise_sources(path: str | Path, lab: Lab, exercise_names: list[str], *,
                             follow_links: bool = True) -> tuple[list[ExerciseSource], str]:
    """Each named exercise's cell in one learner notebook, read in a limited child process.

    Returns (sources, problem): problem is "" when the notebook was read, else "<path>: <why it is unreadable>"
    (every source is then missing), the message NotebookError would carry."""
    sources, problems = extract_from_notebooks([path], lab, exercise_names, follow_links=follow_links)
    return sources, f"{path}: {problems[0]}" if problems[0] else ""


def extract_from_notebooks(paths: list[str | Path], lab: Lab, exercise_names: list[str], *,
                           follow_links: bool = True) -> tuple[list[ExerciseSource], list[str]]:
    """Each named exercise's cell, looked for in all of a learner's notebooks at once (one limited child):
    the notebook named like the exercise's lab notebook first, a tag anywhere before a definition anywhere.

    Returns (sources, problems): problems[i] is "" if paths[i] was read, else why not (without the path).
    follow_links=False: symbolic links are refused, the grader's setting for submissions."""
    paths = [str(path) for path in paths]
    problems = [_stat_problem(path, follow_links) for path in paths]
    readable = [path for path, problem in zip(paths, problems) if not problem]
    found = [{"source": None, "how": "missing"} for _ in exercise_names]
    if readable:
        request = {"paths": readable, "exercises": _wanted(lab, exercise_names), "follow_links": follow_links,
                   "memory_bytes": CHILD_MEMORY_BYTES, "time_s": CHILD_TIME_S}
        answer, failure = _ask_reader(request)
        if failure:
            problems = [problem or failure for problem in problems]
        else:
            found = answer["found"]
            read_problems = iter(answer["problems"])
            problems = [problem or next(read_problems) for problem in problems]
    sources = [ExerciseSource(name, item["source"], item["how"]) for name, item in zip(exercise_names, found)]
    return sources, problems


def _wanted(lab: Lab, exercise_names: list[str]) -> list[dict]:
    exercises = [lab.exercise(name) for name in exercise_names]
    return [{"name": e.name, "tag": e.tag, "symbol": e.symbol, "notebook": e.notebook} for e in exercises]


def _stat_problem(path: str, follow_links: bool) -> str:
    """Why the file cannot be a notebook, found with stat alone (before any child starts); "" if it may be."""
    try:
        info = os.stat(path, follow_symlinks=follow_links)
    except OSError:
        return "no such file"
    if not follow_links and os.path.islink(path):
        return "symbolic links are not accepted"
    if not os.path.isfile(path):
        return "not a plain file"
    return nbread.size_problem(info.st_size)


def _ask_reader(request: dict) -> tuple[dict, str]:
    """Run nbread.py in a child with its limits; (answer, "") or ({}, why it failed)."""
    # -I: no user site, no PYTHON* variables, not the current folder on sys.path; the script runs by its path,
    # so the autograder package (and torch) is never imported there.
    command = [sys.executable, "-I", nbread.__file__]
    try:
        done = subprocess.run(command, input=json.dumps(request), capture_output=True, text=True,
                              encoding="utf-8", errors="replace", timeout=CHILD_TIME_S)
    except subprocess.TimeoutExpired:
        return {}, f"reading the notebook took longer than {CHILD_TIME_S:g} s (too large or too complex)"
    if done.returncode == 0:
        try:
            answer = json.loads(done.stdout)
            if len(answer["problems"]) == len(request["paths"]) and len(answer["found"]) == len(request["exercises"]):
                return answer, ""
        except (ValueError, KeyError, TypeError):
            pass
    if "MemoryError" in done.stderr:
        why = "it ran out of memory"
    elif done.returncode < 0:
        why = f"the reader was stopped by signal {-done.returncode}"
    else:
        why = f"the reader ended with exit status {done.returncode}"
    return {}, f"the notebook could not be read ({why}; notebooks must stay within {MAX_NOTEBOOK_BYTES:,} bytes)"
