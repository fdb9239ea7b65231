"""Attacks on hidden tests: their inputs and the instructor's hidden-test file must never reach what a student sees.

Unit tests on isolate.plan_children / build_job: a visible child's job holds no hidden case's name or inputs,
a hidden child's job only hidden ones. Then one batch (-j 2) on the fixture lab plus an instructor's hidden
case (a cube of 1234.5): submissions whose `add` puts its inputs into an exception message, prints them and
then kills its checking process, smuggles them through files to a later case or a later student, disguises an
exception as a timeout, or forges its own timeout report on the results pipe; one also tries to read the
hidden-test file. The whole gradebook (write_gradebook) is then searched for the hidden values and the
file's marker: a passing test proves they appear nowhere. An honest control keeps full marks (7 with the
instructor's case). The command line (`grade --tests --out`) is attacked the same way.
"""

from __future__ import annotations

import contextlib
import csv
import json
import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import nbformat
import pytest

import autograder
from autograder import codec, sandbox
from autograder.grade import GradeOptions, grade, load_hidden_tests
from autograder.gradebook import write_gradebook
from autograder.isolate import build_job, plan_children
from autograder.labs import load_lab
from autograder.runner import prepare

HOST_ROOT = Path(autograder.__file__).resolve().parent.parent
FIXTURE = load_lab("fixture")
TAG = uuid.uuid4().hex[:12]
FILE_MARKER = f"instructor-only-{TAG}"  # a comment in the hidden-test file
CUBE = "1234.5"  # every entry of the instructor's hidden input `a`
HIDDEN_TESTS = f"""\
# {FILE_MARKER}
import torch
from autograder.compare import Close
from autograder.spec import Case
CASES = {{'add': [Case('secret_cube', lambda g: {{'a': torch.full((2, 2, 2), {CUBE}), 'b': torch.ones(2, 2, 2)}},
                      Close(1e-6, 0.0), 'a sum of two 3-d tensors', timeout_s=2.0)]}}
"""
ADD = "def add(a, b):\n    return a + b\n"
COUNTER = (
    "class Counter:\n    def __init__(self, start):\n        self.total = start\n\n"
    "    def increment(self, by):\n        if by < 0:\n            raise ValueError('negative')\n"
    "        self.total += by\n        return self.total\n"
)

needs_bwrap = pytest.mark.skipif(bool(sandbox.bwrap_problem()),
                                 reason=f"bubblewrap cannot start here: {sandbox.bwrap_problem()}")


def write_hidden_tests(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "fixture.py").write_text(HIDDEN_TESTS)
    return folder


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    """The fixture lab with the instructor's hidden case, and the folder of the hidden-test file."""
    folder = write_hidden_tests(tmp_path_factory.mktemp("instructor"))
    return load_hidden_tests(FIXTURE, folder), folder


def hidden_values(lab) -> list[str]:
    """Texts that only a leak of hidden inputs could produce: the instructor's 1234.5, and the repr of the first
    entries of the fixture's own hidden_matrix, as `a.tolist()` shows them."""
    (matrix,) = [case for case in lab.exercise("add").cases if case.name == "hidden_matrix"]
    inputs = codec.loads(prepare(lab.exercise("add"), matrix).inputs_wire)
    texts = [CUBE, repr(inputs["a"].flatten()[0].item()), repr(inputs["b"].flatten()[0].item())]
    assert all(len(text) > 8 for text in texts[1:])  # random floats: no number the feedback could hold by chance
    return texts


# -- the plan: which inputs go to which child -----------------------------------------------------------------


def test_hidden_cases_run_in_children_of_their_own(lab):
    lab, _ = lab
    for isolated in (True, False):
        plans = plan_children(lab, ["add", "counter"], include_hidden=True, isolated=isolated)
        assert [(plan.exercises, plan.visible) for plan in plans] == [(("add", "counter"), True), (("add",), False)]
    assert [plan.visible for plan in plan_children(lab, ["add", "counter"], False, True)] == [True]


