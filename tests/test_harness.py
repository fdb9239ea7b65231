"""What runs beside learner code (autograder/harness) stands on its own: the grading child imports a lab's
harness module, never autograder.labs, whose cases and hidden inputs are absent from the child's copy.

Every driver, reference and stand-in is a top-level name of its lab's harness module (the grader replaces the
reference of the exercise being graded by that name), and what the child runs for an exercise (its driver and
its stand-ins) never reaches that exercise's own reference.
"""

from __future__ import annotations

import dis
import importlib
import inspect
import subprocess
import sys
import types
from pathlib import Path

import pytest

from autograder.labs import LAB_MODULES, load_lab

ROOT = Path(__file__).resolve().parents[1]


def harness_module(lab_name: str) -> str:
    return "autograder.harness." + LAB_MODULES[lab_name].rsplit(".", 1)[1]


def exercises():
    for lab_name in LAB_MODULES:
        lab = load_lab(lab_name)
        for exercise in lab.exercises:
            yield pytest.param(lab, exercise, id=f"{lab_name}:{exercise.name}")


def _globals_reached(obj, module: types.ModuleType) -> set[str]:
    """Names of `module`'s globals that calling `obj` can reach through other objects defined in `module`."""
    reached: set[str] = set()
    pending = [obj]
    seen: set[int] = set()
    while pending:
        item = pending.pop()
        if id(item) in seen:
            continue
        seen.add(id(item))
        if isinstance(item, type):
            pending.extend(vars(item).values())
            pending.extend(base for base in item.__bases__ if base.__module__ == module.__name__)
            continue
        if isinstance(item, (staticmethod, classmethod)):
            pending.append(item.__func__)
            continue
        if isinstance(item, property):
            pending.extend(f for f in (item.fget, item.fset, item.fdel) if f is not None)
            continue
        code = getattr(item, "__code__", None)
        if code is None or getattr(item, "__module__", None) != module.__name__:
            continue
        codes = [code]
        while codes:
            current = codes.pop()
            codes.extend(c for c in current.co_consts if isinstance(c, types.CodeType))
            for instruction in dis.get_instructions(current):
                if instruction.opname == "LOAD_GLOBAL" and instruction.argval in vars(module):
                    reached.add(instruction.argval)
                    pending.append(vars(module)[instruction.argval])
    return reached


@pytest.mark.parametrize("lab, exercise", exercises())
def test_what_runs_beside_learner_code_is_top_level_in_the_harness(lab, exercise):
    module = importlib.import_module(harness_module(lab.name))
    named = {"driver": exercise.driver, "reference": exercise.reference,
             **{f"stand-in {symbol}": obj for symbol, obj in lab.stand_ins(exercise).items()}}
    for role, obj in named.items():
        if role == "driver" and obj.__module__ == "autograder.spec":
            assert obj.__qualname__ == "call_with_inputs"
            continue
        assert obj.__module__ == module.__name__, f"{exercise.name}: {role} {obj.__qualname__} is in {obj.__module__}"
        assert getattr(module, obj.__qualname__, None) is obj, \
            f"{exercise.name}: {role} {obj.__qualname__} is not a top-level name of {module.__name__}"
    assert inspect.isfunction(exercise.reference) or inspect.isclass(exercise.reference)


@pytest.mark.parametrize("lab, exercise", exercises())
def test_the_child_never_needs_the_reference_it_grades(lab, exercise):
    module = importlib.import_module(harness_module(lab.name))
    graded = exercise.reference.__qualname__
    for role, obj in {"driver": exercise.driver, **lab.stand_ins(exercise)}.items():
        assert graded not in _globals_reached(obj, module), \
            f"{exercise.name}: {role} calls {graded}, which the grader replaces while grading {exercise.name}"


@pytest.mark.parametrize("lab_name", list(LAB_MODULES))
def test_harness_source_never_mentions_the_labs(lab_name):
    module = importlib.import_module(harness_module(lab_name))
    assert "autograder.labs" not in inspect.getsource(module)
    assert "autograder.labs" not in inspect.getsource(importlib.import_module("autograder.harness"))


@pytest.mark.parametrize("lab_name", list(LAB_MODULES))
def test_importing_a_harness_module_imports_no_lab_module(lab_name):
    code = (f"import sys, importlib; importlib.import_module({harness_module(lab_name)!r}); "
            "print(sorted(name for name in sys.modules if name == 'autograder.labs' "
            "or name.startswith('autograder.labs.')))")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
