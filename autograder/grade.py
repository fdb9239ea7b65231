"""`python -m autograder grade`: grade a batch of submissions, one sandboxed child per student.

A submission is a notebook, a folder or a zip; the student's name is the file's or folder's name (without
its extension), made unique when two collide. For each exercise the grader looks through the student's
notebooks, the one with the lab's file name first, for the cell tagged `exercise:<name>` (else the cell
defining the symbol), and runs all of them in one child (isolate.run_sources), visible and hidden cases alike.

Hidden tests: `--tests DIR` names an instructor folder holding `<lab>.py` with dots as underscores
(`lab0_1.py`). That file is trusted Python, imported only here in the parent, and defines
`CASES = {"exercise name": [Case(...), ...]}` in the format of spec.py; its cases are added to the exercises
as hidden cases (feedback names them but never shows their inputs or values). Only inputs travel to the child.

Writing the gradebook (gradebook.py) happens after every child is finished and every sandbox process is
gone, so nothing a submission writes into the output folder survives in the files the grader writes.
"""

from __future__ import annotations

import dataclasses
import os
import importlib.util
import re
import shutil
import stat
import sys
import tempfile
import time
import zipfile
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path

from . import sandbox
from .isolate import ViewCache, run_sources
from .notebook import ExerciseSource, extract_from_notebooks
from .runner import ExerciseResult, missing_result, prepare
from .spec import Lab

MAX_ZIP_BYTES = 200 * 1024 * 1024  # uncompressed notebooks taken from one zip
MAX_ZIP_MEMBERS = 1000
MAX_FOLDER_DEPTH = 20  # levels of subfolders walked in a folder submission
MAX_FOLDER_ENTRIES = 10_000  # files and folders in one folder submission
RESERVED_NAMES = {"grades.csv"}
PRINTED_NOTE_BYTES = 1_000_000  # printing more than this is mentioned in the feedback (it costs time)


@dataclass
class Submission:
    student: str
    notebooks: list[Path]
    problem: str = ""  # why it cannot be graded (then status "invalid")


@dataclass
class StudentGrade:
    student: str
    status: str  # ok | timeout | crash | invalid
    results: list[ExerciseResult]
    execution_time: float
    notes: list[str] = field(default_factory=list)

    @property
    def score(self) -> float:
        return sum(result.score for result in self.results)


DEFAULT_BUDGET_S = 240.0  # wall time one submission may take in all, by default


@dataclass(frozen=True)
class GradeOptions:
    timeout_s: float | None = None  # per submission; None: DEFAULT_BUDGET_S
    memory_mb: int | None = None  # resident memory of a submission's processes; None: the lab's memory_mb
    jobs: int = 1
    allow_reference: bool = False
    progress: bool = True
    sandbox: str = "auto"  # auto | bwrap | container (sandbox.choose_mode)
    masked: tuple[str, ...] = ()  # more host folders the sandbox must never show (hidden tests, --out)


def grade(lab: Lab, paths: list[str | Path], options: GradeOptions = GradeOptions()) -> list[StudentGrade]:
    """Grade every submission; one StudentGrade per submission, in the order given.

    Raises sandbox.SandboxUnavailable, before running anything, when this machine cannot build the sandbox."""
    from tqdm import tqdm

    mode = sandbox.choose_mode(options.sandbox)
    if mode == "container":
        sandbox.check_container_mode(sandbox.project_paths() + list(options.masked))
    with tempfile.TemporaryDirectory(prefix="autograder-unzip-") as unzipped, \
            tempfile.TemporaryDirectory(prefix="autograder-views-") as staging:
        os.chmod(staging, 0o755)  # a sandbox uid reads the (redacted) views
        views = ViewCache(staging, options.masked, redact=not options.allow_reference, private=mode == "container")
        submissions = collect_submissions([Path(p) for p in paths], Path(unzipped))
        for exercise in lab.exercises:  # expected values once, here, before any thread starts
            for case in exercise.cases:
                prepare(exercise, case)

        def grade_safely(submission: Submission) -> StudentGrade:
            try:
                return grade_one(lab, submission, options, mode, views)
            except Exception as exc:  # a grader failure on one submission must not lose the others
                why = f"the grader failed on this submission ({type(exc).__name__}: {exc}); please tell the staff"
                return StudentGrade(submission.student, "crash", [missing_result(e, True, why) for e in lab.exercises],
                                    0.0, [why])

        grades: dict[str, StudentGrade] = {}
        bar = tqdm(total=len(submissions), desc=f"grading {lab.name}", unit="student", file=sys.stderr,
                   disable=not options.progress)
        try:
            with ThreadPoolExecutor(max_workers=max(1, options.jobs)) as pool:
                futures = [pool.submit(grade_safely, submission) for submission in submissions]
                for future in as_completed(futures):
                    grade_done = future.result()
                    grades[grade_done.student] = grade_done
                    bar.update(1)
        finally:
            bar.close()
    return [grades[submission.student] for submission in submissions]


