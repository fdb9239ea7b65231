"""Running an exercise's cases: the parent side (inputs, expected values, judging) and the learner side.

The parent side never touches learner objects: it prepares wire-format inputs and decoded expected values, and
judges wire-format results. The learner side (`call_learner`) decodes the inputs afresh, runs the exercise's
driver on the learner's object and encodes what comes back; it runs in this process for the notebook
self-check (`run_in_process`) and in a child process for the command line (see child.py).
"""

from __future__ import annotations

import builtins
import functools
import signal
import threading
import traceback
import types
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from . import codec
from .spec import Case, Exercise, Lab

MAX_MESSAGE = 300  # characters of a learner error message shown in feedback
_PACKAGE_DIR = str(Path(__file__).resolve().parent)


# -- results --------------------------------------------------------------------------------------------------


@dataclass
class CaseResult:
    exercise: str
    case: str
    points: float  # earned
    max_points: float
    status: str  # pass | fail | not implemented | error | invalid result | timeout | missing | crashed
    feedback: str = ""
    visible: bool = True

    @property
    def passed(self) -> bool:
        return self.status == "pass"


@dataclass
class ExerciseResult:
    exercise: str
    cases: list[CaseResult] = field(default_factory=list)
    note: str = ""  # e.g. which reference stand-ins were used

    @property
    def score(self) -> float:
        return sum(case.points for case in self.cases)

    @property
    def max_score(self) -> float:
        return sum(case.max_points for case in self.cases)

    @property
    def full_marks(self) -> bool:
        return all(case.passed for case in self.cases)


@dataclass(frozen=True)
class LearnerOutcome:
    """What the learner side reports for one case: status "ok" with a wire-format result, or a failure."""

    status: str  # ok | not implemented | error | invalid result | timeout
    result_wire: str = ""
    message: str = ""


# -- parent side ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PreparedCase:
    case: Case
    inputs_wire: str
    expected: Any  # decoded plain value


@functools.lru_cache(maxsize=None)
def prepare(exercise: Exercise, case: Case) -> PreparedCase:
    """Draw the case's inputs and compute its expected value with the reference (parent side, cached)."""
    inputs_wire = codec.dumps(case.inputs())
    fresh = codec.loads(inputs_wire)
    expected = case.expected(fresh) if case.expected is not None else exercise.driver(exercise.reference, fresh)
    return PreparedCase(case, inputs_wire, codec.roundtrip(expected))


def judge(exercise: Exercise, prepared: PreparedCase, outcome: LearnerOutcome) -> CaseResult:
    """Turn the learner side's report into a scored CaseResult. Only decoded plain data is compared."""
    case = prepared.case

    def result(status: str, feedback: str, points: float = 0.0) -> CaseResult:
        return CaseResult(exercise.name, case.name, points, case.points, status, feedback, case.visible)

    if outcome.status == "not implemented":
        return result("not implemented", f"{exercise.symbol} is not implemented yet (it raised NotImplementedError)")
    if outcome.status in ("error", "invalid result", "timeout"):
        message = outcome.message if case.visible else _without_values(outcome.status, outcome.message, case)
        if "MemoryError" in message or "can't allocate memory" in message:
            message += " (out of memory: the grader limits how much memory your code may use)"
        return result(outcome.status, f"{case.feedback} -- yours: {message}")
    if outcome.status != "ok":  # the child wrote something it should not have: say so, without echoing it
        return result("invalid result", f"{case.feedback} -- the report of this test could not be read")
    try:
        got = codec.loads(outcome.result_wire)
    except codec.CodecError as exc:
        return result("invalid result", f"{case.feedback} -- the result could not be read: {exc}")
    verdict = case.compare.compare(got, prepared.expected)
    if verdict.passed:
        return result("pass", "", case.points)
    why = verdict.detail if case.visible else verdict.kind
    return result("fail", f"{case.feedback} -- {why}")


def _without_values(status: str, message: str, case: Case) -> str:
    """What a hidden case may say about an error: the name of a built-in exception or the grader's own words
    for a time limit, never the child's message (which could print the hidden inputs)."""
    if status == "invalid result":
        return "a result that is not plain data (see the visible tests' feedback)"
    if status == "timeout":
        return f"took longer than {case.timeout_s:g} s"
    name = message.split(":")[0].split(" ")[0]
    return name if isinstance(getattr(builtins, name, None), type) else "an exception"


# -- learner side ---------------------------------------------------------------------------------------------


class CaseTimeout(BaseException):
    """Raised by the alarm when a case runs past its limit (a BaseException, so `except Exception` can't eat it)."""


