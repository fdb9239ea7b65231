"""Checking exercise cells in child processes: the parent plans the children, sends inputs and judges results.

Used by `python -m autograder check` (a learner's notebook, mode "process") and by the grader (all of a
student's notebooks, mode "bwrap" or "container"; see sandbox.py). A child (child.py) gets only exercise
cells, the lab's preamble, and the dotted names of its drivers and stand-ins; it reports plain data on a pipe
that the parent decodes safely. A case without a report is a timeout, a crash or a limit, never a pass.

How a submission is split into children when grading (`plan_children`):
- hidden cases run in children of their own, whose jobs hold only hidden inputs and whose messages and output
  are never shown; visible children hold only visible inputs;
- exercises of one notebook that use the same stand-ins share a child, whose redacted view (redact.py) lacks
  the reference implementations of exactly those exercises and keeps their stand-ins (and everything the
  drivers need: a later notebook's engine-driving exercise may run on an earlier notebook's references);
- when a child ends abnormally (memory, processes, time, a crash), the exercise it was running takes the
  blame and the exercises after it run again in a fresh child, so one bad exercise costs only its own points;
- everything shares the submission's time budget.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from . import codec, redact, sandbox
from .notebook import ExerciseSource, NotebookError, extract_exercise_sources
from .runner import CaseResult, ExerciseResult, LearnerOutcome, judge, missing_result, prepare
from .spec import Exercise, Lab

STARTUP_S = 60.0  # importing torch and reference in a cold child on a busy machine
CELL_S = 10.0  # at least this long for an exercise cell to run (imports, definitions)
MAX_RESULT_LINE = 64 * 1024 * 1024  # characters of one result line the parent will read
MAX_MESSAGE = 1000
REPO_ROOT = str(Path(__file__).resolve().parent.parent)
LAB_MODULES_PREFIX = "autograder.labs"


@dataclass
class ChildRun:
    """The judged results of a submission's children, and how they went as a whole."""

    results: list[ExerciseResult]
    status: str  # ok | timeout | crash
    mode: str = ""  # the sandbox's mode
    output_bytes: int = 0  # what the learner's code printed, in bytes
    peak_mb: float = 0.0  # the largest resident memory of one child
    memory_by: str = "polling"  # "cgroup" when the kernel enforced the memory limit of every child
    hidden_attempts: dict[str, str] = field(default_factory=dict)  # exercise -> hidden names it tried to use


@dataclass(frozen=True)
class ChildPlan:
    """One child: these exercises' cases of one visibility, with these reference implementations absent."""

    exercises: tuple[str, ...]
    visible: bool
    absent: tuple[str, ...] = ()


class ViewCache:
    """The redacted views of one grading run, built once per set of absent names and shared by students."""

    def __init__(self, staging: str | Path, masked: tuple[str, ...] = (), redact: bool = True,
                 private: bool = False) -> None:
        self.staging, self.masked, self.redact, self.private = Path(staging), masked, redact, private
        self._views: dict[tuple[str, ...], sandbox.View] = {}
        self._lock = threading.Lock()

    @contextlib.contextmanager
    def private_copy(self, view: sandbox.View, uid: int):
        """Container mode: a copy of `view` that only `uid` can read, for one child. The shared views hold the
        stand-ins other children need, which would be another child's absent reference; without mount
        namespaces, file permissions must keep them apart."""
        folder = Path(tempfile.mkdtemp(prefix="run-", dir=self.staging))
        try:
            shutil.copytree(view.root, folder / "view", symlinks=False)
            for path in [folder, *folder.rglob("*")]:
                os.chown(path, uid, uid, follow_symlinks=False)
            os.chmod(folder, 0o700)
            yield sandbox.View(folder / "view", view.masked)
        finally:
            shutil.rmtree(folder, ignore_errors=True)

    def get(self, absent: tuple[str, ...]) -> sandbox.View:
        absent = absent if self.redact else ()
        with self._lock:
            if absent not in self._views:
                root = redact.build_view(self.staging / f"view{len(self._views)}", absent)
                sandbox.write_identity(root)
                if self.private:  # container mode: readable through private_copy only
                    os.chmod(root, 0o700)
                self._views[absent] = sandbox.View(root, self.masked)
            return self._views[absent]


