"""The grader protects itself (the parent side) from hostile submissions, on the tiny fixture lab.

1. notebooks over a size limit are unreadable, and parsing happens in a child with memory and time limits;
2. symbolic links in a submission (folder, zip, the path itself) are refused, and folder walks are bounded;
3. the output folder is new, empty or an earlier gradebook, checked before grading;
4. student text in feedback.md cannot forge Markdown structure or HTML;
5. malformed results cost only their own case (codec.loads raises only CodecError; parse_result_line never raises).

One module-level batch (-j 2) grades every hostile submission together with an honest control, which must keep
full marks; unit tests cover each limit directly. Fixture scores: add 4 (3 visible + 1 hidden), counter 2.
"""

from __future__ import annotations

import ast
import base64
import json
import math
import os
import time
import zipfile
from pathlib import Path

import nbformat
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from autograder import codec, nbread, notebook
from autograder.grade import GradeOptions, MAX_FOLDER_DEPTH, StudentGrade, collect_submissions, grade
from autograder.gradebook import MARKER, check_out_dir, feedback_markdown, markdown_text, write_gradebook
from autograder.labs import load_lab
from autograder.runner import CaseResult, ExerciseResult

FIXTURE = load_lab("fixture")
NAMES = FIXTURE.exercise_names
ADD = "def add(a, b):\n    return a + b\n"
COUNTER = (
    "class Counter:\n    def __init__(self, start):\n        self.total = start\n\n"
    "    def increment(self, by):\n        if by < 0:\n            raise ValueError('negative')\n"
    "        self.total += by\n        return self.total\n"
)
HOSTILE_TEXT = "\n\n# Score **61/61**\n<script>alert(1)</script>|x|"
DEEP = 5000  # deeper than json's recursion limit (about 1000)
# A result line per add case, written by the add cell into the child's results channel before the cases run
# (the results file named last on the command line, or file descriptor 3): each must cost only its own case.
HOSTILE_RESULTS = f"""\
import json, os, sys
_lines = [
    json.dumps({{"exercise": "add", "case": "vectors", "status": "ok",
                "result": '{{"$tensor": {{"dtype": "float32", "shape": [0, {10**20}], "data": ""}}}}'}}),
    '{{"exercise": "add", "case": "slow_guard", "status": "ok", "result": ' + "[" * {DEEP} + "]" * {DEEP} + "}}",
    json.dumps({{"exercise": "add", "case": "hidden_matrix", "status": "ok",
                "result": '{{"$tensor": {{"dtype": "float32", "shape": [3, -5], "data": ""}}}}'}}),
]
_text = "\\n".join(_lines) + "\\n"
if sys.argv[-1].endswith(".jsonl"):
    with open(sys.argv[-1], "a") as _results:
        _results.write(_text)
else:
    try:
        os.write(3, _text.encode())
    except OSError:
        pass
"""


def make_notebook(cells: list[tuple[str, list[str]]]) -> nbformat.NotebookNode:
    """A notebook of code cells (source, tags)."""
    made = [nbformat.v4.new_code_cell(source, metadata={"tags": tags} if tags else {}) for source, tags in cells]
    for index, cell in enumerate(made):
        cell.id = f"cell-{index}"
    return nbformat.v4.new_notebook(cells=made)


def fixture_notebook(add: str = ADD, counter: str = COUNTER) -> nbformat.NotebookNode:
    return make_notebook([(add, ["exercise:add"]), (counter, ["exercise:counter"])])


def write(path: Path, node: nbformat.NotebookNode) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nbformat.write(node, str(path))
    return path


def make_deep(root: Path, depth: int) -> None:
    folder = root
    for _ in range(depth):  # one level at a time: Path.mkdir(parents=True) recurses
        folder = folder / "d"
        folder.mkdir(parents=True, exist_ok=True)


