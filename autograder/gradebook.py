"""Writing a graded batch: DIR/grades.csv, and per student DIR/<student>/results.json and feedback.md.

results.json follows Gradescope's autograder format: score, execution_time, output and one test per case
(name, score, max_score, status, output, visibility). Hidden cases get visibility "after_due_date"; their
output is the judge's feedback, which never shows hidden inputs or values (runner.judge).

Versions: the project's version plus a short hash of the package's Python sources, so a gradebook says
exactly which grader and which reference produced it.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
from importlib import metadata
from pathlib import Path

from .grade import StudentGrade
from .report import points
from .spec import Lab

PACKAGE_ROOT = Path(__file__).resolve().parent.parent


def version_of(package: str) -> str:
    try:
        release = metadata.version("nano-vllm-labs")
    except metadata.PackageNotFoundError:
        release = "unknown"
    digest = hashlib.sha256()
    for path in sorted((PACKAGE_ROOT / package).rglob("*.py")):
        digest.update(path.relative_to(PACKAGE_ROOT).as_posix().encode() + b"\0" + path.read_bytes())
    return f"{release}+{digest.hexdigest()[:10]}"


def write_gradebook(lab: Lab, grades: list[StudentGrade], out_dir: str | Path) -> Path:
    """Write every file; returns the path of grades.csv. Existing files of the same names are replaced."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    versions = [version_of("autograder"), version_of("reference")]
    for grade in grades:
        folder = out / grade.student
        if folder.is_symlink():  # never follow a link someone left in the output folder
            folder.unlink()
        folder.mkdir(exist_ok=True)
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
    lines = [f"# {lab.name}: {grade.student}", "",
             f"Score **{points(grade.score)}/{points(_max(grade))}** · status {grade.status} · "
             f"graded in {grade.execution_time:.1f} s by autograder {versions[0]} (reference {versions[1]})", "",
             "| exercise | test | points | result |", "|---|---|---|---|"]
    for result in grade.results:
        for case in result.cases:
            hidden = "" if case.visible else " (hidden)"
            lines.append(f"| {result.exercise} | {case.case}{hidden} | {points(case.points)}/"
                         f"{points(case.max_points)} | {case.status} |")
    problems = [(result.exercise, case) for result in grade.results for case in result.cases if not case.passed]
    if problems:
        lines += ["", "## What to look at", ""]
        lines += [f"- **{exercise} / {case.case}** ({case.status}): {case.feedback}" for exercise, case in problems]
    notes = grade.notes + [f"{result.exercise}: {result.note}" for result in grade.results if result.note]
    if notes:
        lines += ["", "## Notes", ""] + [f"- {note}" for note in notes]
    return "\n".join(lines) + "\n"


def _max(grade: StudentGrade) -> float:
    return sum(result.max_score for result in grade.results)


def _replace(path: Path, text: str) -> None:
    """Write `text` to a fresh file at `path`, never through a link someone left there."""
    if path.is_symlink() or path.is_dir():
        if path.is_dir() and not path.is_symlink():
            raise ValueError(f"{path} is a folder; refusing to write there")
        path.unlink()
    path.write_text(text, encoding="utf-8")
