"""Grading power: every plausible wrong solution in tests/mutants/ loses points on its exercise, and trivial outputs
(identity, constants, None, the input returned) score 0, hidden cases included; the solutions keep full marks.

Two levels, per lab:
- every mutant of the catalogue, judged in this process with the grader's own cases, comparisons and codec round
  trip (runner.run_in_process, hidden cases included): seconds per lab;
- one batch of the real grader (`grade` in its sandbox, -j 3) with the honest control (the solution notebooks), a
  submission holding one trivial mutant per exercise and one holding each exercise's classic mistake: the control
  keeps full marks, the trivial outputs score 0 on every exercise, the classic mistakes lose points, and every
  case's status and points equal the in-process ones, so the in-process level judges as `grade` does. Mutants of
  different exercises share a submission (exercises are judged independently): each submission costs about ten
  sandboxed children that import torch, 40-120 s per lab on two busy cores, hence `slow`; one submission per
  mutant (265 of them) would take hours. `benchmarks/mutation_score.py --grade` runs the whole catalogue, packed.
benchmarks/mutation_score.py prints the killed/total table that the lab READMEs quote.
"""

from __future__ import annotations

import pytest

from autograder import sandbox
from autograder.grade import GradeOptions, grade
from autograder.labs import load_lab
from mutants import LABS, REPO, evaluate_isolated, load_catalogue, mutant_source, run_cell, solution_cells, write_submission

MIN_PLAUSIBLE = 5

needs_bwrap = pytest.mark.skipif(bool(sandbox.bwrap_problem()),
                                 reason=f"bubblewrap cannot start here: {sandbox.bwrap_problem()}")


@pytest.mark.parametrize("lab_name", LABS)
def test_every_exercise_has_five_plausible_mutants_and_trivial_ones_that_apply(lab_name):
    lab = load_lab(lab_name)
    mutants = load_catalogue(lab_name)
    assert set(mutants) == set(lab.exercise_names)
    cells = solution_cells(lab_name)
    for exercise, items in mutants.items():
        assert sum(not m.trivial for m in items) >= MIN_PLAUSIBLE, exercise
        assert any(m.trivial for m in items), exercise
        assert len({m.name for m in items}) == len(items), exercise
        for mutant in items:
            assert mutant_source(mutant, cells[exercise][2]) != cells[exercise][2]  # raises when it does not apply


@pytest.mark.parametrize("lab_name", LABS)
def test_every_mutant_loses_points_and_trivial_outputs_score_zero(lab_name):
    verdicts = evaluate_isolated(lab_name)
    controls = [v for v in verdicts if v.mutant is None]
    assert [(v.exercise, v.score) for v in controls] == [(v.exercise, v.max_score) for v in controls]
    survivors = [(v.mutant.label, v.score, v.max_score) for v in verdicts if v.mutant is not None and not v.killed]
    assert survivors == []
    total = sum(len(items) for items in load_catalogue(lab_name).values())
    assert len(verdicts) - len(controls) == total
    readme = (REPO / lab_name / "README.md").read_text()
    assert f"**Mutation score: {total}/{total}**" in readme  # the README quotes benchmarks/mutation_score.py


def test_the_seats_mistake_of_schedule_step_is_caught_by_a_visible_case_with_the_state_named():
    """Counting seats as len(scheduled) instead of len(running) used to pass every test (issue 14)."""
    (mutant,) = [m for m in load_catalogue("lab0.2")["schedule_step"] if m.name == "seats_count_scheduled"]
    result = run_cell("lab0.2", "schedule_step", mutant_source(mutant, solution_cells("lab0.2")["schedule_step"][2]))
    failed = {case.case: case.feedback for case in result.cases if not case.passed}
    assert "skipped_sequence_keeps_its_seat" in failed
    message = failed["skipped_sequence_keeps_its_seat"]
    assert "running [seq 0: 9 of 10 tokens computed, seq 1: 10 of 40 tokens computed]" in message
    assert "sequence 2 was admitted, but the seats are full" in message


def test_a_wrong_eviction_is_explained_with_the_victim_the_rule_names():
    (mutant,) = [m for m in load_catalogue("lab0.2")["schedule_step"] if m.name == "preempts_the_head"]
    result = run_cell("lab0.2", "schedule_step", mutant_source(mutant, solution_cells("lab0.2")["schedule_step"][2]))
    message = {case.case: case.feedback for case in result.cases}["preempt_the_last_running"]
    assert "expected {'scheduled': [[0, 1], [1, 1]], 'preempted': [2]}" in message
    assert "the sequences to preempt are [2] in that order, not [1]" in message
    assert "0 free blocks of 4 tokens" in message


