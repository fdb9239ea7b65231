"""The lab notebooks: solutions run top to bottom with full marks, learner notebooks stop at their first exercise
and otherwise fall back to the reference, and the learner notebooks are exactly what `release` produces.

Notebooks run in a Jupyter kernel (nbclient, kernel "python3": the environment's own ipykernel) with one torch
thread: these notebooks are dominated by small, latency-bound operations, where a second thread gains little and
costs a lot whenever anything else shares the 2-core CI machine. So two notebooks run at once, each on its own
core (`notebook_runs`): the slow tests' notebooks are a third of the suite's time.
"""

from __future__ import annotations

import re
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import nbformat
import pytest

from autograder.labs import LAB_MODULES, load_lab
from autograder.release import released_text

REPO = Path(__file__).resolve().parent.parent
LABS = [lab for lab in LAB_MODULES if lab.startswith("lab")]  # every course lab (not the grader's fixture)
SOLUTIONS = [(lab, name) for lab in LABS for name in load_lab(lab).notebooks]
CELL_TIMEOUT_S = 600  # a hang guard, not a speed requirement (the notebooks take well under 3 minutes)
NOTEBOOKS_AT_ONCE = 2  # one torch thread each, on the 2-core CI machine


def execute(path: Path, allow_errors: bool) -> tuple[nbformat.NotebookNode, Exception | None]:
    """Run a notebook in a fresh kernel from its own folder; return it with outputs, and the error that stopped it."""
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError

    notebook = nbformat.read(str(path), as_version=4)
    # The kernel's own log at ERROR: kernels started between tests write to the terminal, not into a test's captured
    # output, and ipykernel warns at every start that its local TCP sockets are unencrypted.
    client = NotebookClient(notebook, timeout=CELL_TIMEOUT_S, kernel_name="python3", allow_errors=allow_errors,
                            resources={"metadata": {"path": str(path.parent)}},
                            extra_arguments=["--IPKernelApp.log_level=ERROR"])
    try:
        client.execute()
    except CellExecutionError as error:
        return notebook, error
    return notebook, None


def solution_path(lab: str, name: str) -> Path:
    return REPO / "autograder" / load_lab(lab).folder / name


def learner_path(lab: str, name: str) -> Path:
    return REPO / load_lab(lab).folder / name


def runs_notebook(where):
    """Marks a test of (lab, name) that runs one notebook: where(lab, name) -> (path, allow_errors), for
    `notebook_runs` to start it ahead of time."""
    def mark(test):
        test.runs_notebook = where
        return test
    return mark


@pytest.fixture(scope="module")
def notebook_runs(request):
    """{(path, allow_errors): future of execute's result} for every notebook this session's selected tests run,
    started in test order, NOTEBOOKS_AT_ONCE at a time (each kernel is its own process; the threads only wait)."""
    wanted = []
    for item in request.session.items:
        where = getattr(item.function, "runs_notebook", None)
        if where is not None and hasattr(item, "callspec"):
            wanted.append(where(**item.callspec.params))
    with pytest.MonkeyPatch.context() as patch, ThreadPoolExecutor(NOTEBOOKS_AT_ONCE) as pool:
        patch.setenv("OMP_NUM_THREADS", "1")  # the kernels inherit it
        runs: dict[tuple[Path, bool], Future] = {}
        for key in wanted:
            if key not in runs:
                runs[key] = pool.submit(execute, *key)
        yield runs
        for future in runs.values():
            future.cancel()  # a run with -x stops early: do not start the rest


def notebook_run(runs: dict, path: Path, allow_errors: bool) -> tuple[nbformat.NotebookNode, Exception | None]:
    key = (path, allow_errors)
    if key not in runs:  # a test selected in a way the fixture did not see: run it here
        return execute(path, allow_errors)
    return runs[key].result()


def stdout_of(cell) -> str:
    return "".join(output.get("text", "") for output in cell.get("outputs", []) if output.output_type == "stream")


def errors_of(notebook) -> list[tuple[int, str, str]]:
    return [(index, output.ename, output.evalue) for index, cell in enumerate(notebook.cells)
            for output in cell.get("outputs", []) if output.output_type == "error"]


