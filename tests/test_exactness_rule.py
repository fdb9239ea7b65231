"""The tie rule every exactness test leans on (tests/exactness.py, DESIGN.md §7), on made-up logits: it must
excuse a difference at a near-tie, fail one past the tolerance, and hold the excused count to its cap."""

from __future__ import annotations

import pytest
import torch

from exactness import assert_greedy_agree, first_difference, tie_tolerance


def logits_with_gap(gap: float, top: float = 10.0) -> torch.Tensor:
    logits = torch.zeros(8)
    logits[0], logits[1] = top, top - gap
    return logits


def test_first_difference_counts_a_length_mismatch_at_the_shorter_length():
    assert first_difference([1, 2, 3], [1, 2, 3]) is None
    assert first_difference([1, 5, 3], [1, 2, 3]) == 1
    assert first_difference([1, 2], [1, 2, 3]) == 2


def test_bf16_tolerance_is_two_ulps_of_the_top_logit_or_the_written_floor():
    assert tie_tolerance(torch.float32, 10.0) == 1e-4
    assert tie_tolerance(torch.bfloat16, 0.5) == 5e-2  # 2 ulps at 0.5 are 2^-8: below the floor
    assert tie_tolerance(torch.bfloat16, 10.0) == 2 * 2.0 ** -7 * 8  # one ulp in [8, 16) is 2^-4


@pytest.mark.parametrize("gap, excused", [(0.1, True), (0.2, False)])
def test_a_difference_is_excused_only_at_a_near_tie(gap, excused):
    prompts, ours, reference = [[1]] * 10, [[4, 5]] + [[4, 4]] * 9, [[4, 4]] * 10
    check = lambda: assert_greedy_agree(prompts, ours, reference, lambda ids: logits_with_gap(gap),  # noqa: E731
                                        dtype=torch.bfloat16)
    if excused:  # 2 ulps at a top logit of 10 are 0.125
        assert check() == 1
    else:
        with pytest.raises(AssertionError, match="first difference at output token 1"):
            check()


def test_excuses_over_the_cap_fail_unless_the_test_sets_its_own():
    prompts, ours, reference = [[1]] * 10, [[5]] * 2 + [[4]] * 8, [[4]] * 10
    near = lambda ids: logits_with_gap(0.01)  # noqa: E731
    with pytest.raises(AssertionError, match="2 of 10 sequences needed the tie excuse"):
        assert_greedy_agree(prompts, ours, reference, near, dtype=torch.bfloat16)
    assert assert_greedy_agree(prompts, ours, reference, near, dtype=torch.bfloat16, max_excused_fraction=1.0) == 2