def test_a_visible_job_holds_no_hidden_name_or_input_and_a_hidden_job_only_hidden_ones(lab):
    lab, _ = lab
    wires = {case.name: prepare(lab.exercise(name), case).inputs_wire for name in ("add", "counter")
             for case in lab.exercise(name).cases}
    hidden = {"hidden_matrix", "secret_cube"}
    assert hidden < set(wires) and len(set(wires.values())) == len(wires)  # distinct inputs: the search means something
    for plan in plan_children(lab, ["add", "counter"], include_hidden=True, isolated=True):
        job, prepared = build_job(lab, plan, {"add": ADD, "counter": COUNTER}, ())
        text = json.dumps(job)
        names = {case["name"] for item in job["exercises"] for case in item["cases"]}
        assert names == (set(wires) - hidden if plan.visible else hidden)
        assert {name for _, name in prepared} == names
        for name, wire in wires.items():
            assert (json.dumps(wire)[1:-1] in text) == (name in names), (plan, name)  # the wire, as the job holds it
            if name not in names:
                assert name not in text


# -- the batch ------------------------------------------------------------------------------------------------

RAISE_INPUTS = """\
def add(a, b):
    raise ValueError(repr(a.tolist()) + repr(b.tolist()))
"""
# counter: honest, unless it can read the hidden-test file, whose text then goes into its error message.
READ_HIDDEN_FILE = """\
try:
    LEAKED = open({path!r}).read()
except OSError as exc:
    LEAKED = None

class Counter:
    def __init__(self, start):
        if LEAKED is not None:
            raise ValueError("LEAK: " + LEAKED[:250])
        self.total = start

    def increment(self, by):
        if by < 0:
            raise ValueError('negative')
        self.total += by
        return self.total
"""
# Prints its inputs (stdout and stderr) and writes them to files in every place it can write; any file from an
# earlier case or student goes into its error message. On the 3-d cube it kills its checking process right
# after printing, so the printed inputs are the last output line.
SMUGGLER = f"""\
import os, signal, sys
PLACES = ["/tmp", "/dev/shm", "/scratch", os.path.expanduser("~"), "/", "/work", "/etc", "/root", "/run"]
NAME = "smuggled-{TAG}"

def add(a, b):
    text = repr(a.tolist())
    print(text, flush=True)
    print(text, file=sys.stderr, flush=True)
    found = []
    for place in PLACES:  # first read everything, then write
        try:
            found.append(open(os.path.join(place, NAME)).read())
        except OSError:
            pass
    for place in PLACES:
        try:
            with open(os.path.join(place, NAME), "a") as f:
                f.write(text)
        except OSError:
            pass
    if a.dim() == 3:
        print(text, flush=True)
        os.kill(os.getppid(), signal.SIGKILL)
        os._exit(1)
    if found:
        raise ValueError("smuggled: " + " ".join(found)[:250])
    return a + b
"""
# An exception class named like the grader's timeout message: its text passes for the grader's own.
DISGUISED_TIMEOUT = """\
TookLonger = type("took longer than", (Exception,), {})

def add(a, b):
    raise TookLonger(repr(a.tolist()))
"""
# A result line of its own, written on the results pipe before the real one: a timeout whose message is
# the inputs. The current case's name is found in the child's frames.
FORGED_TIMEOUT = """\
import json, os, sys

def add(a, b):
    frame = sys._getframe()
    while frame is not None and not isinstance(frame.f_locals.get("case"), dict):
        frame = frame.f_back
    name = frame.f_locals["case"]["name"]
    line = {"exercise": "add", "case": name, "status": "timeout", "message": "took longer than " + repr(a.tolist())}
    os.write(3, (json.dumps(line) + "\\n").encode())
    return a + b
"""