def call_learner(
    driver: Callable[[Any, dict[str, Any]], Any], obj: Any, inputs_wire: str, timeout_s: float | None = None,
    interruptible: bool = True,
) -> LearnerOutcome:
    """Run an exercise's driver on the learner's object for one case's inputs; never raises for learner errors.

    interruptible: let KeyboardInterrupt through (Ctrl-C in a notebook); a grading child counts it as an error.
    """
    inputs = codec.loads(inputs_wire)  # a fresh copy: the learner may mutate it freely
    try:
        with time_limit(timeout_s):
            result = driver(obj, inputs)
    except NotImplementedError as exc:
        return LearnerOutcome("not implemented", message=_clip(str(exc)))
    except CaseTimeout:
        return LearnerOutcome("timeout", message=f"took longer than {timeout_s:g} s")
    except KeyboardInterrupt as exc:
        if interruptible:
            raise
        return LearnerOutcome("error", message=describe_exception(exc))
    except BaseException as exc:  # SystemExit and friends are learner errors too
        return LearnerOutcome("error", message=describe_exception(exc))
    try:
        return LearnerOutcome("ok", result_wire=codec.dumps(result))
    except codec.CodecError as exc:
        return LearnerOutcome("invalid result", message=_clip(str(exc)))


def describe_exception(exc: BaseException) -> str:
    """`TypeError: message (line 12: x = foo(y))`, pointing at the last line of learner code in the traceback."""
    text = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    where = ""
    for frame in traceback.extract_tb(exc.__traceback__):
        filename = frame.filename or ""
        if filename.startswith(_PACKAGE_DIR) or "site-packages" in filename or "/torch/" in filename:
            continue
        where = f" (line {frame.lineno}: {(frame.line or '').strip()[:80]})"
    return _clip(text) + where


def _clip(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= MAX_MESSAGE else text[: MAX_MESSAGE - 3] + "..."


@contextmanager
def time_limit(seconds: float | None) -> Iterator[None]:
    """Interrupt the block after `seconds` with CaseTimeout (Unix main thread only; elsewhere no limit)."""
    usable = (
        seconds is not None and hasattr(signal, "SIGALRM") and threading.current_thread() is threading.main_thread()
    )
    if not usable:
        yield
        return

    def on_alarm(signum, frame):
        raise CaseTimeout()

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


# -- in-process runs (the notebook self-check) ----------------------------------------------------------------


def run_in_process(lab: Lab, exercise: Exercise, obj: Any, include_hidden: bool = False) -> ExerciseResult:
    """Run an exercise's cases on a learner object living in this process (the notebook's)."""
    result = ExerciseResult(exercise.name)
    if exercise.uses:
        result.note = "checked with the reference " + ", ".join(lab.stand_ins(exercise))
    with stand_ins_bound(obj, lab.stand_ins(exercise)):
        for case in exercise.selected_cases(include_hidden):
            prepared = prepare(exercise, case)
            outcome = call_learner(exercise.driver, obj, prepared.inputs_wire, case.timeout_s)
            result.cases.append(judge(exercise, prepared, outcome))
    return result


def missing_result(exercise: Exercise, include_hidden: bool, why: str) -> ExerciseResult:
    """Zero points on every case, with one explanation (no cell, the cell failed to run, ...)."""
    cases = [
        CaseResult(exercise.name, case.name, 0.0, case.points, "missing", why, case.visible)
        for case in exercise.selected_cases(include_hidden)
    ]
    return ExerciseResult(exercise.name, cases)


@contextmanager
def stand_ins_bound(obj: Any, stand_ins: dict[str, Any]) -> Iterator[None]:
    """Temporarily bind `stand_ins` (symbol -> reference) in the global namespace the learner's code reads.

    In a notebook that namespace is the notebook's: the learner's other functions are swapped for the
    references during the check and put back afterwards, whatever happens.
    """
    namespace = _globals_of(obj)
    if not stand_ins or namespace is None:
        yield
        return
    missing = object()
    saved = {name: namespace.get(name, missing) for name in stand_ins}
    namespace.update(stand_ins)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is missing:
                namespace.pop(name, None)
            else:
                namespace[name] = value


def _globals_of(obj: Any) -> dict | None:
    if isinstance(obj, types.FunctionType):
        return obj.__globals__
    if isinstance(obj, type):
        for value in vars(obj).values():
            function = getattr(value, "__func__", value)  # staticmethod / classmethod
            function = getattr(function, "fget", function)  # property
            if isinstance(function, types.FunctionType):
                return function.__globals__
    return None