def dotted(obj) -> str:
    """"module:qualname" of a driver or stand-in, for the child to import; never from autograder.labs."""
    module, qualname = getattr(obj, "__module__", ""), getattr(obj, "__qualname__", "")
    if not module or not qualname or "<" in qualname or module.startswith(LAB_MODULES_PREFIX):
        raise ValueError(f"{obj!r} must be a top-level function or class outside {LAB_MODULES_PREFIX} "
                         "(put drivers and references in autograder/harness)")
    return f"{module}:{qualname}"


def absent_names(exercise: Exercise) -> tuple[str, ...]:
    """What must be absent while `exercise` is graded: its `hides` and its own reference implementation."""
    module, _, qualname = dotted(exercise.reference).partition(":")
    return tuple(dict.fromkeys([*exercise.hides, f"{module}.{qualname}"]))


def exercises_for(lab: Lab, notebook_path: str | Path) -> list[str]:
    """The exercises to look for in a notebook: those of the lab notebook of the same name, else all of them."""
    name = Path(notebook_path).name
    return [exercise.name for exercise in lab.exercises_in(name)] or lab.exercise_names


def run_notebook(lab: Lab, notebook_path: str | Path, exercises: list[str] | None = None, *,
                 timeout_s: float | None = None) -> list[ExerciseResult]:
    """A learner's self-check of one notebook file (visible cases, mode "process", reference hidden as a
    deterrent); one ExerciseResult per exercise, in lab order. Raises notebook.NotebookError when the file is
    not a readable notebook."""
    names = exercises or exercises_for(lab, notebook_path)
    sources, problem = extract_exercise_sources(notebook_path, lab, names)
    if problem:
        raise NotebookError(notebook_path, problem.split(": ", 1)[-1])
    hide = tuple(name for exercise in lab.exercises for name in exercise.hides)
    return run_sources(lab, sources, mode="process", budget_s=timeout_s, hide=hide).results


def child_wall_s(lab: Lab, exercises: list[str], visible: bool) -> float:
    """Start-up plus every exercise's own limits: what a child may take before it is stopped as a whole."""
    from .child import SLACK_S

    total = STARTUP_S
    for name in exercises:
        cases = [case for case in lab.exercise(name).cases if case.visible == visible]
        total += max([CELL_S] + [case.timeout_s for case in cases]) + sum(case.timeout_s for case in cases)
        total += SLACK_S
    return total


def plan_children(lab: Lab, names: list[str], include_hidden: bool, isolated: bool) -> list[ChildPlan]:
    """The children that grade `names` (see the module docstring); isolated=False: one child, nothing absent."""
    plans = []
    for visible in (True, False) if include_hidden else (True,):
        with_cases = [n for n in names if any(c.visible == visible for c in lab.exercise(n).cases)]
        if not isolated:
            plans += [ChildPlan(tuple(with_cases), visible)] if with_cases else []
            continue
        groups: dict[tuple, list[str]] = {}
        for name in with_cases:
            exercise = lab.exercise(name)
            groups.setdefault((exercise.notebook, tuple(sorted(exercise.uses))), []).append(name)
        for group in groups.values():
            absent = tuple(dict.fromkeys(n for name in group for n in absent_names(lab.exercise(name))))
            plans.append(ChildPlan(tuple(group), visible, absent))
    return plans


