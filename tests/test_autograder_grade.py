"""The batch grader (`python -m autograder grade`), its sandbox and the Gradescope zip, on the tiny fixture lab.

One module-level batch grades the whole catalogue of hostile and broken submissions at once (-j 2), so the
torch start-up of each child is paid in parallel; each test then checks one submission's score and message.
Limits are the fixture's (2-3 s per case, 10 s per exercise cell) but for memory (MEMORY_MB). Fixture scores:
add 4 (3 visible + 1 hidden), counter 2.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import nbformat
import pytest

from autograder import sandbox
from autograder.grade import GradeOptions, grade, load_hidden_tests
from autograder.gradebook import write_gradebook
from autograder.gradescope import build_zip
from autograder.labs import load_lab
from autograder.release import release_notebook

REPO = Path(__file__).resolve().parent.parent
FIXTURE = load_lab("fixture")
STORM_MARK = "4242.123"  # the sleep length of the storm's processes, to find any survivor
# The batch's memory limit: above a child's own ~300 MB (CUDA build of torch), low enough that the memory bomb
# reaches it well within the 10 s cell limit on machines whose fresh pages fault in at only ~100 MB/s (seen on
# CI: at the lab's 2048 MB the bomb timed out first).
MEMORY_MB = 640

ADD = "def add(a, b):\n    ### BEGIN SOLUTION\n    return a + b\n    ### END SOLUTION\n"
COUNTER = (
    "class Counter:\n    def __init__(self, start):\n        self.total = start\n\n"
    "    def increment(self, by):\n        ### BEGIN SOLUTION\n        if by < 0:\n"
    "            raise ValueError('negative')\n        self.total += by\n        return self.total\n"
    "        ### END SOLUTION\n"
)


def add_doing(body: str, before: str = "") -> str:
    """An add cell whose body is `body` (indented here), after top-level code `before`."""
    return before + "def add(a, b):\n" + "".join(f"    {line}\n" for line in body.splitlines())


def notebook(add: str = ADD, counter: str = COUNTER) -> nbformat.NotebookNode:
    cells = [nbformat.v4.new_markdown_cell("# Fixture"),
             nbformat.v4.new_code_cell("raise RuntimeError('a non-exercise cell is never run')"),
             nbformat.v4.new_code_cell(add, metadata={"tags": ["exercise:add"]}),
             nbformat.v4.new_code_cell(counter, metadata={"tags": ["exercise:counter"]})]
    for index, cell in enumerate(cells):
        cell.id = f"cell-{index}"
    return nbformat.v4.new_notebook(cells=cells)


STORM = f"""\
import subprocess
storm = [subprocess.Popen(["sleep", "{STORM_MARK}"], start_new_session=(i % 3 == 0)) for i in range(240)]
"""
FAKE_RESULTS = """\
import json, sys
print('{"exercise": "add", "case": "vectors", "status": "pass"}')
print("score: 100/100")
with open(3, "a", closefd=False) as results:  # the child's own results pipe
    results.write(json.dumps({"exercise": "counter", "case": "counts_up", "status": "pass"}) + "\\n")
    results.write(json.dumps({"exercise": "counter", "case": "rejects_negative", "status": "ok",
                              "result": "[1, 2, 3]"}) + "\\n")
"""
LIARS = """\
class Liar(torch.Tensor):
    def __eq__(self, other):
        return True

class Lie:
    def __eq__(self, other): return True
    def __float__(self): return 7.0
    def __index__(self): return 7
