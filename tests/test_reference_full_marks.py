"""The reference scores full marks in every lab: each exercise's reference (the stand-in the grader binds, a thin
adapter over the `reference` engine) passes every case, hidden ones included, against the expected values the
grader computes. A case that fails here would fail every learner who got the exercise right."""

from __future__ import annotations

import pytest

from autograder.labs import LAB_MODULES, load_lab
from autograder.runner import run_in_process


@pytest.mark.parametrize("lab_name", list(LAB_MODULES))
def test_the_reference_scores_full_marks_in_every_lab(lab_name):
    lab = load_lab(lab_name)
    for exercise in lab.exercises:
        result = run_in_process(lab, exercise, exercise.reference, include_hidden=True)
        failed = [(c.case, c.status, c.feedback) for c in result.cases if not c.passed]
        assert result.full_marks, (exercise.name, failed)
