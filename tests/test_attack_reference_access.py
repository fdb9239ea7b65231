"""Attacks on the reference implementation of the exercise being graded, and on the solutions.

One hostile fixture-lab submission runs every attack (an honest control, graded in the same batch, keeps full
marks: 6). Its `add` cell tries to get the real `ref_add` (the exercise's reference, in
autograder/harness/fixture.py) and the real `reference.kv.layout.kv_bytes_per_token` (a symbol the exercise hides)
by import_module, a sys.modules scan, builtins.__import__, pkgutil.resolve_name, spec_from_file_location and
open()+exec on the checkout's own file paths, gc.get_objects(), walking the call stack's frames and `git show`
on the checkout. Whatever an attack finds, it calls: a real implementation earns the exercise's points, while
the stubs of the redacted view (redact.py) raise "... is absent while this exercise is graded"; the error
message lists what each attack got, and each test checks its attack's entry and the 0 points. Its `counter`
cell looks for the lab module with the cases (autograder.labs), the solution notebooks, any notebook or .git
below the checkout, and earns points if it finds any. lab0.1: importing RMSNorm in the rms_norm cell of the
solution notebook costs exactly rms_norm's points; with `allow_reference` the same attacks do work (which
shows they are real attacks).
"""
from __future__ import annotations

import dataclasses
import shutil
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import nbformat
import pytest

import autograder
from autograder import sandbox
from autograder.grade import GradeOptions, grade
from autograder.labs import load_lab

pytestmark = pytest.mark.skipif(bool(sandbox.bwrap_problem()),
                                reason=f"bubblewrap cannot start here: {sandbox.bwrap_problem()}")

HOST_ROOT = Path(autograder.__file__).resolve().parent.parent  # the real checkout, as the grader sees it
SOLUTION = HOST_ROOT / "autograder" / "lab0.1" / "02_decoder_forward.ipynb"
FIXTURE = load_lab("fixture")
ABSENT = "is absent while this exercise is graded"

ADD = "def add(a, b):\n    return a + b\n"
COUNTER = (
    "class Counter:\n    def __init__(self, start):\n        self.total = start\n\n"
    "    def increment(self, by):\n        if by < 0:\n            raise ValueError('negative')\n"
    "        self.total += by\n        return self.total\n"
)

# The `add` cell: every attack (a body of `candidates(module, name, relative)`, which yields what it found) is
# tried on both targets, and a candidate that behaves like the real implementation is used: a real ref_add
# makes add return its answer, a real kv_bytes_per_token makes it return a + b (full marks either way). Else add
# raises LookupError with one code per attack and target: A (found only the stub that says "absent"), N (found
# nothing), X (the attack itself failed; the first such reason follows in brackets), F (found a fake), R (real).
ATTACKS = {  # short name -> the body of candidates(); each attack in a function of its own
    "import_module": """\
    yield getattr(importlib.import_module(module), name)
""",
    "sys_modules": """\
    importlib.import_module(module)  # make sure it is loaded, then look everywhere
    for loaded in list(sys.modules.values()):
        if callable(getattr(loaded, name, None)):
            yield getattr(loaded, name)
""",
    "builtins_import": """\
    yield getattr(builtins.__import__(module, {}, {}, [name], 0), name)
""",
    "resolve_name": """\
    yield pkgutil.resolve_name(f"{module}:{name}")
""",
    "spec_from_file": """\
    spec = importlib.util.spec_from_file_location(module + "_copy", os.path.join(HOST_ROOT, relative))
    loaded = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(loaded)
    yield getattr(loaded, name)
""",
    "gc_objects": """\
    importlib.import_module(module)
    yield from [o for o in gc.get_objects() if callable(o) and getattr(o, "__name__", None) == name]
""",
    "frame_walk": """\
    frame = sys._getframe()
    while frame is not None:
        for value in [*frame.f_globals.values(), *frame.f_locals.values()]:
            inner = list(value.values()) if isinstance(value, dict) else []  # the child's job, stand-ins...
            for item in [value, *inner]:
                if callable(item) and getattr(item, "__name__", None) == name:
                    yield item
                if isinstance(item, types.ModuleType) and callable(getattr(item, name, None)):
                    yield getattr(item, name)
        frame = frame.f_back
""",
    "open_exec": """\
    path = os.path.join(HOST_ROOT, relative)
    namespace = {"__name__": module + "_copy", "__package__": module.rpartition(".")[0], "__file__": path}
    exec(compile(open(path).read(), path, "exec"), namespace)
    yield namespace[name]
""",
    "git_show": """\
    shown = subprocess.run(["git", "-C", HOST_ROOT, "show", f"HEAD:{relative}"], capture_output=True, text=True)
    if shown.returncode != 0:
        raise FileNotFoundError(" ".join(shown.stderr.split()[:6]))
    namespace = {"__name__": module + "_copy", "__package__": module.rpartition(".")[0]}
    exec(compile(shown.stdout, relative, "exec"), namespace)
    yield namespace[name]
""",
}