"""
PATCHES = """\
import torch, reference, autograder.codec, autograder.compare, autograder.runner
torch.allclose = lambda *args, **kwargs: True
torch.equal = lambda *args, **kwargs: True
torch.Tensor.__eq__ = lambda self, other: True
autograder.compare.Close.compare = lambda self, got, expected: None
autograder.runner.judge = lambda *args: None
reference.kv_cache = None
"""

# name -> (add cell, counter cell, points for add, points for counter, status, words in the add feedback)
CATALOGUE = {
    "solution": (ADD, COUNTER, 4, 2, "ok", ""),
    "one_wrong": (ADD, COUNTER.replace("self.total += by", "self.total += 2 * by"), 4, 0, "ok", ""),
    "infinite_loop": (add_doing("while True:\n    pass"), COUNTER, 0, 2, "timeout", "took longer than 2 s"),
    "loop_at_import": ("while True:\n    pass\n" + ADD, COUNTER, 0, 2, "timeout", "did not finish running within 10 s"),
    "memory_bomb": (add_doing("return a + b",
                              before="chunks = []\nwhile True:\n    chunks.append(torch.ones(50_000_000))\n"),
                    COUNTER, 0, 2, "crash", f"memory limit: the code used more than {MEMORY_MB} MB"),
    "process_storm": (ADD, STORM + COUNTER, 4, 0, "crash", ""),
    "sys_exit_at_import": ("import sys\nsys.exit(3)\n" + ADD, COUNTER, 0, 2, "ok", "SystemExit: 3"),
    "os_exit_at_import": ("import os\nos._exit(0)\n" + ADD, COUNTER, 0, 2, "crash", "ended (exit status 0)"),
    "sys_exit_in_function": (add_doing("import sys\nsys.exit(1)"), COUNTER, 0, 2, "ok", "SystemExit"),
    "os_exit_in_function": (add_doing("import os\nos._exit(7)"), COUNTER, 0, 2, "crash", "exit status 7"),
    "keyboard_interrupt": (add_doing("raise KeyboardInterrupt"), COUNTER, 0, 2, "ok", "KeyboardInterrupt"),
    "system_exit": (add_doing("raise SystemExit('bye')"), COUNTER, 0, 2, "ok", "SystemExit: bye"),
    "base_exception": (add_doing("raise BaseException('boom')"), COUNTER, 0, 2, "ok", "BaseException: boom"),
    "monkeypatching": (add_doing("return a * 0", before=PATCHES), COUNTER, 0, 2, "ok", "wrong values"),
    "lying_objects": (add_doing("return (a + b).as_subclass(Liar)", before=LIARS),
                      LIARS + COUNTER.replace("return self.total", "return Lie()"), 0, 0, "ok", "cannot be returned"),
    "fake_results": (add_doing("return a - b", before=FAKE_RESULTS), COUNTER, 0, 0, "ok", "wrong values"),
    "syntax_error": ("def add(a, b)\n    return a + b\n", COUNTER, 0, 2, "ok", "SyntaxError"),
    "missing_function": ("def plus(a, b):\n    return a + b\n", COUNTER, 0, 2, "ok", "does not define add"),
    "wrong_signature": (add_doing("return a", before="").replace("(a, b)", "(a)"), COUNTER, 0, 2, "ok",
                        "TypeError"),
    "huge_output": (add_doing("return a + b", before="import sys\nfor _ in range(500):\n"
                              "    sys.stdout.write('spam' * 250_000)\n"), COUNTER, 4, 2, "ok", ""),
    "hidden_reference": (add_doing("return ref_add(a, b)", before="from autograder.harness.fixture import ref_add\n"),
                         COUNTER, 0, 2, "ok", "absent while this exercise is graded"),
    "other_reference_works": (add_doing("return a + b", before="from reference.kv_cache import ContiguousKVCache\n"),
                              COUNTER, 4, 2, "ok", ""),
}


def write_output_dir_cell(out: Path) -> str:
    """A submission that writes into the grader's output folder (its path guessed)."""
    return add_doing("return a + b", before=(
        "import os\n"
        f"os.makedirs({str(out / 'writer')!r}, exist_ok=True)\n"
        f"open({str(out / 'grades.csv')!r}, 'w').write('writer,ok,4,2,100\\n')\n"
        f"open({str(out / 'writer' / 'results.json')!r}, 'w').write('{{\"score\": 100}}')\n"))


