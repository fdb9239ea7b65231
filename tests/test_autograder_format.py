"""The autograder's shared format: codec, comparisons, runner, release and `python -m autograder check`.

Fast tests use the tiny `fixture` lab; the lab 0.1 tests check that each exercise's cases tell right from
wrong, and that the command-line check scores the solution notebooks, the learner notebooks and a notebook with
one wrong exercise as it should.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest
import torch

from autograder import check, codec, pick
from autograder.compare import Close, Exact, Trace
from autograder.isolate import run_notebook
from autograder.labs import load_lab
from autograder.release import BEGIN, END, ReleaseError, release_notebook, strip_solution
from autograder.runner import run_in_process

REPO = Path(__file__).resolve().parent.parent
SOLUTIONS = REPO / "autograder" / "lab0.1"
LEARNER = REPO / "lab0.1"
FIXTURE = load_lab("fixture")
LAB = load_lab("lab0.1")


# -- codec ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", list(codec.DTYPES.values()))
def test_codec_round_trips_tensors_of_every_dtype_bit_for_bit(dtype):
    source = (torch.randn(3, 4) * 50).to(dtype)
    for tensor in (source, source.t(), source[1], source.reshape(-1)[0], source[:0]):  # views, 0-d, empty
        back = codec.loads(codec.dumps(tensor))
        assert back.dtype == tensor.dtype and back.shape == tensor.shape
        assert torch.equal(back.view(-1).view(torch.uint8) if back.numel() else back,
                           tensor.contiguous().view(-1).view(torch.uint8) if tensor.numel() else tensor)


def test_codec_round_trips_numbers_and_nested_structures():
    value = {"ints": [0, -1, 2**70], "floats": (1.5, -0.0, math.inf, -math.inf), "none": None, "flag": True,
             "text": "déjà 🙂", 7: [[1, [2, (3,)]], {"deep": torch.arange(3)}]}
    back = codec.roundtrip(value)
    assert back["ints"] == [0, -1, 2**70] and back["floats"][:2] == (1.5, -0.0)
    assert back["floats"][2:] == (math.inf, -math.inf) and isinstance(back["floats"], tuple)
    assert back["none"] is None and back["flag"] is True and back["text"] == "déjà 🙂"
    assert back[7][0] == [1, [2, (3,)]] and torch.equal(back[7][1]["deep"], torch.arange(3))
    assert math.isnan(codec.roundtrip(math.nan))
    assert list(codec.roundtrip({"b": 1, "a": 2})) == ["b", "a"]  # order is kept: drivers rely on it


class LyingInt(int):
    def __eq__(self, other):
        return True


class TensorSubclass(torch.Tensor):
    pass


@pytest.mark.parametrize("value", [
    LyingInt(3), [1, LyingInt(2)], {1, 2}, b"bytes", object(), 1 + 2j, torch.zeros(2, dtype=torch.complex64),
    torch.zeros(2).as_subclass(TensorSubclass), {(1, 2): 3}, lambda: 1, type("Eq", (), {"__eq__": lambda s, o: True})(),
])
def test_codec_refuses_anything_that_is_not_plain_data(value):
    with pytest.raises(codec.CodecError):
        codec.dumps(value)


def test_codec_refuses_deep_nesting():
    deep: list = []
    for _ in range(codec.MAX_DEPTH + 5):
        deep = [deep]
    with pytest.raises(codec.CodecError):
        codec.dumps(deep)


@pytest.mark.parametrize("document", [
    "", "NaN", "[1, Infinity]", '{"a": 1}', '{"$pickle": "gASV"}', '{"$float": "1e999"}', '{"$dict": [[[1], 2]]}',
    '{"$tensor": {"dtype": "__import__(\'os\')", "shape": [1], "data": ""}}',
    '{"$tensor": {"dtype": "float32", "shape": [2], "data": "AAAA"}}',  # 3 bytes for 8
    '{"$tensor": {"dtype": "float32", "shape": [1], "data": "not base64!"}}',
    '{"$tensor": {"dtype": "float32", "shape": [-1], "data": ""}}',
    '{"$tuple": [1], "$dict": []}', "[" * 10000 + "]" * 10000,
])
def test_decoder_rejects_malformed_documents_without_running_anything(document):
    with pytest.raises(codec.CodecError):
        codec.loads(document)


def test_decoder_enforces_a_size_limit():
    with pytest.raises(codec.CodecError):
        codec.loads(codec.dumps(list(range(1000))), max_bytes=100)


# -- comparisons ----------------------------------------------------------------------------------------------


def test_close_uses_the_written_tolerance_and_reports_the_worst_entry():
    expected = torch.tensor([1.0, 2.0, 3.0])
    assert Close(atol=0.1).compare(expected + 0.05, expected).passed
    outcome = Close(atol=0.1).compare(torch.tensor([1.0, 2.5, 3.0]), expected)
    assert not outcome.passed and outcome.kind == "wrong values" and "index [1]" in outcome.detail
    assert Close(atol=0.0, rtol=0.1).compare(expected * 1.05, expected).passed
    assert Close(1e-6).compare(torch.tensor([math.nan]), torch.tensor([math.nan])).passed
    assert not Close(1e-6).compare(torch.tensor([1.0]), torch.tensor([math.nan])).passed


def test_comparisons_check_structure_shape_and_dtype():
    expected = torch.zeros(2, 3)
    assert Close(1.0).compare(torch.zeros(3, 2), expected).kind == "wrong shape"
    assert Close(1.0).compare(torch.zeros(2, 3, dtype=torch.float64), expected).kind == "wrong dtype"
    assert Close(1.0).compare([[0.0] * 3] * 2, expected).kind == "wrong type"
    assert Exact().compare((1, 2), [1, 2]).passed  # a tuple and a list are both sequences
    assert Exact().compare(3.0, 3).kind == "wrong type"  # an int was asked for
    assert Exact().compare({"a": 1}, {"b": 1}).kind == "wrong keys"


def test_trace_reports_the_first_differing_step_and_matches_errors_by_type():
    trace = Trace(Exact(), ("first", "second", "third"))
    expected = [1, {"error": "ValueError: anything"}, 3]
    assert trace.compare([1, {"error": "ValueError: other words"}, 3], expected).passed
    outcome = trace.compare([1, {"error": "TypeError: x"}, 3], expected)
    assert not outcome.passed and outcome.detail.startswith("second")
    assert trace.compare([1, {"error": "ValueError"}, 4], expected).detail.startswith("third")
    assert trace.compare([1], expected).kind == "trace too short"


# -- the runner on the fixture lab ----------------------------------------------------------------------------


def scores(result) -> dict[str, str]:
    return {case.case: case.status for case in result.cases}


def test_learner_errors_are_reported_never_raised():
    def broken(a, b):
        raise KeyError("oops")

    def not_written(a, b):
        raise NotImplementedError("add: not implemented yet")

    def exits(a, b):
        raise SystemExit(3)

    for function, status in ((broken, "error"), (not_written, "not implemented"), (exits, "error")):
        result = run_in_process(FIXTURE, FIXTURE.exercise("add"), function)
        assert set(scores(result).values()) == {status} and result.score == 0
    assert "KeyError: 'oops'" in run_in_process(FIXTURE, FIXTURE.exercise("add"), broken).cases[0].feedback


def test_results_that_are_not_plain_data_are_refused_and_never_compared():
    class AlwaysEqual:
        def __eq__(self, other):
            raise AssertionError("the grader must never call a learner object's __eq__")

    result = run_in_process(FIXTURE, FIXTURE.exercise("add"), lambda a, b: AlwaysEqual())
    assert set(scores(result).values()) == {"invalid result"}
    assert "return only None, bool, int" in result.cases[0].feedback
    subclass = run_in_process(FIXTURE, FIXTURE.exercise("add"), lambda a, b: (a + b).as_subclass(TensorSubclass))
    assert set(scores(subclass).values()) == {"invalid result"}


def test_inputs_are_fresh_copies_so_mutating_them_does_not_leak():
    def mutating_add(a, b):
        out = a + b
        a.zero_()
        return out

    assert run_in_process(FIXTURE, FIXTURE.exercise("add"), mutating_add, include_hidden=True).full_marks


def test_a_hanging_case_times_out_in_process():
    def hang(a, b):
        while True:
            pass

    result = run_in_process(FIXTURE, FIXTURE.exercise("add"), hang)
    assert set(scores(result).values()) == {"timeout"}


def test_stateful_exercise_is_judged_on_its_trace():
    class NoValidation(load_lab("fixture").exercise("counter").reference):
        def increment(self, by):
            self.total += by
            return self.total

    result = run_in_process(FIXTURE, FIXTURE.exercise("counter"), NoValidation)
    assert scores(result) == {"counts_up": "pass", "rejects_negative": "fail"}
    assert "expected it to raise ValueError" in result.cases[1].feedback


def test_hidden_case_feedback_does_not_show_values():
    result = run_in_process(FIXTURE, FIXTURE.exercise("add"), lambda a, b: a - b, include_hidden=True)
    hidden = next(case for case in result.cases if case.case == "hidden_matrix")
    assert hidden.status == "fail" and hidden.feedback.endswith("-- wrong values")


# -- the notebook self-check ----------------------------------------------------------------------------------


def test_check_prints_a_table_returns_the_score_and_restores_stand_ins(capsys):
    namespace = {}
    exec("def rms_norm(x, weight, eps):\n    return x * 0\n"
         "def decoder_layer(hidden, positions, weights, config):\n"
         "    return DECODER(hidden, positions, weights, config)\n", namespace)
    namespace["DECODER"] = LAB.exercise("decoder_layer").reference
    wrong_rms_norm = namespace["rms_norm"]
    assert check("lab0.1", "rms_norm", namespace) == 0
    score = check("lab0.1", "decoder_layer", namespace["decoder_layer"])
    assert score == LAB.exercise("decoder_layer").visible_points
    assert namespace["rms_norm"] is wrong_rms_norm  # the reference stand-in was put back
    output = capsys.readouterr().out
    assert "rms_norm" in output and "total: 0/4" in output and "full marks" in output


def test_check_looks_up_the_callers_globals_and_reports_a_missing_definition(capsys):
    assert check("lab0.1", "bpe_encode") == 0  # this module defines no bpe_encode
    assert "no bpe_encode defined yet" in capsys.readouterr().out


def test_pick_returns_the_learners_function_only_when_it_passes(capsys):
    reference = LAB.exercise("swiglu_mlp").reference
    good = lambda x, w_gate, w_up, w_down: reference(x, w_gate, w_up, w_down)  # noqa: E731
    assert pick("lab0.1", "swiglu_mlp", good) is good
    assert pick("lab0.1", "swiglu_mlp", lambda *args: args[0]) is reference
    output = capsys.readouterr().out
    assert "using YOUR swiglu_mlp" in output and "using the REFERENCE swiglu_mlp (yours fails" in output


# -- lab 0.1's cases tell right from wrong --------------------------------------------------------------------


def rms_norm_without_float32(x, weight, eps):
    return weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)


def rope_interleaved(x, positions, theta):
    inv_freq = 1.0 / theta ** (torch.arange(0, x.shape[-1], 2).float() / x.shape[-1])
    angles = positions.float()[:, None, None] * inv_freq
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return torch.stack((x1 * angles.cos() - x2 * angles.sin(), x2 * angles.cos() + x1 * angles.sin()), -1).flatten(-2)


def attention_without_mask(q, k, v):
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    scores = torch.einsum("qhd,khd->hqk", q, k) / math.sqrt(q.shape[-1])
    return torch.einsum("hqk,khd->qhd", scores.softmax(-1), v)


def merge_first_occurrence_only(ids, pair, new_id):
    for i in range(len(ids) - 1):
        if (ids[i], ids[i + 1]) == tuple(pair):
            return ids[:i] + [new_id] + ids[i + 2:]
    return list(ids)


def sampler_without_sorting(logits, temperature, top_k, top_p, uniform):
    if temperature == 0:
        return logits.argmax(-1)
    cdf = (logits / temperature).softmax(-1).cumsum(-1)
    return (cdf <= uniform[:, None]).sum(-1).clamp(max=logits.shape[-1] - 1)


@pytest.mark.parametrize("exercise, wrong, must_fail", [
    ("rms_norm", rms_norm_without_float32, "float16_computed_in_float32"),
    ("apply_rope", rope_interleaved, "positions_0_to_7"),
    ("gqa_attention", attention_without_mask, "mha_prefill"),
    ("bpe_merge_step", merge_first_occurrence_only, "one_pair"),
    ("sample_next_token", sampler_without_sorting, "temperature_one"),
    ("kv_cache_bytes", lambda config, num_tokens, dtype_bytes: 2 * num_tokens * dtype_bytes, "smollm2_one_token_float32"),
])
def test_lab0_1_cases_catch_typical_mistakes(exercise, wrong, must_fail):
    result = run_in_process(LAB, LAB.exercise(exercise), wrong, include_hidden=True)
    assert scores(result)[must_fail] == "fail"
    assert result.score < result.max_score


# -- release --------------------------------------------------------------------------------------------------


def test_strip_solution_replaces_exactly_the_marked_regions_at_their_indentation():
    source = "\n".join([
        "class Thing:", "    def a(self):", "        '''doc'''", f"        {BEGIN}", "        return 1", f"        {END}",
        "", "    def b(self):", f"        {BEGIN}", "        x = 2", "        return x", f"        {END}", "# tail",
    ])
    stripped = strip_solution(source, "thing", "test").split("\n")
    stub = '        raise NotImplementedError("thing: not implemented yet -- write this part, then run the check below")'
    assert stripped == ["class Thing:", "    def a(self):", "        '''doc'''", stub, "", "    def b(self):", stub,
                        "# tail"]


@pytest.mark.parametrize("source", [f"{BEGIN}\nx = 1", f"x = 1\n{END}", f"{BEGIN}\n{BEGIN}\n{END}\n{END}", "x = 1"])
def test_strip_solution_rejects_unbalanced_or_missing_markers(source):
    with pytest.raises(ReleaseError):
        strip_solution(source, "name", "test")


def fixture_notebook(add_body: str, counter_body: str, tags: bool = True) -> nbformat.NotebookNode:
    cells = [
        nbformat.v4.new_markdown_cell("# Fixture"),
        nbformat.v4.new_code_cell("import torch\nx = 1 / 0  # a failing non-exercise cell is never run by check"),
        nbformat.v4.new_code_cell(f"def add(a, b):\n    {BEGIN}\n{add_body}\n    {END}"),
        nbformat.v4.new_code_cell(
            "class Counter:\n    def __init__(self, start):\n        self.total = start\n\n"
            f"    def increment(self, by):\n        {BEGIN}\n{counter_body}\n        {END}"),
    ]
    if tags:
        cells[2].metadata["tags"] = ["exercise:add"]
        cells[3].metadata["tags"] = ["exercise:counter"]
    cells[1].outputs = [nbformat.v4.new_output("stream", text="noise")]
    cells[1].execution_count = 4
    for index, cell in enumerate(cells):
        cell.id = f"cell-{index}"
    return nbformat.v4.new_notebook(cells=cells)


GOOD_ADD = "    return a + b"
GOOD_COUNTER = ("        if by < 0:\n            raise ValueError('negative')\n        self.total += by\n"
                "        return self.total")


def test_release_strips_outputs_and_is_deterministic():
    solution = fixture_notebook(GOOD_ADD, GOOD_COUNTER)
    learner = release_notebook(solution)
    assert nbformat.writes(learner) == nbformat.writes(release_notebook(solution))
    assert all(cell.get("outputs", []) == [] and cell.get("execution_count") is None
               for cell in learner.cells if cell.cell_type == "code")
    assert 'raise NotImplementedError("add: ' in learner.cells[2].source and "a + b" not in learner.cells[2].source
    assert learner.cells[3].source.count("NotImplementedError") == 1 and "self.total = start" in learner.cells[3].source
    assert solution.cells[1].outputs  # the input is untouched


def test_release_refuses_markers_outside_exercise_cells():
    solution = fixture_notebook(GOOD_ADD, GOOD_COUNTER, tags=False)
    with pytest.raises(ReleaseError):
        release_notebook(solution)


# -- checking notebook files in a child process ---------------------------------------------------------------


def by_exercise(results) -> dict[str, tuple[float, float]]:
    return {result.exercise: (result.score, result.max_score) for result in results}


def test_child_check_of_fixture_notebooks(tmp_path):
    good, learner = tmp_path / "good.ipynb", tmp_path / "learner.ipynb"
    nbformat.write(fixture_notebook(GOOD_ADD, GOOD_COUNTER), str(good))
    nbformat.write(release_notebook(fixture_notebook(GOOD_ADD, GOOD_COUNTER)), str(learner))
    untagged = tmp_path / "untagged.ipynb"
    notebook = fixture_notebook(GOOD_ADD, GOOD_COUNTER)
    for cell in notebook.cells:
        cell.metadata.pop("tags", None)
    nbformat.write(notebook, str(untagged))
    hanging = tmp_path / "hanging.ipynb"
    nbformat.write(fixture_notebook("    while True:\n        pass", GOOD_COUNTER), str(hanging))
    broken = tmp_path / "broken.ipynb"
    nbformat.write(fixture_notebook("    return a +", GOOD_COUNTER), str(broken))

    assert by_exercise(run_notebook(FIXTURE, good)) == {"add": (3.0, 3.0), "counter": (2.0, 2.0)}
    assert by_exercise(run_notebook(FIXTURE, untagged)) == {"add": (3.0, 3.0), "counter": (2.0, 2.0)}  # by name
    results = run_notebook(FIXTURE, learner)
    assert {case.status for result in results for case in result.cases} == {"not implemented"}
    results = run_notebook(FIXTURE, hanging)
    assert [case.status for case in results[0].cases] == ["timeout", "timeout"] and results[1].full_marks
    results = run_notebook(FIXTURE, broken)
    assert results[0].score == 0 and "SyntaxError" in results[0].cases[0].feedback and results[1].full_marks


def test_child_check_reports_unreadable_notebooks(tmp_path):
    from autograder.notebook import NotebookError

    for content in ("", "{not json", json.dumps({"cells": "nope"})):
        path = tmp_path / "bad.ipynb"
        path.write_text(content)
        with pytest.raises(NotebookError):
            run_notebook(FIXTURE, path)


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "autograder", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=300, env=dict(os.environ, PYTHONPATH=str(REPO)))


@pytest.mark.parametrize("notebook", LAB.notebooks)
def test_cli_check_gives_full_marks_to_solutions_and_zero_to_learner_notebooks(notebook):
    solution = run_cli("check", "lab0.1", str(SOLUTIONS / notebook))
    assert solution.returncode == 0, solution.stdout + solution.stderr
    assert "full marks" in solution.stdout
    learner = run_cli("check", "lab0.1", str(LEARNER / notebook))
    assert learner.returncode == 1
    for exercise in LAB.exercises_in(notebook):
        assert f"{exercise.symbol} is not implemented yet" in learner.stdout
    assert "total: 0/" in learner.stdout


def test_one_wrong_exercise_loses_exactly_its_own_points(tmp_path):
    notebook = nbformat.read(str(SOLUTIONS / "02_decoder_forward.ipynb"), as_version=4)
    (cell,) = [c for c in notebook.cells if "exercise:rms_norm" in c.metadata.get("tags", [])]
    cell.source = cell.source.replace("return weight * normed.to(x.dtype)", "return weight * x")
    path = tmp_path / "02_decoder_forward.ipynb"
    nbformat.write(notebook, str(path))
    scored = by_exercise(run_notebook(LAB, path))
    assert scored.pop("rms_norm")[0] == 0
    assert all(score == maximum for score, maximum in scored.values()), scored  # decoder_layer included
    result = run_cli("check", "lab0.1", str(path))
    assert result.returncode == 1 and "rms_norm" in result.stdout