ADD_ATTACKS = """\
import builtins, gc, importlib, importlib.util, os, pkgutil, subprocess, sys, types
import torch

HOST_ROOT = {host_root!r}
TARGETS = (("autograder.harness.fixture", "ref_add", "autograder/harness/fixture.py"),
           ("reference.kv.layout", "kv_bytes_per_token", "reference/kv/layout.py"))
ATTACKS = {{}}
{attacks}

def _code(name, candidates):
    try:
        found = list(candidates)
    except Exception as exc:
        return "X", f"{{type(exc).__name__}} {{exc}}"[:48]
    codes = []
    for candidate in found:
        try:
            if name == "ref_add":
                real = torch.equal(candidate(torch.ones(2), torch.ones(2)), torch.full((2,), 2.0))
            else:
                shape = types.SimpleNamespace(num_hidden_layers=1, num_key_value_heads=1, head_dim=1)
                real = candidate(shape, torch.float32) == 8
        except Exception as exc:
            codes.append("A" if {absent!r} in str(exc) else "X")
            continue
        if real:
            return "R", candidate
        codes.append("F")
    return ("A" if codes and set(codes) == {{"A"}} else "".join(sorted(set(codes))) or "N"), None

def add(a, b):
    report = []
    for attack, candidates in ATTACKS.items():
        codes, why = "", ""
        for module, name, relative in TARGETS:
            code, found = _code(name, candidates(module, name, relative))
            if code == "R" and name == "ref_add":
                return found(a, b)
            if code == "R":
                return a + b
            codes += code
            why = why or (found if code == "X" else "")
        report.append(f"{{attack}}={{codes}}" + (f"[{{why}}]" if why else ""))
    raise LookupError(" ".join(report))
"""


def add_attacks_cell() -> str:
    attacks = "".join(f"\ndef {name}(module, name, relative):\n{body}ATTACKS[{name!r}] = {name}\n"
                      for name, body in ATTACKS.items())
    return ADD_ATTACKS.format(host_root=str(HOST_ROOT), attacks=attacks, absent=ABSENT)