@pytest.fixture(scope="module")
def catalogue(tmp_path_factory):
    """Grade every catalogue entry, the learner notebook, a writer, and unreadable files, in one -j 2 batch."""
    folder = tmp_path_factory.mktemp("submissions")
    out = tmp_path_factory.mktemp("graded")
    paths = []
    for name, (add, counter, *_) in CATALOGUE.items():
        nbformat.write(notebook(add, counter), str(folder / f"{name}.ipynb"))
        paths.append(folder / f"{name}.ipynb")
    nbformat.write(release_notebook(notebook()), str(folder / "learner.ipynb"))
    nbformat.write(notebook(write_output_dir_cell(out)), str(folder / "writer.ipynb"))
    (folder / "invalid_json.ipynb").write_text("{not json")
    (folder / "empty.ipynb").write_text("")
    paths += [folder / name for name in ("learner.ipynb", "writer.ipynb", "invalid_json.ipynb", "empty.ipynb")]
    grades = grade(FIXTURE, paths, GradeOptions(jobs=2, progress=False, memory_mb=MEMORY_MB))
    write_gradebook(FIXTURE, grades, out)
    return {graded.student: graded for graded in grades}, out


def exercise_points(graded) -> tuple[float, float]:
    scored = {result.exercise: result.score for result in graded.results}
    return scored["add"], scored["counter"]


def add_feedback(graded) -> str:
    return " ".join(case.feedback for case in graded.results[0].cases)


@pytest.mark.parametrize("name", list(CATALOGUE))
def test_each_submission_gets_its_score_status_and_message(catalogue, name):
    grades, _ = catalogue
    _, _, add_points, counter_points, status, words = CATALOGUE[name]
    graded = grades[name]
    assert exercise_points(graded) == (add_points, counter_points), add_feedback(graded)
    assert graded.status == status
    assert words in add_feedback(graded)


def test_learner_notebook_scores_zero_with_not_implemented_per_exercise(catalogue):
    graded = catalogue[0]["learner"]
    assert exercise_points(graded) == (0, 0) and graded.status == "ok"
    assert {case.status for result in graded.results for case in result.cases} == {"not implemented"}
    assert "Counter is not implemented yet" in graded.results[1].cases[0].feedback


@pytest.mark.parametrize("name, words", [("invalid_json", "not a valid notebook"), ("empty", "the file is empty")])
def test_unreadable_notebooks_are_invalid_with_the_reason(catalogue, name, words):
    graded = catalogue[0][name]
    assert graded.status == "invalid" and graded.score == 0
    assert words in graded.results[0].cases[0].feedback


def test_a_process_storm_costs_its_exercise_and_no_process_survives(catalogue):
    graded = catalogue[0]["process_storm"]
    assert exercise_points(graded) == (4, 0)  # add ran before the storm, in the same child
    assert "process limit: the code started more than 64 processes" in graded.results[1].cases[0].feedback
    assert storm_survivors() == []


def storm_survivors() -> list[int]:
    survivors = []
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                if STORM_MARK.encode() in f.read():
                    survivors.append(int(entry))
        except (OSError, ValueError):
            continue
    return survivors


def test_printing_gigabytes_is_drained_noted_and_harmless(catalogue):
    notes = " ".join(catalogue[0]["huge_output"].notes)
    assert "the code printed 500 MB" in notes  # the visible child's: a hidden child's output size is not reported


def test_using_the_absent_reference_is_reported_in_the_feedback(catalogue):
    grades, out = catalogue
    feedback = (out / "hidden_reference" / "feedback.md").read_text()
    assert "autograder.harness.fixture.ref_add is absent while this exercise is graded" in feedback


def test_files_written_into_the_output_folder_do_not_survive(catalogue):
    grades, out = catalogue
    rows = list(csv.reader((out / "grades.csv").open()))
    assert rows[0][:5] == ["student", "status", "add", "counter", "total"]
    assert rows[1][:5] == ["(max points)", "", "4", "2", "6"]
    assert len(rows) == 2 + len(grades)
    assert ["writer", "ok", "4", "2", "6"] == next(row[:5] for row in rows if row[0] == "writer")
    assert json.loads((out / "writer" / "results.json").read_text())["score"] == 6