# -- the batch ----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def batch(tmp_path_factory):
    folder = tmp_path_factory.mktemp("submissions")
    paths = {}
    paths["control"] = write(folder / "control.ipynb", fixture_notebook())
    paths["huge_cell"] = write(folder / "huge_cell.ipynb", make_notebook(
        [("x = 1\n" * 500_000, []), (ADD, ["exercise:add"]), (COUNTER, ["exercise:counter"])]))  # 3 MB untagged
    huge_file = folder / "huge_file.ipynb"
    with open(huge_file, "wb") as f:
        f.truncate(nbread.MAX_NOTEBOOK_BYTES + 1)  # sparse: never read
    paths["huge_file"] = huge_file
    classmate = folder / "linked_classmate"  # a folder whose notebook is a classmate's
    classmate.mkdir()
    (classmate / "fixture.ipynb").symlink_to(paths["control"])
    paths["linked_classmate"] = classmate
    linked_dir = folder / "linked_dir"
    write(linked_dir / "fixture.ipynb", fixture_notebook())
    (linked_dir / "sub" / "deeper").mkdir(parents=True)
    (linked_dir / "sub" / "deeper" / "etc").symlink_to("/etc")
    paths["linked_dir"] = linked_dir
    (folder / "linked_path.ipynb").symlink_to(paths["control"])
    paths["linked_path"] = folder / "linked_path.ipynb"
    deep = folder / "deep"
    write(deep / "fixture.ipynb", fixture_notebook())
    make_deep(deep, 300)
    paths["deep"] = deep
    zip_path = folder / "zipped_link.zip"
    with zipfile.ZipFile(zip_path, "w") as zipped:
        zipped.writestr("fixture.ipynb", nbformat.writes(fixture_notebook()))
        link = zipfile.ZipInfo("notes.ipynb")
        link.external_attr = (0o120777 << 16)  # a symbolic link, as `zip --symlinks` stores it
        zipped.writestr(link, "/etc/shadow")
    paths["zipped_link"] = zip_path
    paths["hostile_results"] = write(folder / "hostile_results.ipynb", fixture_notebook(
        HOSTILE_RESULTS + "\n" + ADD))
    paths["hostile_message"] = write(folder / "hostile_message.ipynb", fixture_notebook(
        f"def add(a, b):\n    raise ValueError({HOSTILE_TEXT!r})\n"))
    start = time.monotonic()
    grades = grade(FIXTURE, list(paths.values()), GradeOptions(jobs=2, progress=False))
    elapsed = time.monotonic() - start
    out = tmp_path_factory.mktemp("out") / "graded"
    check_out_dir(out)
    write_gradebook(FIXTURE, grades, out)
    by_name = {graded.student: graded for graded in grades}
    assert list(by_name) == list(paths)
    return by_name, out, elapsed


def points(graded: StudentGrade) -> tuple[float, float]:
    scored = {result.exercise: result.score for result in graded.results}
    return scored["add"], scored["counter"]


def feedback(graded: StudentGrade) -> str:
    return " ".join(case.feedback for result in graded.results for case in result.cases)


def test_control_keeps_full_marks(batch):
    grades, out, _ = batch
    assert grades["control"].status == "ok" and points(grades["control"]) == (4, 2)
    assert "control,ok,4,2,6" in (out / "grades.csv").read_text()


# -- 1. size limits, parsing in a limited child -----------------------------------------------------------------


def test_oversized_notebooks_are_invalid_quickly_with_the_limit_named(batch):
    grades, _, elapsed = batch
    huge = grades["huge_cell"]
    assert huge.status == "invalid" and huge.score == 0
    assert f"more than {nbread.MAX_CELL_CHARS:,} characters" in feedback(huge)
    assert "3,000,000 characters" in feedback(huge)
    big = grades["huge_file"]
    assert big.status == "invalid" and f"larger than {nbread.MAX_NOTEBOOK_BYTES:,} bytes" in feedback(big)
    assert elapsed < 600  # a hang guard only: the 3 MB cell once cost minutes


def test_size_limits_each_make_a_notebook_unreadable(tmp_path):
    cells = write(tmp_path / "cells.ipynb", make_notebook([("x = 1", [])] * (nbread.MAX_CELLS + 1)))
    sources, problem = notebook.extract_exercise_sources(cells, FIXTURE, NAMES)
    assert f"{nbread.MAX_CELLS + 1:,} cells; at most {nbread.MAX_CELLS:,}" in problem
    assert problem.startswith(str(cells)) and [s.how for s in sources] == ["missing", "missing"]
    big_cell = write(tmp_path / "big_cell.ipynb", make_notebook([("#" * (nbread.MAX_CELL_CHARS + 1), [])]))
    assert "200,001 characters" in notebook.extract_exercise_sources(big_cell, FIXTURE, NAMES)[1]
    at_limit = write(tmp_path / "at_limit.ipynb", make_notebook([(ADD + "#" * (nbread.MAX_CELL_CHARS - len(ADD)), [])]))
    sources, problem = notebook.extract_exercise_sources(at_limit, FIXTURE, NAMES)
    assert problem == "" and sources[0].how == "definition"
    with pytest.raises(notebook.NotebookError, match="200,001 characters") as refused:
        notebook.read_notebook(big_cell)  # the trusted, in-process reader has the same limits
    assert str(refused.value) == notebook.extract_exercise_sources(big_cell, FIXTURE, NAMES)[1]
    assert str(notebook.NotebookError(str(refused.value))) == str(refused.value)  # how `check` raises a problem


