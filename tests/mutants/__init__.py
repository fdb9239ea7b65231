"""Mutation testing of the lab exercises: catalogues of plausible wrong solutions, and how to grade them.

Each lab has a catalogue module here (lab0_1.py, ...) with `MUTANTS = {exercise name: [Mutant, ...]}`. A mutant
is the exercise's solution cell (from the solution notebooks in autograder/<lab>/) with a small change:
- `sub(name, (old, new), ...)`: text substitutions, each `old` found exactly once in the solution cell;
- `body(name, text, ...)`: the cell's `### BEGIN SOLUTION` .. `### END SOLUTION` regions replaced by `text`
  (one text per region; None keeps that region), e.g. `return None`: the trivial outputs.
A mutant with trivial=True (identity, constants, None, the input returned) must score 0 on its exercise; every
other mutant must lose at least one point of it, hidden cases included. Only the mutated exercise is judged:
exercises are graded on their own (spec.py), so a mutant cannot cost or earn another exercise's points.

`evaluate(lab)` runs every mutant in this process, with the grader's own cases, comparisons and codec round trip
(runner.run_in_process, hidden cases included), `evaluate_isolated(lab)` the same in a fresh interpreter; `submissions(...)` writes notebooks for the batch grader, in which
mutants of different exercises share a submission (exercises are judged independently; this keeps the number of
sandboxed children, each of which imports torch, small). tests/test_mutants.py and benchmarks/mutation_score.py
use both.
"""

from __future__ import annotations

import copy
import importlib
import json
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nbformat

from autograder.labs import load_lab
from autograder.notebook import cell_source, read_notebook
from autograder.runner import ExerciseResult, run_in_process

REPO = Path(__file__).resolve().parents[2]
LABS = ("lab0.1", "lab0.2", "lab0.3", "lab0.4")
BEGIN, END = "### BEGIN SOLUTION", "### END SOLUTION"


@dataclass(frozen=True)
class Mutant:
    exercise: str
    name: str
    substitutions: tuple[tuple[str, str], ...] = ()
    bodies: tuple[str | None, ...] = ()
    trivial: bool = False
    why: str = ""  # the mistake, in words

    @property
    def label(self) -> str:
        return f"{self.exercise}/{self.name}"


@dataclass(frozen=True)
class _Spec:
    name: str
    substitutions: tuple[tuple[str, str], ...] = ()
    bodies: tuple[str | None, ...] = ()
    trivial: bool = False
    why: str = ""


def sub(name: str, *pairs: tuple[str, str], why: str = "") -> _Spec:
    """A mutant made of text substitutions (each `old` must occur exactly once in the solution cell)."""
    return _Spec(name, substitutions=tuple(pairs), why=why)


def body(name: str, *texts: str | None, trivial: bool = False, why: str = "") -> _Spec:
    """A mutant whose solution regions are replaced by `texts` (dedented code; None keeps a region)."""
    return _Spec(name, bodies=tuple(texts), trivial=trivial, why=why)


def trivial(name: str, *texts: str | None, why: str = "") -> _Spec:
    return body(name, *texts, trivial=True, why=why)


def catalogue(specs: dict[str, list[_Spec]]) -> dict[str, list[Mutant]]:
    return {exercise: [Mutant(exercise, s.name, s.substitutions, s.bodies, s.trivial, s.why) for s in items]
            for exercise, items in specs.items()}


def load_catalogue(lab_name: str) -> dict[str, list[Mutant]]:
    module = importlib.import_module(f"mutants.{lab_name.replace('.', '_')}")
    return module.MUTANTS


# -- sources -----------------------------------------------------------------------------------------------------