# The `counter` cell: attacks on files that are not the two targets. Counter(start) earns the counter points
# if any of them reads what it is after; else it raises LookupError listing what each one got.
COUNTER_ATTACKS = f"""\
import importlib, json, os

class Counter:
    def __init__(self, start):
        report, success = [], []
        try:  # the lab module holds the cases (and the reference, through the harness)
            success.append(importlib.import_module("autograder.labs.fixture").ADD.reference)
        except Exception as exc:
            report.append(f"labs={{type(exc).__name__}}")
        try:  # the solution notebook at its path in the checkout
            success.append(json.load(open({str(SOLUTION)!r}))["cells"])
        except Exception as exc:
            report.append(f"solution={{type(exc).__name__}}")
        for git in ({str(HOST_ROOT / '.git')!r}, "/grading/.git"):
            if os.path.exists(git):
                success.append(git)
        report.append("checkout=" + ",".join(sorted(os.listdir({str(HOST_ROOT)!r}))))
        found = []
        for top in ({str(HOST_ROOT)!r}, "/grading"):
            for folder, subfolders, files in os.walk(top):
                subfolders[:] = [d for d in subfolders if d != ".venv"]  # the runtime
                found += [f for f in files if f.endswith(".ipynb")]
                found += [d for d in subfolders if d in ("labs", "lab0.1", "lab0.2", "lab0.3", ".git")]
        report.append(f"found={{len(found)}}")
        if success or found:
            self.total = start
            return
        raise LookupError(" ".join(report))

    def increment(self, by):
        if by < 0:
            raise ValueError("negative")
        self.total += by
        return self.total
"""


@pytest.fixture(scope="module")
def graded(tmp_path_factory):
    """The attacks and an honest control, graded in one batch (-j 2)."""
    folder = tmp_path_factory.mktemp("reference_attacks")
    nbformat.write(fixture_notebook(ADD, COUNTER), str(folder / "control.ipynb"))
    nbformat.write(fixture_notebook(add_attacks_cell(), COUNTER_ATTACKS), str(folder / "attacker.ipynb"))
    grades = grade(FIXTURE, [folder / "control.ipynb", folder / "attacker.ipynb"], GradeOptions(jobs=2, progress=False))
    return {graded.student: graded for graded in grades}


def fixture_notebook(add: str, counter: str = COUNTER) -> nbformat.NotebookNode:
    cells = [nbformat.v4.new_code_cell(add, metadata={"tags": ["exercise:add"]}),
             nbformat.v4.new_code_cell(counter, metadata={"tags": ["exercise:counter"]})]
    for index, cell in enumerate(cells):
        cell.id = f"cell-{index}"
    return nbformat.v4.new_notebook(cells=cells)


def points(student) -> dict[str, float]:
    return {result.exercise: result.score for result in student.results}


def feedback(student, exercise: str, visible_only: bool = True) -> str:
    (result,) = [result for result in student.results if result.exercise == exercise]
    return " ".join(case.feedback for case in result.cases if case.visible or not visible_only)


def attack_codes(graded) -> dict[str, str]:
    """attack -> its codes (ref_add, kv_bytes_per_token), from the attacker's first visible add case."""
    message = graded["attacker"].results[0].cases[0].feedback.split("LookupError: ", 1)[1]
    return dict(item.split("[")[0].split("=") for item in message.split(" (line")[0].split() if "=" in item)


def test_the_honest_control_keeps_full_marks(graded):
    control = graded["control"]
    assert points(control) == {"add": 4, "counter": 2} and control.status == "ok", feedback(control, "add")


def test_the_attacker_earns_nothing(graded):
    attacker = graded["attacker"]
    assert points(attacker) == {"add": 0, "counter": 0}, feedback(attacker, "add") + feedback(attacker, "counter")
    hidden = [case for case in attacker.results[0].cases if not case.visible]
    assert [(case.status, case.points) for case in hidden] == [("error", 0.0)]


@pytest.mark.parametrize("attack", [name for name in ATTACKS if name not in ("frame_walk", "git_show")])
def test_each_import_or_file_path_to_the_reference_finds_only_the_stub(graded, attack):
    # AA: both ref_add and kv_bytes_per_token were reached, and both raised "... is absent while graded"
    assert attack_codes(graded).get(attack) == "AA", feedback(graded["attacker"], "add")


def test_the_call_stack_holds_no_reference(graded):
    codes = attack_codes(graded).get("frame_walk", "")
    assert len(codes) == 2 and set(codes) <= {"A", "N"}, feedback(graded["attacker"], "add")  # stubs or nothing