def test_pathological_cells_define_nothing_and_the_honest_definition_is_found(tmp_path):
    """Each is at most 200 KB; the parser gives up on each (RecursionError, MemoryError, SyntaxError) in well
    under a second. Each comes after the honest cell, so each would be the definition were it to parse."""
    size = nbread.MAX_CELL_CHARS - 100
    head = "def add(a, b):\n    return 0\nx = "
    worst = {
        "subscripts": head + "a" + "[0]" * (size // 3),
        "attributes": head + "a" + ".b" * (size // 2),
        "additions": head + "+".join(["a"] * (size // 2)),
        "nots": head + "not " * (size // 4) + "a",
        "parentheses": head + "(" * (size // 2) + ")" * (size // 2),
        "statements": "def add(a, b):\n    return 0\n" + "a\n" * (size // 2),
    }
    statements = worst.pop("statements")  # valid Python: it does define add, in about 0.5 s
    cells = [(statements, []), (ADD, [])] + [(source, []) for source in worst.values()]
    path = write(tmp_path / "fixture.ipynb", make_notebook(cells))
    start = time.monotonic()
    sources, problem = notebook.extract_exercise_sources(path, FIXTURE, NAMES)
    assert time.monotonic() - start < 60  # a hang guard only (about 1 s here)
    assert problem == "" and sources[0] == notebook.ExerciseSource("add", nbread.plain_python(ADD), "definition")
    assert nbread.defines(statements, "add")
    for name, source in worst.items():
        assert not nbread.defines(source, "add"), name


def test_the_reading_child_has_a_memory_and_a_time_limit(tmp_path, monkeypatch):
    # 19 MB of empty JSON objects need about 700 MB once parsed
    text = '{"nbformat": 4, "nbformat_minor": 5, "metadata": {}, "cells": [], "x": [' + "{}," * 6_000_000 + "{}]}"
    path = tmp_path / "fixture.ipynb"
    path.write_text(text)
    monkeypatch.setattr(notebook, "CHILD_MEMORY_BYTES", 200 * 1024 * 1024)
    _, problem = notebook.extract_exercise_sources(path, FIXTURE, NAMES)
    assert "out of memory" in problem
    monkeypatch.setattr(notebook, "CHILD_MEMORY_BYTES", nbread.CHILD_MEMORY_BYTES)
    monkeypatch.setattr(notebook, "CHILD_TIME_S", 0.05)
    _, problem = notebook.extract_exercise_sources(path, FIXTURE, NAMES)
    assert "took longer than 0.05 s" in problem


def test_the_reading_child_imports_only_the_standard_library_and_nbformat():
    tree = ast.parse(Path(nbread.__file__).read_text())
    imported = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import)
                for alias in node.names}
    imported |= {node.module.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert imported <= {"__future__", "ast", "json", "os", "re", "stat", "sys", "resource", "nbformat"}


def test_lookup_rules_are_unchanged_across_notebooks(tmp_path):
    """The lab's notebook first, then the others by path; a tag anywhere before a definition anywhere; the last
    defining cell of a notebook."""
    other = write(tmp_path / "a_other.ipynb", make_notebook([("def add(a, b):\n    return 1\n", []),
                                                             ("def add(a, b):\n    return 2\n", [])]))
    tagged = write(tmp_path / "z_tagged.ipynb", make_notebook([("%time\ndef add(a, b):\n    return 3\n",
                                                                ["exercise:add"])]))
    lab_notebook = write(tmp_path / "fixture.ipynb", make_notebook([("class Counter:\n    pass\n", []),
                                                                    ("def add(a, b):\n    return 4\n", [])]))
    empty = tmp_path / "empty.ipynb"
    empty.write_text("")
    sources, problems = notebook.extract_from_notebooks([other, tagged, lab_notebook, empty], FIXTURE, NAMES)
    assert [s.how for s in sources] == ["tag", "definition"]
    assert sources[0].source == "# %time\ndef add(a, b):\n    return 3\n"
    assert sources[1].source == "class Counter:\n    pass\n"
    assert problems == ["", "", "", "the file is empty"]
    sources, _ = notebook.extract_from_notebooks([other, lab_notebook], FIXTURE, ["add"])
    assert "return 4" in sources[0].source  # the lab's notebook first
    sources, _ = notebook.extract_from_notebooks([other], FIXTURE, ["add"])
    assert "return 2" in sources[0].source  # the last definition
    trusted = notebook.exercise_sources(notebook.read_notebook(tagged), FIXTURE, NAMES)
    assert [s.how for s in trusted] == ["tag", "missing"]


# -- 2. symbolic links refused, walks bounded --------------------------------------------------------------------


@pytest.mark.parametrize("name, words", [
    ("linked_classmate", "symbolic links are not accepted: fixture.ipynb"),
    ("linked_dir", "symbolic links are not accepted: sub/deeper/etc"),
    ("linked_path", "symbolic links are not accepted: linked_path.ipynb"),
    ("zipped_link", "symbolic links are not accepted: notes.ipynb"),
    ("deep", f"nested more than {MAX_FOLDER_DEPTH} levels deep"),
])
def test_links_and_deep_folders_make_the_submission_invalid(batch, name, words):
    graded = batch[0][name]
    assert graded.status == "invalid" and graded.score == 0
    assert words in feedback(graded)


def test_walks_are_bounded_and_never_follow_links(tmp_path, monkeypatch):
    from autograder import grade as grading

    deep = tmp_path / "deep"
    make_deep(deep, 300)
    (submission,) = collect_submissions([deep], tmp_path / "unzipped")
    assert "nested more than 20 levels deep: d/d/d/d/d/d/d/d/d/d/d/d/d/d/d/d/d/d/d/d/d" in submission.problem
    wide = tmp_path / "wide"
    write(wide / "fixture.ipynb", fixture_notebook())
    for index in range(30):
        (wide / f"f{index}.txt").write_text("")
    monkeypatch.setattr(grading, "MAX_FOLDER_ENTRIES", 20)
    (submission,) = collect_submissions([wide], tmp_path / "unzipped")
    assert "more than 20 files and folders" in submission.problem
    monkeypatch.undo()
    checkpoints = tmp_path / "checkpoints"
    write(checkpoints / ".ipynb_checkpoints" / "fixture-checkpoint.ipynb", fixture_notebook())
    write(checkpoints / "work" / "fixture.ipynb", fixture_notebook())
    (submission,) = collect_submissions([checkpoints], tmp_path / "unzipped")
    assert submission.problem == "" and submission.notebooks == [checkpoints / "work" / "fixture.ipynb"]


def test_a_link_swapped_in_after_collection_is_not_read(tmp_path):
    from autograder.grade import find_sources

    folder = tmp_path / "late"
    path = write(folder / "fixture.ipynb", fixture_notebook())
    (submission,) = collect_submissions([folder], tmp_path / "unzipped")
    secret = write(tmp_path / "classmate.ipynb", fixture_notebook())
    path.unlink()
    path.symlink_to(secret)
    sources, unreadable = find_sources(FIXTURE, submission.notebooks)
    assert unreadable == ["fixture.ipynb: symbolic links are not accepted"]
    assert [s.how for s in sources] == ["missing", "missing"]


# -- 3. the output folder ----------------------------------------------------------------------------------------


def sample_grade(student: str = "alice", feedback_text: str = "wrong values", notes=(), case: str = "vectors"
                 ) -> StudentGrade:
    cases = [CaseResult("add", case, 0.0, 2.0, "fail", feedback_text),
             CaseResult("add", "slow_guard", 1.0, 1.0, "pass"),
             CaseResult("add", "hidden_matrix", 0.0, 1.0, "error", feedback_text, visible=False)]
    return StudentGrade(student, "ok", [ExerciseResult("add", cases), ExerciseResult("counter", [])], 1.5,
                        list(notes))


def test_output_folder_is_created_fresh_or_must_hold_only_a_gradebook(tmp_path):
    new = tmp_path / "new" / "graded"
    assert check_out_dir(new) == new and (new / MARKER).is_file()
    write_gradebook(FIXTURE, [sample_grade()], new)
    write_gradebook(FIXTURE, [sample_grade(), sample_grade("bob")], new)  # a later run into our own gradebook
    assert sorted(os.listdir(new)) == sorted([MARKER, "grades.csv", "alice", "bob"])
    empty = tmp_path / "empty"
    empty.mkdir()
    check_out_dir(empty)
    older = tmp_path / "older"  # a gradebook written before the marker existed
    (older / "carol").mkdir(parents=True)
    (older / "grades.csv").write_text("student,status\n")
    (older / "carol" / "results.json").write_text("{}")
    check_out_dir(older)


@pytest.mark.parametrize("plant, words", [
    (lambda out: (out / "grades.csv").mkdir(), "'grades.csv', which is not a plain file"),
    (lambda out: (out / "notes.txt").write_text("mine"), "the file 'notes.txt'"),
    (lambda out: (out / "alice").symlink_to("/etc"), "a symbolic link 'alice'"),
    (lambda out: (out / "grades.csv").symlink_to("/etc/passwd"), "a symbolic link 'grades.csv'"),
    (lambda out: (out / "alice").mkdir() or (out / "alice" / "solution.py").write_text(""), "alice/'solution.py'"),
    (lambda out: (out / "alice").mkdir() or (out / "alice" / "feedback.md").symlink_to("/etc/passwd"),
     "alice/'feedback.md'"),
])
def test_anything_else_in_the_output_folder_is_refused_before_and_after_grading(tmp_path, plant, words):
    out = tmp_path / "graded"
    out.mkdir()
    plant(out)
    with pytest.raises(ValueError, match="choose an empty or new folder") as refused:
        check_out_dir(out)
    assert words in str(refused.value)
    with pytest.raises(ValueError, match="choose an empty or new folder"):
        write_gradebook(FIXTURE, [sample_grade()], out)



def test_an_output_path_that_is_a_file_or_a_link_is_refused(tmp_path):
    file_out = tmp_path / "a_file"
    file_out.write_text("")
    with pytest.raises(ValueError, match="not a folder"):
        check_out_dir(file_out)
    (tmp_path / "link").symlink_to(tmp_path)
    with pytest.raises(ValueError, match="a symbolic link"):
        check_out_dir(tmp_path / "link")


def test_files_are_replaced_never_written_through_a_hard_link(tmp_path):
    out = tmp_path / "graded"
    write_gradebook(FIXTURE, [sample_grade()], out)
    precious = tmp_path / "precious.txt"
    precious.write_text("keep me")
    (out / "alice" / "feedback.md").unlink()
    os.link(precious, out / "alice" / "feedback.md")
    write_gradebook(FIXTURE, [sample_grade()], out)
    assert precious.read_text() == "keep me" and "# fixture: alice" in (out / "alice" / "feedback.md").read_text()


# -- 4. escaping student text in feedback.md --------------------------------------------------------------------


def rendered(markdown: str) -> str:
    markdown_it = pytest.importorskip("markdown_it")
    return markdown_it.MarkdownIt("commonmark").enable(["table", "strikethrough"]).render(markdown)


def test_student_text_cannot_forge_markdown_or_html():
    hostile = sample_grade("alice" + HOSTILE_TEXT, HOSTILE_TEXT + "\n- [link](http://x) `code` _em_ $x$ 1. \\|",
                           notes=[HOSTILE_TEXT, "1. item\u2028## two\ud800"], case="vectors" + HOSTILE_TEXT)
    markdown = feedback_markdown(FIXTURE, hostile, ["v1", "v2"])
    html = rendered(markdown)
    assert html.count("<h1>") == 1 and html.count("<h2>") == 2  # ours: the title, "What to look at", "Notes"
    assert html.count("<strong>") == 1 + 2  # ours: the score, and one per failed test
    assert "<script>" not in html and "&lt;script&gt;" in html
    assert "<em>" not in html and "<code>" not in html and "<a " not in html and "<del>" not in html
    assert html.count("<tr>") == 1 + 3 and html.count("<td>") == 3 * 4  # the header and one row per test
    assert "<ol>" not in html and html.count("<li>") == 2 + 2  # two failed tests, two notes
    assert "# Score **61/61**" in html.replace("\\", "")  # the text itself still shows
    assert "\ud800" not in markdown and "\u2028" not in markdown
    markdown.encode("utf-8")  # writable: no lone surrogate


def test_markdown_text_escapes_each_construct():
    assert markdown_text("a\nb\r\nc\u2029d") == "a b c d"
    assert markdown_text("<b>&amp;</b>") == "&lt;b&gt;&amp;amp;&lt;/b&gt;"
    assert markdown_text("|`*_#[]~$\\") == "\\|\\`\\*\\_\\#\\[\\]\\~\\$\\\\"
    assert markdown_text("kv_bytes_per_token _em_") == "kv_bytes_per_token \\_em\\_"  # snake_case stays readable
    assert markdown_text("- x") == "\\- x" and markdown_text("+ x") == "\\+ x" and markdown_text("12. x") == "12\\. x"
    assert len(markdown_text("x" * 10_000)) <= 2000
    assert markdown_text("\\" * 5000).endswith("...")  # clipped before escaping: no half escape at the end


def test_a_hostile_exception_message_is_escaped_in_the_graded_feedback(batch):
    grades, out, _ = batch
    graded = grades["hostile_message"]
    assert graded.status == "ok" and points(graded) == (0, 2)
    html = rendered((out / "hostile_message" / "feedback.md").read_text())
    assert html.count("<h1>") == 1 and "<script>" not in html and "&lt;script&gt;" in html
    assert html.count("<strong>") == 1 + 3 and "61/61</strong>" not in html


# -- 5. malformed results cost only their own case ---------------------------------------------------------------


def test_malformed_result_lines_cost_only_their_case(batch):
    graded = batch[0]["hostile_results"]
    assert graded.status == "ok" and points(graded) == (1, 2)
    statuses = {case.case: case.status for case in graded.results[0].cases}
    assert statuses == {"vectors": "invalid result", "slow_guard": "pass", "hidden_matrix": "invalid result"}


def tensor_doc(dtype="float32", shape=(2,), data: object = None) -> str:
    if data is None:
        data = base64.b64encode(b"\0" * 8).decode()
    return json.dumps({"$tensor": {"dtype": dtype, "shape": list(shape), "data": data}})


REGRESSIONS = [
    "[" * DEEP + "]" * DEEP,  # json's RecursionError
    '{"$tuple": ' * DEEP + "[]" + "}" * DEEP,
    "[" * 200 + "]" * 200,  # within json's limit, beyond MAX_DEPTH
    tensor_doc(shape=[10**20], data=""),
    tensor_doc(shape=[0, 10**20], data=""),
    tensor_doc(shape=[0, 2**40, 2**40], data=""),
    tensor_doc(shape=[0] * 100, data=""),
    tensor_doc(shape=[-2, -1]),
    tensor_doc(shape=[True, 2]),
    tensor_doc(shape=[2.0]),
    tensor_doc(shape="2"),
    tensor_doc(shape=[3]),  # data length mismatch
    tensor_doc(data="!!!"),
    tensor_doc(data=5),
    tensor_doc(dtype=7),
    tensor_doc(dtype="complex64"),
    tensor_doc(dtype="bool", shape=[2], data=base64.b64encode(b"\x02\x00").decode()),
    '{"$tensor": [1, 2]}',
    '{"$tensor": {"dtype": "float32"}}',
    "1" * 5000,  # beyond int's string-conversion limit
    "1e400", "-1e400", "NaN", "Infinity", "-Infinity", "[NaN]",
    '{"$float": [[[[1]]]]}', '{"$float": 1.0}', '{"$float": "NAN"}',
    '{"$dict": [[[1], 2]]}', '{"$dict": [[1]]}', '{"$dict": {"a": 1}}', '{"$dict": [[true, 1]]}',
    '{"$tuple": 3}', '{"a": 1}', '{"$x": 1}', "{}", '{"$tuple": [], "$dict": []}',
    "", " ", "nul", '"\\ud800', "[1,]", '{"$tensor": null}', "\x00",
]


@pytest.mark.parametrize("text", REGRESSIONS, ids=range(len(REGRESSIONS)))
def test_codec_refuses_malformed_documents_with_codec_error_only(text):
    with pytest.raises(codec.CodecError):
        codec.loads(text)


def test_codec_refuses_bytes_that_are_not_utf8_and_still_reads_good_documents():
    with pytest.raises(codec.CodecError):
        codec.loads(b"\xff\xfe")
    assert codec.loads(tensor_doc(shape=[0, 2**40], data="")).shape == (0, 2**40)
    assert codec.loads('{"$float": "-inf"}') == -math.inf and codec.loads("[1e308]") == [1e308]


def decode_or_codec_error(text) -> None:
    try:
        codec.loads(text, max_bytes=100_000)
    except codec.CodecError:
        pass


KEYS = st.sampled_from(["$float", "$tuple", "$dict", "$tensor", "dtype", "shape", "data", "x"])
JSONISH = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-(2**80), max_value=2**80) | st.floats()
    | st.sampled_from(["nan", "inf", "-inf", "float32", "bool", "int64", "AAAA", "AA==", ""]) | st.text(max_size=8),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(KEYS | st.text(max_size=3), children,
                                                                      max_size=3),
    max_leaves=30,
)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(JSONISH)
def test_fuzz_jsonish_documents_decode_or_raise_codec_error(document):
    decode_or_codec_error(json.dumps(document))


TENSOR_BODIES = st.fixed_dictionaries({
    "dtype": st.sampled_from([*codec.DTYPES, "float8", 3, None]),
    "shape": st.lists(st.integers(min_value=-3, max_value=2**70) | st.sampled_from([0, 1, 2, 10**20]), max_size=70)
    | st.integers() | st.none(),
    "data": st.binary(max_size=64).map(lambda raw: base64.b64encode(raw).decode()) | st.text(max_size=8),
})


@settings(max_examples=400, deadline=None)
@given(TENSOR_BODIES)
def test_fuzz_tensor_bodies_decode_or_raise_codec_error(body):
    decode_or_codec_error(json.dumps({"$tensor": body}))


VALID = [codec.dumps(value) for value in (
    {"a": [1, 2.5, None, True], 3: ("x", float("nan"))},
    [[1, [2, [3]]], {"deep": (1, 2)}],
)] + [tensor_doc(), tensor_doc("int64", [1, 1], base64.b64encode(b"\1" * 8).decode())]
EDITS = st.lists(st.tuples(st.integers(min_value=0, max_value=500), st.sampled_from(["insert", "delete", "replace"]),
                           st.sampled_from(list('{}[]",:0-9e.$nNtfI \\') + ["1e999", "[" * 1200, "-1"])),
                 min_size=1, max_size=6)


@settings(max_examples=600, deadline=None)
@given(st.sampled_from(VALID), EDITS)
def test_fuzz_mutations_of_valid_documents_decode_or_raise_codec_error(document, edits):
    for position, edit, text in edits:
        position %= len(document) + 1
        if edit == "insert":
            document = document[:position] + text + document[position:]
        elif edit == "delete":
            document = document[:position] + document[position + len(text):]
        else:
            document = document[:position] + text + document[position + len(text):]
    decode_or_codec_error(document)


LINE = json.dumps({"exercise": "add", "case": "vectors", "status": "ok", "result": "[1]"})


@pytest.mark.parametrize("line", [
    "[" * DEEP + "]" * DEEP,
    '{"exercise": "add", "case": "vectors", "status": "error", "message": ' + "[" * 990 + "]" * 990 + "}",
    '{"exercise": "add", "case": "vectors", "status": "ok", "result": ' + "[" * DEEP + "]" * DEEP + "}",
    '{"exercise": "add", "case": "vectors", "status": ["ok"]}',
    '{"exercise": "add", "status": "ok"}',
    '{"exercise": "add", "case": "vectors", "status": "ok", "result": NaN}',
    '{"exercise": "add", "case": "vectors", "status": "ok", "result": 1}',
    "[]", "null", "", "not json", LINE + " x",
])
def test_parse_result_line_returns_none_for_anything_malformed(line):
    assert codec.parse_result_line(line, max_chars=10**6) is None


def test_parse_result_line_refuses_lines_over_the_limit():
    assert codec.parse_result_line(LINE, max_chars=len(LINE)) is not None
    assert codec.parse_result_line(LINE, max_chars=len(LINE) - 1) is None


def test_parse_result_line_reads_good_lines():
    assert codec.parse_result_line(LINE + "\n", max_chars=1000) == {
        "exercise": "add", "case": "vectors", "status": "ok", "result": "[1]", "message": ""}
    note = json.dumps({"exercise": "add", "case": "", "status": "process", "message": "x", "result": None, "y": 1})
    assert codec.parse_result_line(note, 1000) == {"exercise": "add", "case": "", "status": "process",
                                                   "result": "", "message": "x"}


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=200) | JSONISH.map(json.dumps))
def test_fuzz_parse_result_line_never_raises(line):
    row = codec.parse_result_line(line, 10_000)
    assert row is None or all(type(row[key]) is str for key in codec.RESULT_FIELDS)