def run_sources(lab: Lab, sources: list[ExerciseSource], *, mode: str, include_hidden: bool = False,
                memory_mb: int | None = None, budget_s: float | None = None, views: ViewCache | None = None,
                hide: tuple[str, ...] = ()) -> ChildRun:
    """Run the given exercise cells in children (see the module docstring) and judge every case.

    mode: a sandbox mode; views: required for "bwrap" and "container"; budget_s: the wall time all children
    of this submission share (None: each child's own limits); hide: dotted reference names the learner's code
    may not import (the self-check's deterrent).
    """
    run = ChildRun([], "ok", mode)
    found = {source.exercise: source.source for source in sources if source.source is not None}
    plans = plan_children(lab, [s.exercise for s in sources if s.source is not None], include_hidden,
                          isolated=mode != "process")
    outcomes = _run_plans(lab, plans, found, memory_mb or lab.memory_mb, budget_s, mode, views, hide, run)
    run.results = [_exercise_result(lab, source, outcomes, run.hidden_attempts, include_hidden) for source in sources]
    run.status = _rolled_up_status(run.results)
    return run


def _run_plans(lab: Lab, queue: list[ChildPlan], sources: dict[str, str], memory_mb: int,
               budget_s: float | None, mode: str, views: ViewCache | None, hide: tuple[str, ...],
               run: ChildRun) -> dict[tuple[str, str], CaseResult]:
    """Run the planned children one after another within the budget: each case's judged result by
    (exercise, case). A child that ends abnormally leaves a plan for the exercises after the culprit."""
    deadline = None if budget_s is None else time.monotonic() + budget_s
    outcomes: dict[tuple[str, str], CaseResult] = {}
    while queue:
        plan = queue.pop(0)
        left = None if deadline is None else deadline - time.monotonic()
        if left is not None and left <= 1.0:
            for name in plan.exercises:
                _fill(lab, outcomes, name, plan.visible, "timeout",
                      f"timeout: the submission's time budget ({budget_s:g} s) ran out before this test ran")
            continue
        wall = child_wall_s(lab, list(plan.exercises), plan.visible)
        limits = sandbox.Limits(wall_s=wall if left is None else min(wall, left), memory_mb=memory_mb)
        rerun = _run_child(lab, plan, sources, limits, mode, views, hide, outcomes, run)
        if rerun:
            queue.insert(0, rerun)
    return outcomes


def _exercise_result(lab: Lab, source: ExerciseSource, outcomes: dict[tuple[str, str], CaseResult],
                     hidden_attempts: dict[str, str], include_hidden: bool) -> ExerciseResult:
    """One exercise's judged cases, in case order, with the notes the learner should read."""
    exercise = lab.exercise(source.exercise)
    if source.source is None:
        return missing_result(exercise, include_hidden,
                              f"no cell tagged {exercise.tag} or defining {exercise.symbol} was found")
    result = ExerciseResult(exercise.name)
    if exercise.uses:
        result.note = "checked with the reference " + ", ".join(lab.stand_ins(exercise))
    for case in exercise.selected_cases(include_hidden):
        outcome = outcomes.get((exercise.name, case.name))
        if outcome is None:  # cannot happen: every planned case gets an outcome or a reason
            outcome = CaseResult(exercise.name, case.name, 0.0, case.points, "crashed",
                                 "crashed: no result came back for this test", case.visible)
        result.cases.append(outcome)
    tried = hidden_attempts.get(exercise.name)
    if tried:
        result.note = (result.note + "; " if result.note else "") + f"tried to use the hidden reference {tried}"
    return result


def _rolled_up_status(results: list[ExerciseResult]) -> str:
    """The submission's run as a whole: "crash" when any case crashed or hit a limit, else "timeout" when any
    timed out, else "ok"."""
    statuses = {case.status for result in results for case in result.cases}
    if statuses & {"crashed", "memory limit", "process limit"}:
        return "crash"
    return "timeout" if "timeout" in statuses else "ok"


def _fill(lab: Lab, outcomes: dict, name: str, visible: bool, status: str, why: str) -> None:
    """Give every case of `name` of this visibility that has no outcome yet the outcome `status`."""
    for case in lab.exercise(name).cases:
        if case.visible == visible and (name, case.name) not in outcomes:
            outcomes[name, case.name] = CaseResult(name, case.name, 0.0, case.points, status, why, case.visible)


