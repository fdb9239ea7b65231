"""Checking exercise cells in a sandboxed child process: the parent prepares inputs and judges results.

Used by `python -m autograder check` (one notebook) and by the grader (all of a student's notebooks at once).
The child (child.py) gets only the exercise cells, plus the lab's preamble and the reference stand-ins, and
runs inside the sandbox (sandbox.py: limits, scratch directory, no network where the OS allows, clean-up).
It reports plain data through a results file that the parent decodes safely; a case without a report is a
timeout or a crash, never a pass.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
import sys
import tempfile
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from . import sandbox
from .notebook import ExerciseSource, exercise_sources, read_notebook
from .runner import CaseResult, ExerciseResult, LearnerOutcome, judge, missing_result, prepare
from .spec import Lab

STARTUP_S = 60.0  # importing torch and reference in a cold child
CELL_S = 10.0  # at least this long for an exercise cell to run (imports, definitions)
MAX_RESULT_LINE = 64 * 1024 * 1024  # characters of one result line the parent will read
MAX_MESSAGE = 1000
REPO_ROOT = str(Path(__file__).resolve().parent.parent)


@dataclass
class ChildRun:
    """The judged results of one child run, and how the run went as a whole."""

    results: list[ExerciseResult]
    status: str  # ok | timeout | crash
    mode: str = ""  # the sandbox's isolation mode
    output_bytes: int = 0  # what the learner's code printed, in bytes
    hidden_attempts: dict[str, str] = field(default_factory=dict)  # exercise -> hidden names it tried to use


def exercises_for(lab: Lab, notebook_path: str | Path) -> list[str]:
    """The exercises to look for in a notebook: those of the lab notebook of the same name, else all of them."""
    name = Path(notebook_path).name
    return [exercise.name for exercise in lab.exercises_in(name)] or lab.exercise_names


def run_notebook(
    lab: Lab,
    notebook_path: str | Path,
    exercises: list[str] | None = None,
    *,
    include_hidden: bool = False,
    timeout_s: float | None = None,
) -> list[ExerciseResult]:
    """Check the exercise cells of one notebook file; one ExerciseResult per exercise, in lab order.

    Raises notebook.NotebookError when the file is not a readable notebook.
    """
    notebook = read_notebook(notebook_path)
    sources = exercise_sources(notebook, lab, exercises or exercises_for(lab, notebook_path))
    limits = sandbox.Limits(wall_s=timeout_s or default_wall_s(lab, sources, include_hidden),
                            memory_mb=lab.memory_mb)
    return run_sources(lab, sources, include_hidden=include_hidden, limits=limits).results


def default_wall_s(lab: Lab, sources: list[ExerciseSource], include_hidden: bool) -> float:
    """Start-up plus every exercise's own limits: what a run may take before it is stopped as a whole."""
    from .child import SLACK_S

    total = STARTUP_S
    for found in sources:
        cases = lab.exercise(found.exercise).selected_cases(include_hidden)
        total += max([CELL_S] + [case.timeout_s for case in cases]) + sum(case.timeout_s for case in cases)
        total += SLACK_S
    return total


def run_sources(
    lab: Lab,
    sources: list[ExerciseSource],
    *,
    include_hidden: bool = False,
    limits: sandbox.Limits | None = None,
    hide: tuple[str, ...] = (),
    slot: int = 0,
    token: str = "",
) -> ChildRun:
    """Run the given exercise cells in one sandboxed child and judge every case.

    hide: dotted reference names the learner's code may not import; slot: which parallel sandbox (uid) to use;
    token: the grading run's marker, put in the child's environment for the final clean-up.
    """
    limits = limits or sandbox.Limits(wall_s=default_wall_s(lab, sources, include_hidden), memory_mb=lab.memory_mb)
    results: dict[str, ExerciseResult] = {}
    job: dict = {"lab": lab.name, "hidden": list(hide), "exercises": []}
    prepared = {}
    for found in sources:
        exercise = lab.exercise(found.exercise)
        if found.source is None:
            results[exercise.name] = missing_result(
                exercise, include_hidden, f"no cell tagged {exercise.tag} or defining {exercise.symbol} was found"
            )
            continue
        cases = []
        for case in exercise.selected_cases(include_hidden):
            prepared[exercise.name, case.name] = prepare(exercise, case)
            cases.append({"name": case.name, "inputs": prepared[exercise.name, case.name].inputs_wire,
                          "timeout_s": case.timeout_s})
        cell_timeout_s = max([CELL_S] + [case["timeout_s"] for case in cases])
        job["exercises"].append({"name": exercise.name, "source": found.source, "cases": cases,
                                 "cell_timeout_s": cell_timeout_s})
    run = ChildRun([], "ok")
    if job["exercises"]:
        outcomes, notes, run, trouble = _run_child(job, limits, slot, token or uuid.uuid4().hex, include_hidden)
        for item in job["exercises"]:
            exercise = lab.exercise(item["name"])
            result = ExerciseResult(exercise.name)
            if exercise.uses:
                result.note = "checked with the reference " + ", ".join(lab.stand_ins(exercise))
            tried = ", ".join(name for name in notes.get((exercise.name, "hidden reference"), "").split(", ")
                              if name in hide)  # only names we hid: the note's text comes from the child
            if tried:
                run.hidden_attempts[exercise.name] = tried
                result.note = (result.note + "; " if result.note else "") + f"tried to use the hidden reference {tried}"
            for case in exercise.selected_cases(include_hidden):
                outcome = outcomes.get((exercise.name, case.name))
                if outcome is None:
                    why = _process_note(notes.get((exercise.name, "process"), "")) if run.status == "ok" else trouble
                    result.cases.append(CaseResult(exercise.name, case.name, 0.0, case.points, why.split(":")[0],
                                                   why, case.visible))
                else:
                    result.cases.append(judge(exercise, prepared[exercise.name, case.name], outcome))
            results[exercise.name] = result
        statuses = {case.status for result in results.values() for case in result.cases}
        if run.status == "ok" and "crashed" in statuses:
            run.status = "crash"
        elif run.status == "ok" and "timeout" in statuses:
            run.status = "timeout"
    run.results = [results[found.exercise] for found in sources]
    return run