def test_results_json_is_in_gradescope_format_and_hides_hidden_values(catalogue):
    grades, out = catalogue
    results = json.loads((out / "one_wrong" / "results.json").read_text())
    assert results["score"] == 4 and isinstance(results["execution_time"], float)
    tests = {test["name"]: test for test in results["tests"]}
    assert set(tests) == {"add: vectors", "add: slow_guard", "add: hidden_matrix", "counter: counts_up",
                          "counter: rejects_negative"}
    assert tests["add: hidden_matrix"]["visibility"] == "after_due_date"
    assert tests["counter: counts_up"] == {"name": "counter: counts_up", "score": 0.0, "max_score": 1.0,
                                           "status": "failed", "visibility": "visible",
                                           "output": tests["counter: counts_up"]["output"]}
    assert "step 0" in tests["counter: counts_up"]["output"]
    wrong = json.loads((out / "fake_results" / "results.json").read_text())
    hidden = next(test for test in wrong["tests"] if test["name"] == "add: hidden_matrix")
    assert hidden["output"].endswith("-- wrong values")  # no numbers from the hidden inputs


def test_allow_reference_keeps_the_reference_in_the_sandbox(tmp_path):
    path = tmp_path / "uses_reference.ipynb"
    nbformat.write(notebook(CATALOGUE["hidden_reference"][0]), str(path))
    (graded,) = grade(FIXTURE, [path], GradeOptions(allow_reference=True, progress=False))
    assert graded.score == 6


def test_hidden_tests_from_an_instructor_folder_are_added_and_graded(tmp_path):
    tests = tmp_path / "hidden"
    tests.mkdir()
    (tests / "fixture.py").write_text(
        "import torch\nfrom autograder.compare import Close\nfrom autograder.spec import Case\n"
        "CASES = {'add': [Case('secret_cube', lambda g: {'a': torch.full((2, 2, 2), 1234.5), 'b': torch.ones(2, 2, 2)},"
        " Close(1e-6, 0.0), 'a sum of two 3-d tensors', visible=True, timeout_s=2.0)]}\n")
    lab = load_hidden_tests(FIXTURE, tests)
    assert lab.exercise("add").points == 5 and not lab.exercise("add").cases[-1].visible
    path = tmp_path / "off_by_one.ipynb"
    nbformat.write(notebook(add_doing("return a + b + (a.dim() == 3)")), str(path))
    (graded,) = grade(lab, [path], GradeOptions(progress=False))
    secret = graded.results[0].cases[-1]
    assert (secret.case, secret.status, graded.score) == ("secret_cube", "fail", 6)
    assert "1234" not in secret.feedback and "1235" not in secret.feedback


def test_a_batch_in_parallel_equals_serial(tmp_path):
    """Eight submissions (each variant of add with each counter, a folder, a zip whose name collides), -j 2 and
    -j 1: the same grades in the same order."""
    variants = [ADD, add_doing("return a - b"), add_doing("return a + b + 1"), add_doing("raise ValueError('no')")]
    counters = [COUNTER, COUNTER.replace("if by < 0:", "if by < -1:")]
    paths = []
    for index in range(8):
        path = tmp_path / f"student{index:02d}.ipynb"
        nbformat.write(notebook(variants[index % 4], counters[index % 3 % 2]), str(path))
        paths.append(path)
    folder = tmp_path / "folder_student"  # a folder and a zip, with a name collision
    folder.mkdir()
    nbformat.write(notebook(), str(folder / "fixture.ipynb"))
    with zipfile.ZipFile(tmp_path / "student00.zip", "w") as zipped:
        zipped.write(paths[1], "../../evil/fixture.ipynb")
    paths[6:] = [folder, tmp_path / "student00.zip"]

    def summary(jobs: int):
        return [(g.student, g.status, [(c.case, c.points, c.status) for r in g.results for c in r.cases])
                for g in grade(FIXTURE, paths, GradeOptions(jobs=jobs, progress=False))]

    parallel = summary(2)
    assert parallel == summary(1)
    assert [row[0] for row in parallel[-2:]] == ["folder_student", "student00_2"]
    scores = [sum(points for _, points, _ in row[2]) for row in parallel]
    assert scores[:4] == [6, 1, 2, 2] and scores[-2:] == [6, 1]


