"""The test format shared by the notebook self-check, `python -m autograder check` and the batch grader.

A lab module (autograder/labs/lab0_1.py, ...) builds one `Lab`: a fixed preamble of imports and its
`Exercise`s. An exercise names the symbol the learner writes (a function or a class), the notebook and cell tag
where it lives (`exercise:<name>`), a trusted `reference` with the same signature, a `driver` and its `Case`s.

How one case runs (the same steps in every mode; only where step 3 happens changes):
1. parent: `case.make_inputs(generator)` draws plain inputs from a torch.Generator seeded with `case.seed`;
2. parent: the expected value is `exercise.driver(exercise.reference, inputs)` (or `case.expected(inputs)`),
   i.e. computed with the `reference` package, then round-tripped through the codec;
3. learner side (in-process for the self-check, a child process for the command line / grader): the inputs
   are decoded afresh, `exercise.driver(learner_object, inputs)` runs, and its result is encoded (codec);
4. parent: the result is decoded and `case.compare` judges it against the expected value.

The driver is trusted code that turns "call the learner's object" into plain data: for a function usually
`fn(**inputs)`; for a stateful class it replays a list of operations and returns a trace of observable results.
Drivers, references and the preamble live in the lab's harness module (autograder/harness/lab0_1.py, ...),
so that a child process can run them without the lab module and its cases.

Each exercise is tested on its own: the names in `uses` (other exercises of the same lab) are bound to their
reference implementations while this exercise runs, so one wrong exercise costs only its own points.
Inputs, expected values and results are plain data (see codec.py) so they can cross a process boundary safely.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from .compare import Comparison


def call_with_inputs(obj: Callable, inputs: dict[str, Any]) -> Any:
    """The default driver: call the learner's function with the case's inputs, positionally, in the order of
    the dict (which must be the signature's order), so the parameter names are the learner's business."""
    return obj(*inputs.values())


@dataclass(frozen=True)
class Case:
    """One test of one exercise.

    name: short identifier, unique within the exercise (shown in the table).
    make_inputs: generator -> dict of plain inputs; runs on the parent side with a generator seeded by `seed`.
    compare: how the result is judged, with its tolerance written down (compare.Exact, compare.Close, ...).
    feedback: what the case checks and what was expected, in words; must not reveal hidden inputs.
    points: what the case is worth (partial credit = several cases).
    visible: visible cases ship with the course and run in the self-check; hidden ones only in `grade`.
    expected: inputs -> plain expected value; None means "run the driver on the exercise's reference".
    timeout_s: wall-clock limit for this case where the runner can enforce one.
    """

    name: str
    make_inputs: Callable[[torch.Generator], dict[str, Any]]
    compare: Comparison
    feedback: str
    points: float = 1.0
    visible: bool = True
    seed: int = 0
    expected: Callable[[dict[str, Any]], Any] | None = None
    timeout_s: float = 20.0

    def inputs(self) -> dict[str, Any]:
        generator = torch.Generator().manual_seed(self.seed)
        return self.make_inputs(generator)


@dataclass(frozen=True)
class Exercise:
    """One skeleton the learner fills in.

    name: the exercise name; its cell carries the tag `exercise:<name>` and its NotImplementedError names it.
    symbol: the function or class name the learner defines in that cell (the fallback when a tag is missing).
    notebook: the notebook file (inside the lab folder) the exercise lives in.
    signature: the frozen signature, as documentation (the grader calls it through `driver`).
    reference: trusted implementation with the same signature (expected values, stand-in for stuck learners).
    cases: the tests.
    driver: (learner object, inputs) -> plain result; runs wherever the learner's code runs. The default calls
        the object with the inputs' values as positional arguments, in the dict's order.
    uses: names of other exercises of this lab whose symbols the learner's code may call; while this exercise
        is tested, those symbols are bound to their reference implementations.
    hides: dotted names of `reference` symbols that implement this exercise, for the grader to hide.
    """

    name: str
    symbol: str
    notebook: str
    signature: str
    reference: Callable
    cases: tuple[Case, ...]
    driver: Callable[[Any, dict[str, Any]], Any] = call_with_inputs
    uses: tuple[str, ...] = ()
    hides: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        names = [case.name for case in self.cases]
        if len(set(names)) != len(names):
            raise ValueError(f"exercise {self.name}: case names must be unique, got {names}")

    @property
    def tag(self) -> str:
        return f"exercise:{self.name}"

    @property
    def points(self) -> float:
        return sum(case.points for case in self.cases)

    @property
    def visible_points(self) -> float:
        return sum(case.points for case in self.cases if case.visible)

    def selected_cases(self, include_hidden: bool) -> tuple[Case, ...]:
        return tuple(case for case in self.cases if include_hidden or case.visible)


@dataclass(frozen=True)
class Lab:
    """A lab: its name ("lab0.1", also the folder of its learner notebooks), a fixed preamble and its exercises.

    preamble: the imports every exercise cell may rely on; it is run before an exercise cell wherever the cell
    runs outside its notebook (the command-line check, the grader). Exercise cells must not depend on anything
    else from their notebook.
    memory_mb: the default limit on the resident memory of a grading child, all its processes together (the
    warden's measure), about twice what grading the solutions needs with the CUDA build of torch. Never an
    address-space limit: a CUDA build of torch maps about 4 GB just to import.
    """

    name: str
    preamble: str
    exercises: tuple[Exercise, ...]
    notes: dict[str, str] = field(default_factory=dict)
    memory_mb: int = 4096

    def __post_init__(self) -> None:
        names = [exercise.name for exercise in self.exercises]
        if len(set(names)) != len(names):
            raise ValueError(f"{self.name}: exercise names must be unique, got {names}")
        for exercise in self.exercises:
            unknown = set(exercise.uses) - set(names)
            if unknown:
                raise ValueError(f"{self.name}: exercise {exercise.name} uses unknown exercises {sorted(unknown)}")

    def exercise(self, name: str) -> Exercise:
        for exercise in self.exercises:
            if exercise.name == name:
                return exercise
        raise ValueError(f"{self.name} has no exercise {name!r}; exercises: {', '.join(self.exercise_names)}")

    @property
    def folder(self) -> str:
        """The folder of the learner notebooks (autograder/<folder>/ holds the solution notebooks)."""
        return self.name

    @property
    def exercise_names(self) -> list[str]:
        return [exercise.name for exercise in self.exercises]

    @property
    def notebooks(self) -> list[str]:
        seen: list[str] = []
        for exercise in self.exercises:
            if exercise.notebook not in seen:
                seen.append(exercise.notebook)
        return seen

    def exercises_in(self, notebook: str) -> tuple[Exercise, ...]:
        return tuple(exercise for exercise in self.exercises if exercise.notebook == notebook)

    def stand_ins(self, exercise: Exercise) -> dict[str, Any]:
        """symbol -> reference implementation, for every exercise `exercise` uses."""
        return {self.exercise(name).symbol: self.exercise(name).reference for name in exercise.uses}

    @property
    def points(self) -> float:
        return sum(exercise.points for exercise in self.exercises)