@pytest.fixture(scope="module")
def graded(lab, tmp_path_factory):
    """Grade the control and every attacker in one batch (-j 2) and write the gradebook."""
    lab, tests = lab
    folder = tmp_path_factory.mktemp("hidden_attacks")
    read_file = READ_HIDDEN_FILE.format(path=str(tests / "fixture.py"))
    submissions = {  # the smugglers first and last: the last may find what the first's hidden child left
        "smuggler_first": (SMUGGLER, COUNTER), "control": (ADD, COUNTER), "raise_inputs": (RAISE_INPUTS, read_file),
        "disguised_timeout": (DISGUISED_TIMEOUT, COUNTER), "forged_timeout": (FORGED_TIMEOUT, COUNTER),
        "smuggler_last": (SMUGGLER, COUNTER),
    }
    paths = []
    for name, (add, counter) in submissions.items():
        nbformat.write(fixture_notebook(add, counter), str(folder / f"{name}.ipynb"))
        paths.append(folder / f"{name}.ipynb")
    grades = grade(lab, paths, GradeOptions(jobs=2, progress=False))
    out = tmp_path_factory.mktemp("gradebook") / "graded"
    write_gradebook(lab, grades, out)
    leftovers = [os.path.join(place, f"smuggled-{TAG}") for place in ("/tmp", "/dev/shm", "/", "/work", "/root")
                 if os.path.lexists(os.path.join(place, f"smuggled-{TAG}"))]
    return {graded.student: graded for graded in grades}, out, leftovers


def fixture_notebook(add: str, counter: str) -> nbformat.NotebookNode:
    cells = [nbformat.v4.new_code_cell(add, metadata={"tags": ["exercise:add"]}),
             nbformat.v4.new_code_cell(counter, metadata={"tags": ["exercise:counter"]})]
    for index, cell in enumerate(cells):
        cell.id = f"cell-{index}"
    return nbformat.v4.new_notebook(cells=cells)


def files_of(out: Path, student: str | None = None) -> dict[str, str]:
    """Every file of the gradebook (or of one student's folder), by relative path."""
    top = out / student if student else out
    return {str(path.relative_to(out)): path.read_text(errors="replace") for path in top.rglob("*") if path.is_file()}


def leaks_in(text: str, values: list[str]) -> list[str]:
    return [value for value in values if value in text]


def cases(student, exercise: str = "add") -> dict[str, tuple[str, float, str]]:
    (result,) = [r for r in student.results if r.exercise == exercise]
    return {case.case: (case.status, case.points, case.feedback) for case in result.cases}


@needs_bwrap
def test_the_honest_control_keeps_full_marks(graded, lab):
    control = graded[0]["control"]
    assert control.score == lab[0].points == 7 and control.status == "ok", cases(control)


@needs_bwrap
@pytest.mark.parametrize("student", ["raise_inputs", "smuggler_first", "smuggler_last"])
def test_hidden_inputs_appear_nowhere_in_the_gradebook(graded, lab, student):
    grades, out, _ = graded
    values = hidden_values(lab[0])
    for path, text in files_of(out, student).items():
        assert leaks_in(text, values) == [], path
    assert leaks_in(" ".join(feedback for _, _, feedback in cases(grades[student]).values()), values) == []


@needs_bwrap
def test_an_exception_of_a_hidden_case_shows_only_its_type(graded):
    grades, _, _ = graded
    seen = cases(grades["raise_inputs"])
    assert seen["hidden_matrix"] == ("error", 0.0, "elementwise sum of two matrices -- yours: ValueError")
    assert seen["secret_cube"] == ("error", 0.0, "a sum of two 3-d tensors -- yours: ValueError")
    assert "ValueError: [" in seen["vectors"][2]  # the attack works: visible inputs do show


@needs_bwrap
def test_the_hidden_test_file_cannot_be_read(graded):
    grades, out, _ = graded
    assert cases(grades["raise_inputs"], "counter") == {"counts_up": ("pass", 1.0, ""),
                                                        "rejects_negative": ("pass", 1.0, "")}
    for path, text in files_of(out).items():
        assert FILE_MARKER not in text, path