def run_cli(*args: str, cwd: Path = REPO, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "autograder", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300, env=env or dict(os.environ, PYTHONPATH=str(REPO)))


def test_cli_grades_lab0_1_solutions_full_and_learner_notebooks_zero(tmp_path):
    out = tmp_path / "graded"
    result = run_cli("grade", "lab0.1", "autograder/lab0.1", "lab0.1", "--out", str(out), "-j", "2")
    assert result.returncode == 0, result.stderr
    rows = {row[0]: row for row in csv.reader((out / "grades.csv").open())}
    maximum = rows["(max points)"][-3]
    assert rows["lab0.1"][1:2] == ["ok"] and rows["lab0.1"][-3] == maximum  # the solutions
    assert rows["lab0.1_2"][-3] == "0"  # the learner notebooks
    assert "grading lab0.1" in result.stderr  # the progress bar
    feedback = (out / "lab0.1_2" / "feedback.md").read_text()
    assert all(f"{e.symbol} is not implemented yet" in feedback for e in load_lab("lab0.1").exercises)


def test_gradescope_zip_installs_and_its_run_autograder_grades_a_submission(tmp_path):
    zip_path = tmp_path / "fixture.zip"
    result = run_cli("gradescope", "fixture", "--out", str(zip_path))
    assert result.returncode == 0, result.stderr
    root = tmp_path / "autograder"
    with zipfile.ZipFile(zip_path) as zipped:
        names = set(zipped.namelist())
        assert {"setup.sh", "run_autograder", "pyproject.toml", "autograder/grade.py", "reference/llm.py"} <= names
        assert not any(name.endswith(".ipynb") for name in names)  # no solution notebooks
        assert zipped.getinfo("run_autograder").external_attr >> 16 & 0o111
        zipped.extractall(root / "source")
    setup = (root / "source" / "setup.sh").read_text()
    assert "download.pytorch.org/whl/cpu" in setup and "pip install --no-cache-dir -e /autograder/source" in setup
    assert "bubblewrap" in setup
    (root / "submission").mkdir()
    nbformat.write(notebook(counter=COUNTER.replace("self.total += by", "pass")), str(root / "submission" / "x.ipynb"))
    env = dict(os.environ, AUTOGRADER_ROOT=str(root), AUTOGRADER_PYTHON=sys.executable)
    env.pop("PYTHONPATH", None)
    run = subprocess.run(["bash", str(root / "source" / "run_autograder")], env=env, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr
    results = json.loads((root / "results" / "results.json").read_text())
    assert results["score"] == 4 and len(results["tests"]) == 5


def test_hiding_blocks_every_import_path_to_a_symbol_and_only_that_symbol():
    from autograder.hiding import HiddenImports

    guard = HiddenImports(["reference.attention.metadata.build_metadata"])
    attempts = {
        "from reference.attention import build_metadata": True,  # a re-export of the same object
        "from reference.attention.metadata import build_metadata": True,
        "import reference.attention.metadata as m\nm.build_metadata": True,
        "import reference\nreference.attention.metadata.build_metadata": True,
        "from reference.attention.metadata import *\nbuild_metadata": True,
        "from reference.attention import metadata\nmetadata.AttentionMetadata": False,
        "from reference import SamplingParams\nSamplingParams(temperature=0.0)": False,
    }
    for source, hidden in attempts.items():
        namespace = {"__builtins__": guard.builtins()}
        try:
            exec(source, namespace)
            blocked = False
        except (ImportError, NameError):
            blocked = True
        assert blocked == hidden, source
    assert set(guard.attempts) == {"reference.attention.metadata.build_metadata"}