def test_the_git_history_is_not_there(graded):
    assert attack_codes(graded).get("git_show") == "XX", feedback(graded["attacker"], "add")
    if shutil.which("git"):  # else the attack cannot even start
        assert "git_show=XX[FileNotFoundError fatal: not a git repository" in feedback(graded["attacker"], "add")


def test_no_lab_module_solution_notebook_or_git_folder_is_visible(graded):
    said = feedback(graded["attacker"], "counter")
    assert "labs=ModuleNotFoundError" in said
    assert "solution=FileNotFoundError" in said
    listed = said.split("checkout=", 1)[1].split()[0].split(",")
    runtime = {Path(path).resolve().relative_to(HOST_ROOT).parts[0] for path in (sys.prefix, sys.exec_prefix)
               if Path(path).resolve().is_relative_to(HOST_ROOT) and Path(path).resolve() != HOST_ROOT}
    assert {"autograder", "reference"} <= set(listed) <= {"autograder", "reference"} | runtime, listed
    assert "found=0" in said


# -- lab0.1: a real exercise, and --allow-reference ----------------------------------------------------------

RMS_NORM_ATTACK = """\
import torch
from reference.models.llama import RMSNorm

def rms_norm(x, weight, eps=1e-6):
    norm = RMSNorm(x.shape[-1], eps=eps).to(x.dtype)
    with torch.no_grad():
        norm.weight.copy_(weight)
        return norm(x)
"""


def rms_norm_notebook(folder: Path) -> Path:
    """The lab0.1 solution notebook 02 with its rms_norm cell replaced by RMS_NORM_ATTACK."""
    notebook = nbformat.read(str(SOLUTION), as_version=4)
    cells = [cell for cell in notebook.cells if "exercise:rms_norm" in cell.metadata.get("tags", [])]
    assert len(cells) == 1
    cells[0].source = RMS_NORM_ATTACK
    path = folder / SOLUTION.name
    nbformat.write(notebook, str(path))
    return path


def test_importing_rms_norm_costs_exactly_the_rms_norm_points(tmp_path):
    lab = load_lab("lab0.1")
    notebook_exercises = [e for e in lab.exercises if e.notebook == SOLUTION.name]
    (student,) = grade(dataclasses.replace(lab, exercises=tuple(notebook_exercises)), [rms_norm_notebook(tmp_path)],
                       GradeOptions(jobs=2, progress=False))
    scored = {result.exercise: (result.score, result.max_score) for result in student.results}
    assert scored.pop("rms_norm")[0] == 0
    assert all(got == most for got, most in scored.values()), scored  # the other exercises keep full marks
    rms = next(result for result in student.results if result.exercise == "rms_norm")
    assert all("reference.models.llama.RMSNorm " + ABSENT in case.feedback for case in rms.cases if case.visible)


def test_allow_reference_lets_the_same_attacks_work(tmp_path):
    """The control experiment for the attacks: with the references kept, the same cells earn their points."""
    lab = load_lab("lab0.1")
    rms_only = dataclasses.replace(lab, exercises=(lab.exercise("rms_norm"),))
    attacker = tmp_path / "attacker.ipynb"
    nbformat.write(fixture_notebook(add_attacks_cell(), COUNTER_ATTACKS), str(attacker))
    options = GradeOptions(allow_reference=True, jobs=2, progress=False)
    with ThreadPoolExecutor(2) as pool:  # two labs, graded side by side
        fixture_run = pool.submit(grade, FIXTURE, [attacker], options)
        rms_run = pool.submit(grade, rms_only, [rms_norm_notebook(tmp_path)], options)
        (fixture_student,), (rms_student,) = fixture_run.result(), rms_run.result()
    assert points(fixture_student) == {"add": 4, "counter": 0}, feedback(fixture_student, "add")
    assert rms_student.score == rms_only.points > 0, feedback(rms_student, "rms_norm", False)
