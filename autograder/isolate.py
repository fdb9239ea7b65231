"""Checking a notebook file: exercise cells run in a child process, the parent prepares inputs and judges results.

Used by `python -m autograder check`. The child gets only the exercise cells (plus the lab's preamble and the
reference stand-ins), runs in a scratch directory with one torch thread, under a wall-clock limit for the
whole run and an alarm per case; it reports plain data through a results file that the parent decodes safely.
Memory and process limits, network cut-off and hiding reference symbols are left to the batch grader, which
can wrap `run_child` (the command line) without changing the format.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

from .notebook import exercise_sources, read_notebook
from .runner import CaseResult, ExerciseResult, LearnerOutcome, judge, missing_result, prepare
from .spec import Lab

STARTUP_S = 60.0  # importing torch and reference in a cold child
MAX_RESULT_LINE = 64 * 1024 * 1024  # characters of one result line the parent will read


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
    names = exercises or exercises_for(lab, notebook_path)
    sources = exercise_sources(notebook, lab, names)
    results: dict[str, ExerciseResult] = {}
    job = {"lab": lab.name, "exercises": []}
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
        job["exercises"].append({"name": exercise.name, "source": found.source, "cases": cases})

    if job["exercises"]:
        limit = timeout_s or STARTUP_S + sum(c["timeout_s"] for item in job["exercises"] for c in item["cases"])
        outcomes, trouble = run_child(job, limit)
        for item in job["exercises"]:
            exercise = lab.exercise(item["name"])
            result = ExerciseResult(exercise.name)
            if exercise.uses:
                result.note = "checked with the reference " + ", ".join(lab.stand_ins(exercise))
            for case in exercise.selected_cases(include_hidden):
                outcome = outcomes.get((exercise.name, case.name))
                if outcome is None:
                    result.cases.append(CaseResult(exercise.name, case.name, 0.0, case.points, trouble.split(":")[0],
                                                   trouble, case.visible))
                else:
                    result.cases.append(judge(exercise, prepared[exercise.name, case.name], outcome))
            results[exercise.name] = result
    return [results[name] for name in names]


def run_child(job: dict, limit_s: float) -> tuple[dict[tuple[str, str], LearnerOutcome], str]:
    """Run autograder.child on `job` in a scratch directory; return the outcomes it reported, and what went
    wrong for any case without one ("timeout: ..." or "crashed: ...")."""
    repo_root = str(Path(__file__).resolve().parent.parent)
    with tempfile.TemporaryDirectory(prefix="autograder-") as scratch:
        job_path, result_path, log_path = (os.path.join(scratch, n) for n in ("job.json", "results.jsonl", "log.txt"))
        with open(job_path, "w", encoding="utf-8") as f:
            json.dump(job, f)
        open(result_path, "w").close()
        python_path = [repo_root] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(python_path), OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
        with open(log_path, "wb") as log:
            process = subprocess.Popen(
                [sys.executable, "-m", "autograder.child", job_path, result_path],
                cwd=scratch, stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=env, start_new_session=True,
            )
            try:
                process.wait(timeout=limit_s)
                trouble = f"crashed: the checking process ended early (exit status {process.returncode})"
            except subprocess.TimeoutExpired:
                trouble = f"timeout: the whole check took longer than {limit_s:g} s"
            finally:
                _kill_group(process)
        outcomes = _read_outcomes(result_path)
        if trouble.startswith("crashed"):
            with open(log_path, "rb") as log:
                log.seek(max(0, os.path.getsize(log_path) - 600))
                tail = log.read().decode("utf-8", errors="replace").strip().splitlines()
            if tail:
                trouble += f"; last output: {tail[-1][:200]}"
    return outcomes, trouble


def _kill_group(process: subprocess.Popen) -> None:
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    process.wait()


def _read_outcomes(path: str) -> dict[tuple[str, str], LearnerOutcome]:
    """Parse the child's result lines; anything malformed is skipped (that case then counts as missing)."""
    outcomes: dict[tuple[str, str], LearnerOutcome] = {}
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            if len(line) > MAX_RESULT_LINE:
                continue
            try:
                row = json.loads(line)
            except ValueError:
                continue
            if not isinstance(row, dict) or not all(isinstance(row.get(k), str) for k in ("exercise", "case", "status")):
                continue
            key = (row["exercise"], row["case"])
            if key in outcomes:  # a second report for the same case: only the first counts
                continue
            outcomes[key] = LearnerOutcome(
                row["status"], str(row.get("result") or ""), str(row.get("message") or "")[:1000]
            )
    return outcomes
