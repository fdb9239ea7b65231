"""The notebook side of the autograder: `check` (run an exercise's visible tests) and `pick` (learner or reference).

    from autograder import check, pick
    check("lab0.1", "rms_norm", rms_norm)         # prints a table, returns the score; never raises for your bugs
    rms_norm = pick("lab0.1", "rms_norm", rms_norm)  # yours if it passes its visible tests, else the reference

Both run the same cases, comparisons and codec round trip as `python -m autograder check` and the grader, in
this process (so the notebook's own functions are called directly).
"""

from __future__ import annotations

import sys
from typing import Any

from .report import format_results
from .runner import ExerciseResult, missing_result, run_in_process
from .spec import Exercise, Lab


def load_lab(lab: str | Lab) -> Lab:
    """autograder.labs.load_lab, imported on first use: `import autograder` must work in the grading child,
    whose copy of the project has no autograder/labs."""
    from .labs import load_lab as load

    return load(lab)


def _resolve(exercise: Exercise, candidate: Any, caller_globals: dict) -> Any:
    """The learner's object: given directly, looked up in a namespace dict, or in the caller's globals."""
    if candidate is None:
        candidate = caller_globals
    if isinstance(candidate, dict):
        return candidate.get(exercise.symbol)
    return candidate


def run_check(lab: str | Lab, exercise_name: str, candidate: Any = None, *, _depth: int = 1) -> ExerciseResult:
    """Run the visible cases of one exercise on the learner's object and return the ExerciseResult (no printing)."""
    lab = load_lab(lab)
    exercise = lab.exercise(exercise_name)
    obj = _resolve(exercise, candidate, sys._getframe(_depth).f_globals)
    if obj is None:
        return missing_result(exercise, False, f"no {exercise.symbol} defined yet: run its cell first")
    if not callable(obj):
        return missing_result(exercise, False, f"{exercise.symbol} is a {type(obj).__name__}, not a function or class")
    return run_in_process(lab, exercise, obj)


def check(lab: str | Lab, exercise_name: str, candidate: Any = None) -> float:
    """Run exercise `exercise_name`'s visible tests on `candidate` and print a table; return the points scored.

    candidate: the learner's function or class, or a namespace dict such as globals() to look its name up in;
    None looks it up in the calling notebook's globals. Errors in the learner's code are reported, not raised.
    """
    lab = load_lab(lab)
    result = run_check(lab, exercise_name, candidate, _depth=2)
    print(format_results([result], title=f"{lab.name} · {exercise_name} (visible tests)"))
    return result.score


def pick(lab: str | Lab, exercise_name: str, candidate: Any = None) -> Any:
    """Return the learner's object when it passes all its visible tests, else the reference; print which.

    Cells after an exercise call this, so a learner who is stuck can keep going with the reference version.
    """
    lab = load_lab(lab)
    exercise = lab.exercise(exercise_name)
    if candidate is exercise.reference:
        print(f"[{exercise_name}] using the reference implementation")
        return exercise.reference
    result = run_check(lab, exercise_name, candidate, _depth=2)
    if result.cases and result.full_marks:
        print(f"[{exercise_name}] using YOUR {exercise.symbol} (passes all {len(result.cases)} visible tests)")
        return _resolve(exercise, candidate, sys._getframe(1).f_globals)
    failing = [case for case in result.cases if not case.passed]
    if failing and all(case.status in ("not implemented", "missing") for case in failing):
        reason = "yours is not written yet" if failing[0].status == "not implemented" else failing[0].feedback
    else:
        reason = f"yours fails {len(failing)} of {len(result.cases)} visible tests; run its check cell for details"
    print(f"[{exercise_name}] using the REFERENCE {exercise.symbol} ({reason})")
    return exercise.reference