@needs_bwrap
def test_printed_inputs_and_the_last_output_line_of_a_hidden_child_are_not_shown(graded):
    grades, _, _ = graded
    seen = cases(grades["smuggler_first"])
    assert seen["secret_cube"][:2] == ("crashed", 0.0)
    assert "last output" not in seen["secret_cube"][2]
    assert seen["hidden_matrix"] == ("pass", 1.0, "")  # the hidden child found nothing of the visible one's


@needs_bwrap
def test_files_carry_nothing_from_a_hidden_child_to_a_later_case_or_student(graded):
    grades, _, leftovers = graded
    for student in ("smuggler_first", "smuggler_last"):
        seen = cases(grades[student])
        assert seen["vectors"] == ("pass", 2.0, "")  # nothing was there before this student's first case
        assert "smuggled: [" in seen["slow_guard"][2]  # the channel works within one sandbox
    assert leftovers == []


@needs_bwrap
@pytest.mark.parametrize("student", ["disguised_timeout", "forged_timeout"])
def test_a_disguised_timeout_message_shows_no_hidden_inputs(graded, lab, student):
    grades, out, _ = graded
    values = hidden_values(lab[0])
    assert "took longer than" in cases(grades[student])["vectors"][2]  # the disguise reached the feedback
    for path, text in files_of(out, student).items():
        assert leaks_in(text, values) == [], path


# -- the command line -----------------------------------------------------------------------------------------


@needs_bwrap
def test_the_command_line_keeps_hidden_tests_and_the_output_folder_out_of_sight(tmp_path):
    """`grade --tests DIR --out OUT`, with DIR inside the checkout (the checkout is never shown) and an
    attacker that reads both folders and prints the hidden inputs."""
    inside = HOST_ROOT / f".attack-hidden-tests-{TAG}"
    tests = inside if os.access(HOST_ROOT, os.W_OK) else tmp_path / "instructor"
    out = tmp_path / "graded"
    attacker = tmp_path / "attacker.ipynb"
    reads = (f"import os\nSEEN = []\nfor _p in ({str(tests / 'fixture.py')!r}, {str(out)!r}):\n"
             "    try:\n        SEEN.append(open(_p).read() if _p.endswith('.py') else ' '.join(os.listdir(_p)))\n"
             "    except OSError:\n        pass\n")
    add = reads + ("def add(a, b):\n    if SEEN:\n        raise ValueError('LEAK: ' + ' '.join(SEEN)[:250])\n"
                   "    print(repr(a.tolist()))\n    return a + b\n")
    nbformat.write(fixture_notebook(add, COUNTER), str(attacker))
    try:
        write_hidden_tests(tests)
        result = subprocess.run([sys.executable, "-m", "autograder", "grade", "fixture", str(attacker), "--tests",
                                 str(tests), "--out", str(out), "-j", "2"], cwd=tmp_path, capture_output=True,
                                text=True, timeout=300, env=dict(os.environ, PYTHONPATH=str(HOST_ROOT)))
        lab = load_hidden_tests(FIXTURE, tests)
    finally:
        with contextlib.suppress(OSError):
            shutil.rmtree(inside)
    assert result.returncode == 0, result.stderr
    rows = {row[0]: row for row in csv.reader((out / "grades.csv").open())}
    assert rows["attacker"][1:5] == ["ok", "5", "2", "7"], rows  # no read worked: full marks
    values = hidden_values(lab) + [FILE_MARKER, "LEAK"]
    for path, text in files_of(out).items():
        assert leaks_in(text, values) == [], path
    assert leaks_in(result.stdout + result.stderr, values) == []


def test_hidden_tests_inside_a_package_folder_are_refused():
    """The sandbox's redacted copy is made from the package folders: hidden tests kept there would be copied."""
    from autograder.grade import load_hidden_tests

    with pytest.raises(ValueError, match="keep hidden tests outside the package folder"):
        load_hidden_tests(load_lab("fixture"), Path(__file__).resolve().parent.parent / "autograder" / "labs")