MODE_NOTES = {
    "bwrap": "graded in a bubblewrap sandbox (no network, private files, the reference absent)",
    "container": "graded in container mode: as an unprivileged user, without namespaces (this machine refuses "
                 "them); the reference absent",
}

MEMORY_NOTES = {"cgroup": "; memory limited by the kernel (a cgroup's memory.max)"}


def grade_one(lab: Lab, submission: Submission, options: GradeOptions, mode: str, views: ViewCache) -> StudentGrade:
    start = time.monotonic()
    notes: list[str] = []
    sources: list[ExerciseSource] = []
    if not submission.problem:
        sources, unreadable = find_sources(lab, submission.notebooks)
        notes += unreadable
        if unreadable and len(unreadable) == len(submission.notebooks):
            submission.problem = "; ".join(unreadable)
    if submission.problem:
        results = [missing_result(e, True, f"could not grade: {submission.problem}") for e in lab.exercises]
        return StudentGrade(submission.student, "invalid", results, time.monotonic() - start, notes)
    run = run_sources(lab, sources, mode=mode, include_hidden=True, memory_mb=options.memory_mb,
                      budget_s=options.timeout_s or DEFAULT_BUDGET_S, views=views)
    if run.output_bytes > PRINTED_NOTE_BYTES:
        notes.append(f"the code printed {run.output_bytes / 1e6:,.0f} MB; printed output is neither shown nor graded")
    notes.append(MODE_NOTES[mode] + MEMORY_NOTES.get(run.memory_by, ""))
    return StudentGrade(submission.student, run.status, run.results, time.monotonic() - start, notes)


def find_sources(lab: Lab, notebooks: list[Path]) -> tuple[list[ExerciseSource], list[str]]:
    """Each exercise's cell, looked for in the notebook named like the lab's first, by tag before by
    definition; and what could not be read. The notebooks are parsed in a child process with limits
    (notebook.extract_from_notebooks), and a notebook that is a symbolic link is refused."""
    sources, problems = extract_from_notebooks(notebooks, lab, lab.exercise_names, follow_links=False)
    return sources, [f"{path.name}: {problem}" for path, problem in zip(notebooks, problems) if problem]


def collect_submissions(paths: list[Path], unzip_to: Path) -> list[Submission]:
    """One Submission per path, named after it and made unique; zips are unpacked (notebooks only).

    Symbolic links are refused, never followed: a link could make the grader read, as its own user, a
    classmate's notebook or any file it may read. A refused submission gets a problem (status "invalid")."""
    submissions: list[Submission] = []
    taken: set[str] = set(RESERVED_NAMES)
    for path in paths:
        student = unique_name(student_name(path), taken)
        if path.is_symlink():
            submission = Submission(student, [], f"symbolic links are not accepted: {_clip(path.name)}")
        elif path.is_dir():
            submission = Submission(student, *notebooks_in(path))
        elif path.suffix.lower() == ".zip":
            folder = unzip_to / student
            problem = unzip_notebooks(path, folder)
            submission = Submission(student, *(notebooks_in(folder) if not problem else ([], problem)))
        elif path.is_file():
            submission = Submission(student, [path])
        else:
            submission = Submission(student, [], f"{path}: no such file or folder")
        if not submission.problem and not submission.notebooks:
            submission.problem = "no notebook (.ipynb file) in the submission"
        submissions.append(submission)
    return submissions


def student_name(path: Path) -> str:
    name = path.name if path.is_dir() else path.stem
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "student"


def unique_name(name: str, taken: set[str]) -> str:
    candidate, number = name, 2
    while candidate in taken:
        candidate, number = f"{name}_{number}", number + 1
    taken.add(candidate)
    return candidate


