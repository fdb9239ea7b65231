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
import importlib.util
import queue
import re
import shutil
import sys
import tempfile
import time
import uuid
import zipfile
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path

from . import sandbox
from .isolate import default_wall_s, run_sources
from .notebook import ExerciseSource, NotebookError, exercise_sources, read_notebook
from .runner import ExerciseResult, missing_result, prepare
from .spec import Lab

MAX_ZIP_BYTES = 200 * 1024 * 1024  # uncompressed notebooks taken from one zip
MAX_ZIP_MEMBERS = 1000
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


@dataclass(frozen=True)
class GradeOptions:
    timeout_s: float | None = None  # per submission; None: start-up plus every case's own limit
    memory_mb: int | None = None  # None: the lab's memory_mb
    jobs: int = 1
    allow_reference: bool = False
    progress: bool = True
    mode: str | None = None  # sandbox isolation mode; None: the strongest available


def grade(lab: Lab, paths: list[str | Path], options: GradeOptions = GradeOptions()) -> list[StudentGrade]:
    """Grade every submission; one StudentGrade per submission, in the order given."""
    from tqdm import tqdm

    with tempfile.TemporaryDirectory(prefix="autograder-unzip-") as unzipped:
        submissions = collect_submissions([Path(p) for p in paths], Path(unzipped))
        for exercise in lab.exercises:  # expected values once, here, before any thread starts
            for case in exercise.cases:
                prepare(exercise, case)
        hide = () if options.allow_reference else tuple(name for e in lab.exercises for name in e.hides)
        token = uuid.uuid4().hex
        slots: queue.Queue[int] = queue.Queue()
        for slot in range(options.jobs):
            slots.put(slot)

        def grade_in_a_slot(submission: Submission) -> StudentGrade:
            slot = slots.get()
            try:
                return grade_one(lab, submission, options, hide, slot, token)
            except Exception as exc:  # a grader failure on one submission must not lose the others
                why = f"the grader failed on this submission ({type(exc).__name__}: {exc}); please tell the staff"
                return StudentGrade(submission.student, "crash", [missing_result(e, True, why) for e in lab.exercises],
                                    0.0, [why])
            finally:
                slots.put(slot)

        grades: dict[str, StudentGrade] = {}
        bar = tqdm(total=len(submissions), desc=f"grading {lab.name}", unit="student", file=sys.stderr,
                   disable=not options.progress)
        try:
            with ThreadPoolExecutor(max_workers=max(1, options.jobs)) as pool:
                futures = [pool.submit(grade_in_a_slot, submission) for submission in submissions]
                for future in as_completed(futures):
                    grade_done = future.result()
                    grades[grade_done.student] = grade_done
                    bar.update(1)
        finally:
            bar.close()
            sandbox.kill_marked(token)  # anything that escaped a warden
    return [grades[submission.student] for submission in submissions]


def grade_one(lab: Lab, submission: Submission, options: GradeOptions, hide: tuple[str, ...], slot: int = 0,
              token: str = "") -> StudentGrade:
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
    wall_s = options.timeout_s or default_wall_s(lab, sources, include_hidden=True)
    limits = sandbox.Limits(wall_s=wall_s, memory_mb=options.memory_mb or lab.memory_mb, mode=options.mode)
    run = run_sources(lab, sources, include_hidden=True, limits=limits, hide=hide, slot=slot, token=token)
    for exercise, names in run.hidden_attempts.items():
        notes.append(f"{exercise}: the cell tried to use the hidden reference {names}; grading hides the "
                     "reference implementation of the exercises being graded")
    if run.output_bytes > PRINTED_NOTE_BYTES:
        notes.append(f"the code printed {run.output_bytes / 1e6:,.0f} MB; printed output is neither shown nor graded")
    if run.mode == "none":
        notes.append("the sandbox ran without network and PID namespaces on this machine")
    return StudentGrade(submission.student, run.status, run.results, time.monotonic() - start, notes)


def find_sources(lab: Lab, notebooks: list[Path]) -> tuple[list[ExerciseSource], list[str]]:
    """Each exercise's cell, looked for in the notebook named like the lab's first, by tag before by
    definition; and what could not be read."""
    readable, unreadable = {}, []
    for path in notebooks:
        try:
            readable[path] = read_notebook(path)
        except NotebookError as exc:
            unreadable.append(f"{path.name}: {str(exc).split(': ', 1)[-1]}")
    sources = []
    for exercise in lab.exercises:
        ordered = sorted(readable, key=lambda path: (path.name != exercise.notebook, str(path)))
        found = [exercise_sources(readable[path], lab, [exercise.name])[0] for path in ordered]
        by_tag = [source for source in found if source.how == "tag"]
        by_definition = [source for source in found if source.how == "definition"]
        sources.append((by_tag or by_definition or [ExerciseSource(exercise.name, None, "missing")])[0])
    return sources, unreadable


def collect_submissions(paths: list[Path], unzip_to: Path) -> list[Submission]:
    """One Submission per path, named after it and made unique; zips are unpacked (notebooks only)."""
    submissions: list[Submission] = []
    taken: set[str] = set(RESERVED_NAMES)
    for path in paths:
        student = unique_name(student_name(path), taken)
        if path.is_dir():
            submissions.append(Submission(student, notebooks_in(path)))
        elif path.suffix.lower() == ".zip":
            folder = unzip_to / student
            problem = unzip_notebooks(path, folder)
            submissions.append(Submission(student, notebooks_in(folder), problem))
        elif path.is_file():
            submissions.append(Submission(student, [path]))
        else:
            submissions.append(Submission(student, [], f"{path}: no such file or folder"))
        if not submissions[-1].problem and not submissions[-1].notebooks:
            submissions[-1].problem = "no notebook (.ipynb file) in the submission"
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


def notebooks_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*.ipynb") if ".ipynb_checkpoints" not in p.parts and p.is_file())


def unzip_notebooks(archive: Path, folder: Path) -> str:
    """Extract the .ipynb members of a zip into `folder`, under flat safe names; "" or what went wrong."""
    try:
        with zipfile.ZipFile(archive) as zipped:
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
    except (zipfile.BadZipFile, OSError, ValueError) as exc:
        return f"{archive.name}: not a readable zip ({exc})"
    return ""


def load_hidden_tests(lab: Lab, tests_dir: str | Path) -> Lab:
    """The lab with the instructor's hidden cases added (see the module docstring for the file format)."""
    path = Path(tests_dir) / (lab.name.replace(".", "_") + ".py")
    if not path.is_file():
        raise ValueError(f"--tests {tests_dir}: expected a file {path.name} defining CASES for {lab.name}")
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