def test_block_allocator_feedback_names_the_free_queue_before_the_failing_step():
    (mutant,) = [m for m in load_catalogue("lab0.3")["block_allocator"] if m.name == "freed_to_front"]
    result = run_cell("lab0.3", "block_allocator",
                      mutant_source(mutant, solution_cells("lab0.3")["block_allocator"][2]))
    message = {case.case: case.feedback for case in result.cases}["free_queue_order"]
    assert "step 7 of 11, allocate(), when the free queue is [3, 1, 0] (front first)" in message
    assert "expected 3, got 0" in message


@pytest.mark.slow
@needs_bwrap
@pytest.mark.parametrize("lab_name", LABS)
def test_grade_gives_the_control_full_marks_trivial_outputs_zero_and_mutants_fewer_points(lab_name, tmp_path):
    """One batch: the solutions, one trivial mutant per exercise, and each exercise's first plausible mutant
    (its classic mistake: for schedule_step, counting seats as len(scheduled))."""
    lab = load_lab(lab_name)
    mutants = load_catalogue(lab_name)
    trivial = [next(m for m in items if m.trivial) for items in mutants.values()]
    classic = [next(m for m in items if not m.trivial) for items in mutants.values()]
    paths = [write_submission(lab_name, tmp_path / name, chosen)
             for name, chosen in (("control", []), ("trivial", trivial), ("classic", classic))]
    graded = {g.student: g for g in grade(lab, paths, GradeOptions(jobs=3, progress=False))}
    scores = {student: {r.exercise: (r.score, r.max_score) for r in g.results} for student, g in graded.items()}
    assert graded["control"].status == "ok"
    assert scores["control"] == {e.name: (e.points, e.points) for e in lab.exercises}
    assert scores["trivial"] == {e.name: (0.0, e.points) for e in lab.exercises}
    assert all(scores["classic"][m.exercise][0] < scores["classic"][m.exercise][1] for m in classic), scores["classic"]
    in_process = {v.mutant: v.cases for v in evaluate_isolated(lab_name, {m.label for m in trivial + classic})}
    for student, chosen in (("trivial", trivial), ("classic", classic)):
        for mutant in chosen:  # the in-process level judges as the grader does, case by case
            (result,) = [r for r in graded[student].results if r.exercise == mutant.exercise]
            assert [(c.case, c.status, c.points) for c in result.cases] == in_process[mutant], mutant.label


def test_the_allocator_states_named_in_feedback_are_the_references():
    """The free queue and ref counts that the block allocator's step labels show come from a replay of the
    exercise's rules; it must agree with the reference's own trace on every case, the hidden random one included."""
    from autograder.harness.lab0_3 import ReferenceBlockAllocator, drive_block_allocator
    from autograder.labs.lab0_3 import _allocator_states

    exercise = load_lab("lab0.3").exercise("block_allocator")
    checked = 0
    for case in exercise.cases:
        inputs = case.inputs()
        trace = drive_block_allocator(ReferenceBlockAllocator, inputs)
        states = _allocator_states(inputs["num_blocks"], inputs["ops"]) + [None]
        for op, result, (queue, held), after in zip(inputs["ops"], trace, states, states[1:]):
            if op["op"] == "num_free":
                assert result == len(queue)
            elif op["op"] == "allocate":
                assert result == queue[0] if queue else result["error"].startswith("RuntimeError")
            elif op["op"] == "ref_count" and not isinstance(result, dict):
                assert result == held.get(op["block"], 0)
            elif op["op"] == "free" and not isinstance(result, dict):
                assert result == (op["block"] not in after[1] if after else held[op["block"]] == 1)
            checked += 1
    assert checked > 150


def test_plan_feedback_survives_plans_of_any_shape():
    from autograder.labs.lab0_2 import Plans

    state = {"running": [{"seq_id": 0, "num_tokens": 10, "num_computed": 9}], "waiting": [], "num_free_blocks": 3,
             "block_size": 4, "max_num_seqs": 2, "token_budget": 8, "chunked_prefill": True}
    want = {"state": state, "plan": {"scheduled": [[0, 1]], "preempted": []}}
    for plan in ({"scheduled": [[0]], "preempted": []}, {"scheduled": [[[0], 1]], "preempted": [[1]]},
                 {"scheduled": [[0, 1, 2]], "preempted": None}, {"scheduled": [], "preempted": [0]}):
        outcome = Plans().compare({"state": state, "plan": plan}, want)
        assert not outcome.passed and outcome.kind == "the plan: wrong plan", plan
        assert "running [seq 0: 9 of 10 tokens computed]" in outcome.detail
    assert Plans().compare({"state": state, "plan": want["plan"]}, want).passed
    assert Plans().compare([{"state": state, "plan": want["plan"]}] * 2, [want]).kind == "trace too long"