def _run_child(lab: Lab, plan: ChildPlan, sources: dict[str, str], limits: sandbox.Limits, mode: str,
               views: ViewCache | None, hide: tuple[str, ...], outcomes: dict, run: ChildRun) -> ChildPlan | None:
    """Run one planned child and judge what it reported into `outcomes`; returns the plan of the exercises
    that must run again after an abnormal end, if any."""
    job, prepared = build_job(lab, plan, sources, hide)
    view = views.get(plan.absent) if mode in ("bwrap", "container") else None
    if mode == "container":
        with sandbox.lease_uid() as uid, views.private_copy(view, uid) as own_view:
            ended = _launch(job, limits, mode, own_view, uid, [str(own_view.root)])
    else:
        lease = mode == "bwrap" and sandbox.can_drop_to_sandbox_uid()
        with (sandbox.lease_uid() if lease else _no_uid()) as uid:
            python_path = ["/grading"] if mode == "bwrap" else (
                [REPO_ROOT] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])
            ended = _launch(job, limits, mode, view, uid, python_path)
    if plan.visible:  # a hidden child's output size would be a channel out of it
        run.output_bytes += ended.output_bytes
    run.peak_mb = max(run.peak_mb, ended.peak_mb)
    run.memory_by = ended.memory_by
    expected = {(item["name"], case["name"]) for item in job["exercises"] for case in item["cases"]}
    reported, notes = read_outcomes(ended.results, expected)
    for (name, case_name), outcome in reported.items():
        exercise = lab.exercise(name)
        outcomes[name, case_name] = judge(exercise, prepared[name, case_name], outcome)
    for name in plan.exercises:
        tried = ", ".join(n for n in notes.get((name, "hidden reference"), "").split(", ") if n in hide)
        if tried:  # only names we hid: the note's text comes from the child
            run.hidden_attempts[name] = tried
    finished = [name for name in plan.exercises if (name, "process") in notes]
    unfinished = [name for name in plan.exercises if name not in finished]
    for name in finished:
        _fill(lab, outcomes, name, plan.visible, *_process_note(notes[name, "process"], plan.visible))
    if ended.ok or not unfinished:
        for name in unfinished:
            _fill(lab, outcomes, name, plan.visible, "crashed", "crashed: no result came back for this test")
        return None
    status, why = _verdict(ended, limits, plan.visible)
    _fill(lab, outcomes, unfinished[0], plan.visible, status, why)  # it was running when the child ended
    if len(unfinished) > 1 and ended.status != "setup":
        return ChildPlan(tuple(unfinished[1:]), plan.visible, plan.absent)
    for name in unfinished[1:]:
        _fill(lab, outcomes, name, plan.visible, status, why)
    return None


def _launch(job: dict, limits: sandbox.Limits, mode: str, view: sandbox.View | None, uid: int | None,
            python_path: list[str]) -> sandbox.SandboxRun:
    env = sandbox.sandbox_env(python_path)
    if mode == "process":
        env.pop("CUDA_VISIBLE_DEVICES")  # a learner's own check may use their GPU
    return sandbox.run_sandboxed([sys.executable, "-m", "autograder.child"], env, limits, mode,
                                 stdin=json.dumps(job).encode(), view=view, uid=uid)