def solution_cells(lab_name: str) -> dict[str, tuple[str, int, str]]:
    """exercise -> (notebook file name, cell index, cell source), from the solution notebooks."""
    lab = load_lab(lab_name)
    found: dict[str, tuple[str, int, str]] = {}
    for notebook in lab.notebooks:
        cells = read_notebook(REPO / "autograder" / lab_name / notebook).cells
        for index, cell in enumerate(cells):
            for tag in cell.get("metadata", {}).get("tags", []):
                if tag.startswith("exercise:"):
                    found[tag.split(":", 1)[1]] = (notebook, index, cell_source(cell))
    missing = set(lab.exercise_names) - set(found)
    assert not missing, f"{lab_name}: no solution cell for {sorted(missing)}"
    return found


def _replace_regions(source: str, texts: tuple[str | None, ...], label: str) -> str:
    lines = source.split("\n")
    out: list[str] = []
    region = -1
    inside = False
    for line in lines:
        marker = line.strip()
        if marker == BEGIN:
            region += 1
            inside = True
            indent = line[: len(line) - len(line.lstrip())]
            keep = region >= len(texts) or texts[region] is None
            out.append(line)
            if not keep:
                out += [indent + text_line if text_line else "" for text_line in texts[region].strip("\n").split("\n")]
            continue
        if marker == END:
            inside = False
            out.append(line)
            continue
        if inside and not (region >= len(texts) or texts[region] is None):
            continue
        out.append(line)
    assert region + 1 >= len(texts), f"{label}: {len(texts)} bodies for {region + 1} solution regions"
    return "\n".join(out)


def _occurrences(text: str, part: str) -> list[int]:
    found, start = [], text.find(part)
    while start != -1:
        found.append(start)
        start = text.find(part, start + 1)
    return found


def _region_spans(source: str) -> list[tuple[int, int]]:
    """(start, end) character offsets of the text between each BEGIN and END SOLUTION line."""
    spans, offset, start = [], 0, None
    for line in source.split("\n"):
        if line.strip() == BEGIN:
            start = offset + len(line) + 1
        elif line.strip() == END and start is not None:
            spans.append((start, offset))
            start = None
        offset += len(line) + 1
    return spans


def mutant_source(mutant: Mutant, solution: str) -> str:
    """The solution cell with the mutant's change applied (substitutions only inside the solution regions, each
    matching exactly once there); fails loudly when the change does not apply."""
    source = solution
    for old, new in mutant.substitutions:
        spans = _region_spans(source)
        at = [i for i in _occurrences(source, old) if any(lo <= i and i + len(old) <= hi for lo, hi in spans)]
        assert len(at) == 1, f"{mutant.label}: {old!r} occurs {len(at)} times in the solution regions, not once"
        source = source[: at[0]] + new + source[at[0] + len(old):]
    if mutant.bodies:
        source = _replace_regions(source, mutant.bodies, mutant.label)
    assert source != solution, f"{mutant.label}: the mutant equals the solution"
    return source


# -- in-process evaluation ---------------------------------------------------------------------------------------


@dataclass
class Verdict:
    mutant: Mutant | None  # None: the control (the solution itself)
    exercise: str
    score: float
    max_score: float
    failed: list[str] = field(default_factory=list)  # "case: status"
    cases: list[tuple[str, str, float]] = field(default_factory=list)  # (case, status, points) of every case

    @property
    def killed(self) -> bool:
        return self.score == 0 if self.mutant is not None and self.mutant.trivial else self.score < self.max_score


def run_cell(lab_name: str, exercise_name: str, source: str) -> ExerciseResult:
    """Run one exercise cell's cases, hidden ones included, in this process (as the grader's child would)."""
    lab = load_lab(lab_name)
    exercise = lab.exercise(exercise_name)
    namespace: dict[str, Any] = {"__name__": "__exercise__"}
    exec(compile(lab.preamble, "<preamble>", "exec"), namespace)
    namespace.update(lab.stand_ins(exercise))
    exec(compile(source, f"<exercise:{exercise_name}>", "exec"), namespace)
    return run_in_process(lab, exercise, namespace[exercise.symbol], include_hidden=True)


def _verdict(mutant: Mutant | None, exercise: str, result: ExerciseResult) -> Verdict:
    failed = [f"{case.case}: {case.status}" for case in result.cases if not case.passed]
    cases = [(case.case, case.status, case.points) for case in result.cases]
    return Verdict(mutant, exercise, result.score, result.max_score, failed, cases)