PROCESS_NOTES = (  # what child.wait_for may say; anything else from the child is not repeated
    r"timeout: the exercise was stopped after [0-9.]+ s",
    r"crashed: the exercise's process was killed by signal [0-9]+",
    r"crashed: the exercise's process ended \(exit status [0-9]+\) before reporting",
)


def _process_note(note: str) -> str:
    if not any(re.fullmatch(pattern, note) for pattern in PROCESS_NOTES):
        return "crashed: no result came back for this test"
    if note.endswith(("signal 6", "signal 9", "signal 11")):
        note += " (perhaps out of memory: the grader limits how much memory your code may use)"
    return note


def _run_child(job: dict, limits: sandbox.Limits, slot: int, token: str, include_hidden: bool):
    """Run autograder.child on `job` in a fresh scratch directory; returns (outcomes, notes, run, trouble),
    where trouble explains the cases without an outcome when the run as a whole failed."""
    scratch = tempfile.mkdtemp(prefix="autograder-")
    try:
        job_path, result_path = os.path.join(scratch, "job.json"), os.path.join(scratch, "results.jsonl")
        with open(job_path, "w", encoding="utf-8") as f:
            json.dump(job, f)
        open(result_path, "w").close()
        os.chmod(job_path, 0o644)
        sandbox.prepare_scratch(scratch, [result_path], slot)
        python_path = [REPO_ROOT] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
        env = sandbox.sandbox_env(scratch, token, python_path)
        command = [sys.executable, "-m", "autograder.child", job_path, result_path]
        ended = sandbox.run_sandboxed(command, scratch, env, limits, slot)
        expected = {(item["name"], case["name"]) for item in job["exercises"] for case in item["cases"]}
        outcomes, notes = _read_outcomes(result_path, expected)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    run = ChildRun([], "ok", ended.mode, ended.output_bytes)
    trouble = ""
    if ended.timed_out:
        run.status, trouble = "timeout", f"timeout: the whole run took longer than {limits.wall_s:g} s"
    elif ended.exit_status != 0:
        run.status = "crash"
        trouble = f"crashed: the checking process ended early (exit status {ended.exit_status})"
        last_line = (ended.output_tail.strip().splitlines() or [""])[-1]
        if ended.exit_status == sandbox.SETUP_FAILED or (last_line and not include_hidden):
            trouble += f"; last output: {last_line[:200]}"  # never in grading: it could print hidden inputs
    return outcomes, notes, run, trouble


def _read_outcomes(
    path: str, expected: set[tuple[str, str]]
) -> tuple[dict[tuple[str, str], LearnerOutcome], dict[tuple[str, str], str]]:
    """Parse the child's result lines into case outcomes and exercise notes ((exercise, kind) -> message).

    Only lines about the job's own cases and exercises are kept, so a flood of made-up lines costs nothing;
    anything malformed is skipped (that case then counts as missing); for each key only the first line counts.
    The file must still be a plain file: the child could have swapped it for a link or a pipe."""
    outcomes: dict[tuple[str, str], LearnerOutcome] = {}
    notes: dict[tuple[str, str], str] = {}
    exercises = {exercise for exercise, _ in expected}
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return outcomes, notes
    with open(fd, encoding="utf-8", errors="replace") as f:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return outcomes, notes
        for line in f:
            if len(line) > MAX_RESULT_LINE:
                continue
            try:
                row = json.loads(line)
            except ValueError:
                continue
            if not isinstance(row, dict) or not all(isinstance(row.get(k), str) for k in ("exercise", "case", "status")):
                continue
            message = str(row.get("message") or "")[:MAX_MESSAGE]
            if row["case"] == "" and row["exercise"] in exercises:
                notes.setdefault((row["exercise"], row["status"]), message)
            elif (row["exercise"], row["case"]) in expected:
                outcomes.setdefault((row["exercise"], row["case"]),
                                    LearnerOutcome(row["status"], str(row.get("result") or ""), message))
    return outcomes, notes
