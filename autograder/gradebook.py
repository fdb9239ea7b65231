"""Writing a graded batch: DIR/grades.csv, and per student DIR/<student>/results.json and feedback.md.

results.json follows Gradescope's autograder format: score, execution_time, output and one test per case
(name, score, max_score, status, output, visibility). Hidden cases get visibility "after_due_date"; their
output is the judge's feedback, which never shows hidden inputs or values (runner.judge).

Versions: the project's version plus a short hash of the package's Python sources, so a gradebook says
exactly which grader and which reference produced it.

The output folder is created fresh or must hold only an earlier gradebook (`check_out_dir`, also called by the
command line before grading starts): anything else there is refused, never overwritten or followed.

feedback.md is Markdown that a browser may render, and much of its text comes from the student (names,
messages of their exceptions, file names in notes). Every such text goes through `markdown_text`: one line,
HTML special characters as entities and Markdown punctuation backslash-escaped, so it can neither forge
headings, table cells, emphasis, links or code, nor inject HTML.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import re
import unicodedata
import uuid
from importlib import metadata
from pathlib import Path

from .grade import StudentGrade
from .report import points
from .spec import Lab

PACKAGE_ROOT = Path(__file__).resolve().parent.parent
MARKER = ".autograder-gradebook"  # written into every output folder: this folder holds a gradebook
STUDENT_FILES = {"results.json", "feedback.md"}
MAX_TEXT = 2000  # characters of one student-originated text in feedback.md


def version_of(package: str) -> str:
    try:
        release = metadata.version("nano-vllm-labs")
    except metadata.PackageNotFoundError:
        release = "unknown"
    digest = hashlib.sha256()
    for path in sorted((PACKAGE_ROOT / package).rglob("*.py")):
        digest.update(path.relative_to(PACKAGE_ROOT).as_posix().encode() + b"\0" + path.read_bytes())
    return f"{release}+{digest.hexdigest()[:10]}"


def check_out_dir(out_dir: str | Path) -> Path:
    """Make sure `out_dir` can take a gradebook: create it (with the marker) if it does not exist; if it exists,
    it must be empty or hold only what a gradebook holds: MARKER, grades.csv and student folders holding only
    results.json and feedback.md, all plain files and folders. Raises ValueError otherwise, saying what was
    found. Call it before grading (the command line does) so a bad folder is found before hours of grading.

    An earlier gradebook without the marker (older graders) is accepted: it has the same shape."""
    out = Path(out_dir)
    if out.is_symlink() or (out.exists() and not out.is_dir()):
        raise ValueError(f"--out {out} is {'a symbolic link' if out.is_symlink() else 'not a folder'}; "
                         "choose an empty or new folder")
    out.mkdir(parents=True, exist_ok=True)
    foreign = _foreign_entries(out)
    if foreign:
        more = f" (and {len(foreign) - 1} more)" if len(foreign) > 1 else ""
        raise ValueError(f"--out {out} holds {foreign[0]}{more}, which is not part of a gradebook; "
                         "choose an empty or new folder")
    if not (out / MARKER).exists():
        _replace(out / MARKER, "This folder holds a gradebook written by `python -m autograder grade`;\n"
                               "a later grading run into this folder replaces it.\n")
    return out


def _foreign_entries(out: Path) -> list[str]:
    """What in `out` a gradebook would not have (a description of each entry, at most a few)."""
    found: list[str] = []
    for entry in sorted(os.scandir(out), key=lambda entry: entry.name):
        name = repr(entry.name)
        if entry.is_symlink():
            found.append(f"a symbolic link {name}")
        elif entry.name in (MARKER, "grades.csv"):
            if not entry.is_file(follow_symlinks=False):
                found.append(f"{name}, which is not a plain file")
        elif entry.is_dir(follow_symlinks=False):
            for inner in sorted(os.scandir(entry.path), key=lambda inner: inner.name):
                if inner.name not in STUDENT_FILES or inner.is_symlink() or not inner.is_file(follow_symlinks=False):
                    found.append(f"{entry.name}/{inner.name!r}")
                    break
        else:
            found.append(f"the file {name}")
        if len(found) >= 5:
            break
    return found


def write_gradebook(lab: Lab, grades: list[StudentGrade], out_dir: str | Path) -> Path:
    """Write every file; returns the path of grades.csv. The folder is checked (check_out_dir) first: an
    earlier gradebook's files of the same names are replaced, anything else there stops the writing."""
    out = check_out_dir(out_dir)
    versions = [version_of("autograder"), version_of("reference")]
    for grade in grades:
        folder = out / grade.student
        folder.mkdir(exist_ok=True)  # a folder already there is a plain one (check_out_dir)
        _replace(folder / "results.json", json.dumps(gradescope_results(grade), indent=2))
        _replace(folder / "feedback.md", feedback_markdown(lab, grade, versions))
    rows = [["student", "status", *lab.exercise_names, "total", "grader_version", "reference_version"],
            ["(max points)", "", *(points(e.points) for e in lab.exercises), points(lab.points), *versions]]
    for grade in grades:
        scored = {result.exercise: result.score for result in grade.results}
        rows.append([grade.student, grade.status, *(points(scored.get(name, 0.0)) for name in lab.exercise_names),
                     points(grade.score), *versions])
    table = io.StringIO()
    csv.writer(table, lineterminator="\n").writerows(rows)
    _replace(out / "grades.csv", table.getvalue())
    return out / "grades.csv"