def exercise_cell_index(notebook, exercise_name: str) -> int:
    return next(i for i, cell in enumerate(notebook.cells) if f"exercise:{exercise_name}" in cell.metadata.get("tags", []))


@pytest.mark.parametrize("lab", LABS)
def test_learner_notebooks_are_exactly_what_release_writes(lab):
    folder = load_lab(lab).folder
    sources = sorted((REPO / "autograder" / folder).glob("*.ipynb"))
    assert [p.name for p in sources] == sorted(load_lab(lab).notebooks)
    for source in sources:
        learner = REPO / folder / source.name
        assert learner.is_file(), f"{learner} is missing: run python -m autograder release"
        assert learner.read_text(encoding="utf-8") == released_text(source), (
            f"{learner} is out of date: run python -m autograder release")


def test_learner_notebooks_have_no_outputs_and_no_solutions():
    for lab in LABS:
        for name in load_lab(lab).notebooks:
            notebook = nbformat.read(str(REPO / load_lab(lab).folder / name), as_version=4)
            for cell in notebook.cells:
                assert "BEGIN SOLUTION" not in cell.source
                if cell.cell_type == "code":
                    assert cell.outputs == [] and cell.execution_count is None


@pytest.mark.parametrize("lab, name", SOLUTIONS)
def test_notebook_makes_torch_threads_sleep_before_torch_loads(lab, name):
    """OpenMP threads that spin while waiting made every step 5-20x slower when other programs shared a 2-core
    machine (benchmarks/RESULTS.md); the first code cell must set OMP_WAIT_POLICY before anything imports torch."""
    notebook = nbformat.read(str(REPO / "autograder" / load_lab(lab).folder / name), as_version=4)
    first = next(cell.source for cell in notebook.cells if cell.cell_type == "code")
    setting = first.find('os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")')
    imports = [first.find(word) for word in ("import torch", "from torch", "from reference", "from autograder")]
    assert 0 <= setting < min(i for i in imports if i >= 0), first[:300]


@pytest.mark.slow
@pytest.mark.parametrize("lab, name", SOLUTIONS)
@runs_notebook(lambda lab, name: (solution_path(lab, name), False))
def test_solution_notebook_runs_top_to_bottom_with_full_marks(lab, name, notebook_runs):
    notebook, error = notebook_run(notebook_runs, solution_path(lab, name), False)
    assert error is None, f"{name} failed: {error}"
    for exercise in load_lab(lab).exercises_in(name):
        index = exercise_cell_index(notebook, exercise.name)
        report = stdout_of(notebook.cells[index + 1])  # the self-check cell right after the exercise
        assert f"{lab} · {exercise.name}" in report, f"no self-check after {exercise.name}"
        assert re.search(r"total: (\S+)/\1  -- full marks", report), report
    assert "REFERENCE" not in "".join(stdout_of(cell) for cell in notebook.cells), "a solution fell back"



@pytest.mark.slow
@pytest.mark.parametrize("lab, name", SOLUTIONS)
@runs_notebook(lambda lab, name: (learner_path(lab, name), True))
def test_learner_notebook_stops_at_each_exercise_and_falls_back_to_the_reference(lab, name, notebook_runs):
    """Run everything, errors allowed (one run instead of two, to keep CI short): the first error is the first
    exercise's NotImplementedError, raised after its cell, and the only errors are the cells that call an
    unwritten exercise, one per exercise; everything else runs on the reference, saying so."""
    notebook, _ = notebook_run(notebook_runs, learner_path(lab, name), True)
    exercises = [exercise.name for exercise in load_lab(lab).exercises_in(name)]
    errors = errors_of(notebook)
    assert errors, f"{name} ran to the end: its first exercise never raised"
    assert errors[0][0] > exercise_cell_index(notebook, exercises[0])
    raised = []
    for _, ename, evalue in errors_of(notebook):
        assert ename == "NotImplementedError", (ename, evalue)
        raised.append(evalue.split(":")[0])
    assert raised == exercises
    printed = "".join(stdout_of(cell) for cell in notebook.cells)
    assert "using YOUR" not in printed and "using the REFERENCE" in printed