def evaluate(lab_name: str, only: set[str] | None = None, labels: set[str] | None = None) -> list[Verdict]:
    """The control (each solution cell) and every mutant of the lab's catalogue, judged in this process.
    only: these exercises only; labels: these mutants only ("exercise/name"), beside every control."""
    cells = solution_cells(lab_name)
    verdicts = []
    for exercise, mutants in load_catalogue(lab_name).items():
        if only and exercise not in only:
            continue
        solution = cells[exercise][2]
        verdicts.append(_verdict(None, exercise, run_cell(lab_name, exercise, solution)))
        for mutant in mutants:
            if labels is not None and mutant.label not in labels:
                continue
            verdicts.append(_verdict(mutant, exercise, run_cell(lab_name, exercise, mutant_source(mutant, solution))))
    return verdicts


def evaluate_isolated(lab_name: str, labels: set[str] | None = None, timeout_s: float = 1200) -> list[Verdict]:
    """evaluate() in a fresh interpreter with TRITON_INTERPRET=1 and one torch thread: the Triton exercise then
    runs in Triton's interpreter as in the grader, whatever this process imported before (compiled Triton cannot
    read the source of an exec'd kernel), and a mutant that crashes cannot take the caller down."""
    code = ("import json, sys; sys.path.insert(0, sys.argv[1]); import torch; torch.set_num_threads(1); "
            "from mutants import evaluate; "
            "print(json.dumps([[v.mutant and v.mutant.name, v.exercise, v.score, v.max_score, v.failed, v.cases] "
            "for v in evaluate(sys.argv[2], labels=json.loads(sys.argv[3]) and set(json.loads(sys.argv[3])))]))")
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=os.pathsep.join(
        [str(REPO)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
    chosen = json.dumps(None if labels is None else sorted(labels))
    done = subprocess.run([sys.executable, "-c", code, str(REPO / "tests"), lab_name, chosen], capture_output=True,
                          text=True, env=env, timeout=timeout_s, cwd=REPO)
    assert done.returncode == 0, done.stderr[-3000:]
    by_name = {(m.exercise, m.name): m for items in load_catalogue(lab_name).values() for m in items}
    return [Verdict(by_name[exercise, name] if name else None, exercise, score, max_score, failed,
                    [tuple(case) for case in cases])
            for name, exercise, score, max_score, failed, cases in json.loads(done.stdout.strip().splitlines()[-1])]


# -- submissions for the batch grader ----------------------------------------------------------------------------


def packed(mutants: list[Mutant]) -> list[list[Mutant]]:
    """Mutants grouped into submissions holding at most one mutant per exercise (as few submissions as that
    allows: the i-th mutant of every exercise goes into submission i)."""
    by_exercise: dict[str, list[Mutant]] = {}
    for mutant in mutants:
        by_exercise.setdefault(mutant.exercise, []).append(mutant)
    width = max((len(items) for items in by_exercise.values()), default=0)
    return [[items[i] for items in by_exercise.values() if i < len(items)] for i in range(width)]


def write_submission(lab_name: str, folder: Path, mutants: list[Mutant]) -> Path:
    """A folder submission: the lab's solution notebooks, with each mutant's exercise cell replaced."""
    cells = solution_cells(lab_name)
    by_notebook: dict[str, dict[int, str]] = {}
    for mutant in mutants:
        notebook, index, solution = cells[mutant.exercise]
        by_notebook.setdefault(notebook, {})[index] = mutant_source(mutant, solution)
    folder.mkdir(parents=True, exist_ok=True)
    for notebook in load_lab(lab_name).notebooks:
        nb = copy.deepcopy(read_notebook(REPO / "autograder" / lab_name / notebook))
        for index, source in by_notebook.get(notebook, {}).items():
            nb.cells[index].source = source
        nbformat.write(nb, str(folder / notebook))
    return folder