def gradescope_results(grade: StudentGrade) -> dict:
    tests = []
    for result in grade.results:
        for case in result.cases:
            tests.append({
                "name": f"{result.exercise}: {case.case}",
                "score": case.points,
                "max_score": case.max_points,
                "status": "passed" if case.passed else "failed",
                "output": "passed" if case.passed else f"{case.status}: {case.feedback}",
                "visibility": "visible" if case.visible else "after_due_date",
            })
    summary = [f"status: {grade.status}", f"score: {points(grade.score)}/{points(_max(grade))}", *grade.notes]
    return {"score": grade.score, "execution_time": round(grade.execution_time, 2), "output": "\n".join(summary),
            "tests": tests}


def feedback_markdown(lab: Lab, grade: StudentGrade, versions: list[str]) -> str:
    text = markdown_text
    lines = [f"# {text(lab.name)}: {text(grade.student)}", "",
             f"Score **{points(grade.score)}/{points(_max(grade))}** · status {text(grade.status)} · "
             f"graded in {grade.execution_time:.1f} s by autograder {versions[0]} (reference {versions[1]})", "",
             "| exercise | test | points | result |", "|---|---|---|---|"]
    for result in grade.results:
        for case in result.cases:
            hidden = "" if case.visible else " (hidden)"
            lines.append(f"| {text(result.exercise)} | {text(case.case)}{hidden} | {points(case.points)}/"
                         f"{points(case.max_points)} | {text(case.status)} |")
    problems = [(result.exercise, case) for result in grade.results for case in result.cases if not case.passed]
    if problems:
        lines += ["", "## What to look at", ""]
        lines += [f"- **{text(exercise)} / {text(case.case)}** ({text(case.status)}): {text(case.feedback)}"
                  for exercise, case in problems]
    notes = grade.notes + [f"{result.exercise}: {result.note}" for result in grade.results if result.note]
    if notes:
        lines += ["", "## Notes", ""] + [f"- {text(note)}" for note in notes]
    return "\n".join(lines) + "\n"


_INVISIBLE = {"Cc", "Cf", "Cs", "Zl", "Zp"}  # controls, bidi and zero-width marks, lone surrogates, line breaks
_MARKDOWN = re.compile(r"([\\`*#\[\]|~${}])")  # the backslash too: it is escaped like the rest
# `_` between two letters or digits (snake_case) cannot start or end emphasis in CommonMark: left as it is.
_UNDERSCORE = re.compile(r"(?<![^\W_])_|_(?![^\W_])")


def markdown_text(value: object) -> str:
    """`value` as inline Markdown that shows exactly its characters and nothing more: no new line (so no
    heading, list, quote or table row can start), `&`, `<` and `>` as HTML entities (no tag, no entity of its
    own), and Markdown punctuation backslash-escaped (no emphasis, code span, link, table cell or math).
    Clipped to MAX_TEXT characters before escaping, so an escape is never cut in half."""
    raw = str(value)
    if len(raw) > MAX_TEXT:
        raw = raw[: MAX_TEXT - 3] + "..."
    raw = "".join(" " if unicodedata.category(char) in _INVISIBLE else char for char in raw)
    raw = " ".join(raw.split())  # every kind of line break and run of spaces: one space
    raw = raw.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    raw = _UNDERSCORE.sub(r"\\_", _MARKDOWN.sub(r"\\\1", raw))
    raw = re.sub(r"^(\d+)([.)])", r"\1\\\2", raw)  # an ordered-list marker, were this text ever first
    return re.sub(r"^([-+=])", r"\\\1", raw)  # a bullet or a setext underline, likewise


def _max(grade: StudentGrade) -> float:
    return sum(result.max_score for result in grade.results)


def _replace(path: Path, text: str) -> None:
    """Write `text` to a fresh file at `path`: a new file renamed over the old one, so nothing is ever written
    through a link (symbolic or hard) that someone left there."""
    temporary = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o644)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        if path.is_dir() and not path.is_symlink():
            raise ValueError(f"{path} is a folder; refusing to write there")
        os.replace(temporary, path)
    finally:
        if temporary.exists():
            temporary.unlink()