def build_job(lab: Lab, plan: ChildPlan, sources: dict[str, str], hide: tuple[str, ...]):
    """The child's job (only this plan's inputs) and the prepared cases to judge its outcomes against."""
    job: dict = {"preamble": lab.preamble, "hidden": list(hide), "exercises": []}
    prepared = {}
    for name in plan.exercises:
        exercise = lab.exercise(name)
        cases = []
        for case in exercise.cases:
            if case.visible != plan.visible:
                continue
            prepared[name, case.name] = prepare(exercise, case)
            cases.append({"name": case.name, "inputs": prepared[name, case.name].inputs_wire,
                          "timeout_s": case.timeout_s})
        job["exercises"].append({
            "name": name, "symbol": exercise.symbol, "source": sources[name], "driver": dotted(exercise.driver),
            "stand_ins": {symbol: dotted(ref) for symbol, ref in lab.stand_ins(exercise).items()},
            "cell_timeout_s": max([CELL_S] + [case["timeout_s"] for case in cases]), "cases": cases})
    return job, prepared


def _verdict(ended: sandbox.SandboxRun, limits: sandbox.Limits, visible: bool) -> tuple[str, str]:
    """(case status, feedback) for the cases a child left without results when it ended abnormally."""
    if ended.status == "memory":
        return "memory limit", (f"memory limit: the code used more than {limits.memory_mb} MB of memory "
                                "(all its processes together), so it was stopped")
    if ended.status == "processes":
        return "process limit", f"process limit: the code started more than {limits.processes} processes"
    if ended.status == "timeout":
        return "timeout", f"timeout: the checking process took longer than {limits.wall_s:g} s"
    why = (f"crashed: the checking process was killed by signal {ended.code}" if ended.status == "signaled"
           else f"crashed: the checking process ended early (exit status {ended.code})")
    if not visible:  # a hidden child chooses its exit status: no numbers out of it
        why = "crashed: the checking process ended early"
    if ended.status == "setup":
        why = "crashed: the sandbox could not start (please tell the staff)"
    last_line = (ended.output_tail.strip().splitlines() or [""])[-1]
    if last_line and (visible or ended.status == "setup"):  # never from a hidden child: it could print inputs
        why += f"; last output: {last_line[:200]}"
    return "crashed", why


PROCESS_NOTES = (  # what child.wait_for may say; anything else from the child is not repeated
    r"timeout: the exercise was stopped after [0-9.]+ s",
    r"crashed: the exercise's process was killed by signal [0-9]+",
    r"crashed: the exercise's process ended \(exit status [0-9]+\) before reporting",
)


def _process_note(note: str, visible: bool) -> tuple[str, str]:
    import re

    if not any(re.fullmatch(pattern, note) for pattern in PROCESS_NOTES):
        return "crashed", "crashed: no result came back for this test"
    if not visible:  # the note comes from the child: only its kind, no numbers
        return ("timeout", "timeout: the exercise was stopped") if note.startswith("timeout") else (
            "crashed", "crashed: the exercise's process ended before reporting")
    if note.endswith(("signal 6", "signal 9", "signal 11")):
        note += " (perhaps out of memory: the grader limits how much memory your code may use)"
    return note.split(":")[0], note


def read_outcomes(data: bytes, expected: set[tuple[str, str]]
                  ) -> tuple[dict[tuple[str, str], LearnerOutcome], dict[tuple[str, str], str]]:
    """Parse the child's result lines into case outcomes and exercise notes ((exercise, kind) -> message).

    Only lines about the job's own cases and exercises are kept, so a flood of made-up lines costs nothing;
    anything malformed is skipped (that case then counts as missing); for each key only the first line counts."""
    outcomes: dict[tuple[str, str], LearnerOutcome] = {}
    notes: dict[tuple[str, str], str] = {}
    exercises = {exercise for exercise, _ in expected}
    for line in data.decode("utf-8", errors="replace").splitlines():
        row = codec.parse_result_line(line, MAX_RESULT_LINE)
        if row is None:
            continue
        message = row["message"][:MAX_MESSAGE]
        if row["case"] == "" and row["exercise"] in exercises:
            notes.setdefault((row["exercise"], row["status"]), message)
        elif (row["exercise"], row["case"]) in expected:
            outcomes.setdefault((row["exercise"], row["case"]),
                                LearnerOutcome(row["status"], row["result"], message))
    return outcomes, notes


class _no_uid:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False