def notebooks_in(folder: Path) -> tuple[list[Path], str]:
    """The notebooks in a folder submission, and "" or why the submission is refused.

    The walk never follows a link: a symbolic link anywhere refuses the submission. It is bounded
    (MAX_FOLDER_DEPTH levels, MAX_FOLDER_ENTRIES entries), so a crafted folder costs neither the grader's
    stack nor its time."""
    notebooks: list[Path] = []
    entries = 0
    pending = [(folder, 0)]
    while pending:
        directory, depth = pending.pop()
        try:
            with os.scandir(directory) as listing:
                for entry in listing:
                    entries += 1
                    if entries > MAX_FOLDER_ENTRIES:
                        return [], f"the submission holds more than {MAX_FOLDER_ENTRIES:,} files and folders"
                    path = Path(entry.path)
                    if entry.is_symlink():
                        return [], f"symbolic links are not accepted: {_relative(path, folder)}"
                    if entry.is_dir(follow_symlinks=False):
                        if depth + 1 > MAX_FOLDER_DEPTH:
                            return [], (f"folders are nested more than {MAX_FOLDER_DEPTH} levels deep: "
                                        f"{_relative(path, folder)}")
                        pending.append((path, depth + 1))
                    elif entry.is_file(follow_symlinks=False) and entry.name.endswith(".ipynb"):
                        if not {".ipynb_checkpoints", "__MACOSX"} & set(path.relative_to(folder).parts):
                            notebooks.append(path)
        except OSError as exc:
            return [], f"cannot read the folder {_relative(directory, folder) or '.'} ({exc.strerror or exc})"
    return sorted(notebooks), ""


def _relative(path: Path, folder: Path) -> str:
    return _clip(path.relative_to(folder).as_posix() if path != folder else "")


def _clip(text: str, limit: int = 200) -> str:
    """Names come from the submission: keep messages short whatever their length."""
    return text if len(text) <= limit else text[: limit // 2] + "..." + text[-(limit // 2 - 3):]


def unzip_notebooks(archive: Path, folder: Path) -> str:
    """Extract the .ipynb members of a zip into `folder`, under flat safe names; "" or what went wrong.

    A member that is a symbolic link (Unix mode in the external attributes) refuses the whole zip, as a link
    does in a folder submission."""
    try:
        if archive.is_file() and archive.stat().st_size > MAX_ZIP_BYTES:
            return f"{archive.name}: the zip is larger than {MAX_ZIP_BYTES:,} bytes"
        with zipfile.ZipFile(archive) as zipped:
            links = [m.filename for m in zipped.infolist() if stat.S_ISLNK(m.external_attr >> 16)]
            if links:
                return f"{archive.name}: symbolic links are not accepted: {_clip(links[0])}"
            members = [m for m in zipped.infolist() if m.filename.endswith(".ipynb") and not m.is_dir()
                       and ".ipynb_checkpoints" not in m.filename and "__MACOSX" not in m.filename]
            if len(members) > MAX_ZIP_MEMBERS or sum(m.file_size for m in members) > MAX_ZIP_BYTES:
                return f"{archive.name}: the zip holds too many or too large notebooks"
            folder.mkdir(parents=True)
            taken: set[str] = set()
            for member in members:  # flat names: no path from the archive is ever used as a path
                name = unique_name(Path(member.filename).stem, taken) + ".ipynb"
                with zipped.open(member) as source, open(folder / name, "wb") as target:
                    shutil.copyfileobj(source, target)
    except (zipfile.BadZipFile, OSError, ValueError, EOFError, NotImplementedError) as exc:
        return f"{archive.name}: not a readable zip ({_clip(str(exc))})"
    return ""


def load_hidden_tests(lab: Lab, tests_dir: str | Path) -> Lab:
    """The lab with the instructor's hidden cases added (see the module docstring for the file format)."""
    path = Path(tests_dir) / (lab.name.replace(".", "_") + ".py")
    if not path.is_file():
        raise ValueError(f"--tests {tests_dir}: expected a file {path.name} defining CASES for {lab.name}")
    inside = [p for p in sandbox.package_dirs().values() if Path(tests_dir).resolve().is_relative_to(p)]
    if inside:  # the sandbox's redacted copy is made from those folders
        raise ValueError(f"--tests {tests_dir}: keep hidden tests outside the package folder {inside[0]}")
    spec = importlib.util.spec_from_file_location(f"hidden_tests_{lab.name.replace('.', '_')}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    extra = getattr(module, "CASES", None)
    if not isinstance(extra, dict):
        raise ValueError(f"{path}: must define CASES = {{exercise name: [Case, ...]}}")
    for name in extra:
        lab.exercise(name)  # an unknown exercise name is an error, not a silently ignored test
    exercises = tuple(
        dataclasses.replace(exercise, cases=exercise.cases + tuple(
            dataclasses.replace(case, visible=False) for case in extra.get(exercise.name, ())))
        for exercise in lab.exercises
    )
    return dataclasses.replace(lab, exercises=exercises)
