"""SamplingParams validation, and the sampler's distributions, seeding and logprobs.

Statistical tests draw NUM_DRAWS samples as one batch of identical rows and require every token's empirical
frequency to be within 5 standard errors of its expected probability (a correct sampler misses that bound with
probability < 1e-6 per token); tokens with expected probability 0 must never appear. The autouse fixture in
conftest.py seeds torch, so these tests are deterministic.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import re

import pytest
import numpy as np
import torch

from reference.sampling import SamplingParams, compute_logprobs, sample, seeded_generator

NUM_DRAWS = 20_000
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


# ---------------------------------------------------------------------------------------------------------------
# SamplingParams


INVALID = [
    ({"n": 0}, "n"),
    ({"n": 2.0}, "n"),
    ({"n": True}, "n"),
    ({"temperature": -0.1}, "temperature"),
    ({"temperature": "hot"}, "temperature"),
    ({"temperature": float("nan")}, "temperature"),
    ({"temperature": float("inf")}, "temperature"),
    ({"temperature": True}, "temperature"),
    ({"top_p": 0.0}, "top_p"),
    ({"top_p": -0.5}, "top_p"),
    ({"top_p": 1.01}, "top_p"),
    ({"top_p": float("nan")}, "top_p"),
    ({"top_p": "0.9"}, "top_p"),
    ({"top_k": 0}, "top_k"),
    ({"top_k": -2}, "top_k"),
    ({"top_k": 5.0}, "top_k"),
    ({"top_k": True}, "top_k"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"max_tokens": -3}, "max_tokens"),
    ({"max_tokens": 8.0}, "max_tokens"),
    ({"max_tokens": True}, "max_tokens"),
    ({"logprobs": -1}, "logprobs"),
    ({"logprobs": 2.0}, "logprobs"),
    ({"logprobs": False}, "logprobs"),
    ({"seed": 1.5}, "seed"),
    ({"seed": "42"}, "seed"),
    ({"seed": True}, "seed"),
    ({"stop": ""}, "stop"),
    ({"stop": ["end", ""]}, "stop"),
    ({"stop": 7}, "stop"),
    ({"stop": ["end", 7]}, "stop"),
    ({"stop_token_ids": 7}, "stop_token_ids"),
    ({"stop_token_ids": [1, -1]}, "stop_token_ids"),
    ({"stop_token_ids": [1.0]}, "stop_token_ids"),
    ({"stop_token_ids": [True]}, "stop_token_ids"),
    ({"ignore_eos": 1}, "ignore_eos"),
    ({"n": 3, "best_of": 2}, "best_of"),
    ({"best_of": 0}, "best_of"),
    ({"best_of": 2.0}, "best_of"),
    ({"best_of": "2"}, "best_of"),
    ({"best_of": True}, "best_of"),
    ({"temprature": 0.5}, "temprature"),
]


@pytest.mark.parametrize("kwargs, field", INVALID, ids=[f"{k}" for k, _ in INVALID])
def test_invalid_sampling_params_raise_value_error_naming_the_field(kwargs, field):
    with pytest.raises(ValueError, match=rf"\b{re.escape(field)}\b") as info:
        SamplingParams(**kwargs)
    if field != "temprature":
        assert f"{field} must be" in str(info.value)  # and says what is allowed


def test_unknown_keyword_lists_the_valid_fields_and_the_close_match():
    with pytest.raises(ValueError) as info:
        SamplingParams(temprature=0.5)
    message = str(info.value)
    assert "'temprature'" in message and "did you mean 'temperature'" in message
    for field in ("n", "temperature", "top_p", "top_k", "max_tokens", "stop", "seed", "logprobs"):
        assert field in message


def test_defaults_are_the_public_contract():
    params = SamplingParams()
    assert [(f.name, f.default) for f in dataclasses.fields(SamplingParams)] == [
        ("n", 1), ("temperature", 1.0), ("top_p", 1.0), ("top_k", -1), ("max_tokens", 16), ("stop", None),
        ("stop_token_ids", None), ("ignore_eos", False), ("seed", None), ("logprobs", None), ("min_tokens", 0),
        ("logit_bias", None), ("repetition_penalty", 1.0), ("frequency_penalty", 0.0), ("presence_penalty", 0.0),
        ("best_of", None),
    ]
    assert params.stop == [] and params.stop_token_ids == [] and not params.greedy


@pytest.mark.parametrize("kwargs", [
    {"top_p": 1.0}, {"top_p": 1}, {"top_p": 1e-9}, {"top_k": -1}, {"top_k": 1}, {"temperature": 0},
    {"temperature": 0.0}, {"max_tokens": 1}, {"n": 1}, {"logprobs": 0}, {"seed": 0}, {"seed": -7},
    {"seed": 2**70}, {"ignore_eos": True},
])
def test_valid_edge_values_are_accepted(kwargs):
    params = SamplingParams(**kwargs)
    for name, value in kwargs.items():
        assert getattr(params, name) == value


def test_stop_and_stop_token_ids_are_normalised_to_lists():
    assert SamplingParams(stop="###").stop == ["###"]
    assert SamplingParams(stop=("a", "b")).stop == ["a", "b"]
    assert SamplingParams(stop_token_ids=(2, 3)).stop_token_ids == [2, 3]
    assert SamplingParams(stop=None, stop_token_ids=None).stop == []


def test_greedy_means_temperature_zero():
    assert SamplingParams(temperature=0).greedy
    assert not SamplingParams(temperature=1e-3).greedy


def test_best_of_runs_best_of_samples_except_when_greedy():
    assert SamplingParams(n=2).num_samples == 2 and not SamplingParams(n=2).needs_logprobs
    ranked = SamplingParams(n=2, best_of=5)
    assert ranked.num_samples == 5 and ranked.ranks_samples and ranked.needs_logprobs and ranked.logprobs is None
    assert not SamplingParams(n=2, best_of=2).ranks_samples
    greedy = SamplingParams(n=2, best_of=5, temperature=0)  # every sample would be the same argmax
    assert greedy.best_of == 5 and greedy.num_samples == 2 and not greedy.needs_logprobs
    with pytest.raises(ValueError, match=r"best_of must be None or an integer >= n=3"):
        SamplingParams(n=3, best_of=2)


def test_copy_and_replace_still_work_and_replace_validates():
    params = SamplingParams(temperature=0.5, stop=["x"], seed=3)
    assert copy.deepcopy(params) == params
    assert dataclasses.replace(params, top_k=4).top_k == 4
    with pytest.raises(ValueError, match="top_k"):
        dataclasses.replace(params, top_k=0)


# ---------------------------------------------------------------------------------------------------------------
# sample: shapes and greedy


def test_greedy_rows_return_argmax_even_in_a_mixed_batch():
    logits = torch.randn(8, 300)
    params = [SamplingParams(temperature=0.0) if i % 2 == 0 else SamplingParams(temperature=1.0) for i in range(8)]
    params[2] = SamplingParams(temperature=1e-9)  # too small to divide by safely: sampled as argmax, no NaN
    tokens = sample(logits, params, [None] * 8)
    assert tokens.dtype == torch.int64 and tokens.shape == (8,)
    argmax = logits.argmax(dim=-1)
    assert torch.equal(tokens[::2], argmax[::2])


def test_sample_rejects_mismatched_params_and_generators():
    with pytest.raises(ValueError, match="one SamplingParams and one generator per logits row"):
        sample(torch.randn(3, 10), [SamplingParams()] * 2, [None] * 3)
    with pytest.raises(ValueError, match=r"\[batch, vocab\]"):
        sample(torch.randn(10), [SamplingParams()], [None])


# ---------------------------------------------------------------------------------------------------------------
# sample: distributions


def reference_distribution(logits: list[float], temperature: float, top_k: int, top_p: float) -> list[float]:
    """The target distribution written as plainly as possible: scale, keep top k, keep the nucleus, renormalise."""
    scaled = [x / temperature for x in logits]
    top = max(scaled)
    weights = [math.exp(x - top) for x in scaled]
    order = sorted(range(len(logits)), key=lambda i: -scaled[i])
    kept = order if top_k == -1 else order[:top_k]
    total = sum(weights[i] for i in kept)
    nucleus, mass = [], 0.0
    for i in kept:
        nucleus.append(i)
        mass += weights[i] / total
        if mass >= top_p:
            break
    nucleus_total = sum(weights[i] for i in nucleus)
    return [weights[i] / nucleus_total if i in nucleus else 0.0 for i in range(len(logits))]


def draw_frequencies(logits: list[float], params: SamplingParams, device: str = "cpu") -> torch.Tensor:
    """Empirical frequencies of NUM_DRAWS samples from one logits row (batched as NUM_DRAWS identical rows)."""
    batch = torch.tensor(logits, device=device).expand(NUM_DRAWS, -1).contiguous()
    tokens = sample(batch, [params] * NUM_DRAWS, [None] * NUM_DRAWS)
    assert tokens.device == batch.device
    return torch.bincount(tokens.cpu(), minlength=len(logits)).double() / NUM_DRAWS


def assert_frequencies_match(frequencies: torch.Tensor, expected: list[float]) -> None:
    for token, (freq, prob) in enumerate(zip(frequencies.tolist(), expected)):
        if prob == 0.0:
            assert freq == 0.0, f"token {token} is outside the kept set but was drawn (frequency {freq})"
        else:
            tolerance = 5 * math.sqrt(prob * (1 - prob) / NUM_DRAWS)
            assert abs(freq - prob) <= tolerance, f"token {token}: frequency {freq:.4f}, expected {prob:.4f}"


LOGITS = [2.0, 1.0, 0.5, 0.0, -1.0]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
def test_temperature_samples_from_softmax_of_logits_over_temperature(temperature, device):
    expected = torch.softmax(torch.tensor(LOGITS, dtype=torch.float64) / temperature, dim=0).tolist()
    assert_frequencies_match(draw_frequencies(LOGITS, SamplingParams(temperature=temperature), device), expected)


def test_temperature_changes_the_distribution_by_more_than_the_tolerance():
    # Guards the test above: the three temperatures' distributions are far apart compared with 5 standard errors.
    top_prob = [torch.softmax(torch.tensor(LOGITS) / t, dim=0)[0].item() for t in (0.5, 1.0, 2.0)]
    assert min(abs(a - b) for a, b in zip(top_prob, top_prob[1:])) > 0.1


@pytest.mark.parametrize("top_k", [1, 2, 3])
def test_top_k_keeps_only_the_k_largest_with_renormalised_frequencies(top_k):
    logits = [0.3, 1.5, -0.2, 1.0, 0.8]  # order by size: 1, 3, 4, 0, 2
    expected = reference_distribution(logits, 1.0, top_k, 1.0)
    assert sum(p > 0 for p in expected) == top_k
    assert_frequencies_match(draw_frequencies(logits, SamplingParams(top_k=top_k)), expected)


def test_top_k_larger_than_vocab_keeps_everything():
    expected = reference_distribution(LOGITS, 1.0, -1, 1.0)
    assert_frequencies_match(draw_frequencies(LOGITS, SamplingParams(top_k=50)), expected)


# probs 0.5, 0.25, 0.15, 0.07, 0.03: top_p=0.7 keeps {0, 1} (0.5 < 0.7 <= 0.75) -> renormalised 2/3, 1/3.
NUCLEUS_LOGITS = [math.log(p) for p in (0.5, 0.25, 0.15, 0.07, 0.03)]


@pytest.mark.parametrize("top_p, expected", [
    (0.7, [2 / 3, 1 / 3, 0.0, 0.0, 0.0]),
    (0.85, [0.5 / 0.9, 0.25 / 0.9, 0.15 / 0.9, 0.0, 0.0]),
    (0.3, [1.0, 0.0, 0.0, 0.0, 0.0]),  # the top token alone already exceeds top_p: it is kept, alone
    (1.0, [0.5, 0.25, 0.15, 0.07, 0.03]),
])
def test_top_p_keeps_the_smallest_nucleus_with_renormalised_frequencies(top_p, expected):
    assert reference_distribution(NUCLEUS_LOGITS, 1.0, -1, top_p) == pytest.approx(expected)
    assert_frequencies_match(draw_frequencies(NUCLEUS_LOGITS, SamplingParams(top_p=top_p)), expected)


def test_top_p_applies_to_the_temperature_scaled_top_k_distribution():
    # T=2 flattens 0.5/0.25/0.15 to about 0.44/0.31/0.24 after top_k=3; top_p=0.7 then keeps the top two,
    # whereas on the unscaled distribution it would keep the same two with different weights.
    expected = reference_distribution(NUCLEUS_LOGITS, 2.0, 3, 0.7)
    assert [p > 0 for p in expected] == [True, True, False, False, False]
    params = SamplingParams(temperature=2.0, top_k=3, top_p=0.7)
    assert_frequencies_match(draw_frequencies(NUCLEUS_LOGITS, params), expected)


def test_each_row_uses_its_own_temperature_top_k_and_top_p():
    # Four parameter sets interleaved in one batch: the vectorised filter must not mix rows up.
    settings = [(1.0, -1, 1.0), (0.5, 2, 1.0), (2.0, -1, 0.6), (1.5, 3, 0.8)]
    logits = [0.1, 1.2, -0.5, 0.9, 0.4, -1.0]
    rows = len(settings) * NUM_DRAWS
    params = [SamplingParams(temperature=t, top_k=k, top_p=p) for t, k, p in settings] * NUM_DRAWS
    tokens = sample(torch.tensor(logits).expand(rows, -1).contiguous(), params, [None] * rows)
    for group, (t, k, p) in enumerate(settings):
        frequencies = torch.bincount(tokens[group::len(settings)], minlength=len(logits)).double() / NUM_DRAWS
        assert_frequencies_match(frequencies, reference_distribution(logits, t, k, p))


def test_seeded_rows_sample_from_the_same_distribution():
    params = SamplingParams(temperature=1.0, top_k=4, seed=11)
    generators = [seeded_generator(11, 0, position, "cpu") for position in range(NUM_DRAWS)]
    batch = torch.tensor(LOGITS).expand(NUM_DRAWS, -1).contiguous()
    tokens = sample(batch, [params] * NUM_DRAWS, generators)
    frequencies = torch.bincount(tokens, minlength=len(LOGITS)).double() / NUM_DRAWS
    assert_frequencies_match(frequencies, reference_distribution(LOGITS, 1.0, 4, 1.0))


# ---------------------------------------------------------------------------------------------------------------
# sample: seeds


def seeded_tokens(logits_row: torch.Tensor, params: SamplingParams, seed: int, sample_index: int, positions: int):
    """The tokens one seeded row gets at positions 0..positions-1 when it is alone in the batch."""
    return [
        sample(logits_row[None], [params], [seeded_generator(seed, sample_index, pos, logits_row.device)]).item()
        for pos in range(positions)
    ]


def test_seeded_generator_is_a_pure_function_of_its_triple():
    first = seeded_generator(5, 1, 9, "cpu")
    again = seeded_generator(5, 1, 9, "cpu")
    assert first.initial_seed() == again.initial_seed()
    assert torch.equal(torch.rand(16, generator=first), torch.rand(16, generator=again))
    seeds = {seeded_generator(*triple, "cpu").initial_seed() for triple in [(5, 1, 9), (6, 1, 9), (5, 0, 9),
                                                                          (5, 1, 8), (5, 9, 1), (-5, 1, 9)]}
    assert len(seeds) == 6 and all(0 <= s < 2**63 for s in seeds)


@pytest.mark.parametrize("device", DEVICES)
def test_same_seed_index_and_position_give_the_same_tokens(device):
    logits_row = torch.randn(1000, device=device)
    params = SamplingParams(temperature=1.0, seed=42)
    first = seeded_tokens(logits_row, params, 42, 0, 20)
    torch.manual_seed(123)  # the global RNG must not matter
    assert seeded_tokens(logits_row, params, 42, 0, 20) == first


@pytest.mark.parametrize("device", DEVICES)
def test_seeded_row_does_not_depend_on_the_rest_of_the_batch(device):
    vocab = 1000
    target = torch.randn(vocab, device=device)
    params = SamplingParams(temperature=0.9, top_k=200, top_p=0.95, seed=42)
    alone = seeded_tokens(target, params, 42, 0, 20)
    others = [SamplingParams(), SamplingParams(temperature=0), SamplingParams(top_k=3, seed=7),
              SamplingParams(top_p=0.5, temperature=1.3), SamplingParams(seed=8, top_k=900)]
    for position in range(20):
        batch_size = 2 + position % 5
        row = position % batch_size  # the target moves around the batch
        logits = torch.randn(batch_size, vocab, device=device)
        logits[row] = target
        params_batch = [others[(i + position) % len(others)] for i in range(batch_size)]
        params_batch[row] = params
        generators = [
            seeded_generator(p.seed, 0, position, device) if p.seed is not None else None for p in params_batch
        ]
        generators[row] = seeded_generator(42, 0, position, device)
        tokens = sample(logits, params_batch, generators)
        assert tokens[row].item() == alone[position], f"position {position}, batch of {batch_size}, row {row}"


def test_different_seeds_and_sample_indices_give_different_draws():
    logits_row = torch.randn(1000)
    params = SamplingParams(temperature=1.0)
    seed_1 = seeded_tokens(logits_row, params, 1, 0, 20)
    seed_2 = seeded_tokens(logits_row, params, 2, 0, 20)
    other_sample = seeded_tokens(logits_row, params, 1, 1, 20)
    # With 1000 comparable tokens two independent draws agree with probability around 1%, so
    # more than 5 agreements in 20 would mean the seeds are not decorrelated.
    assert sum(a != b for a, b in zip(seed_1, seed_2)) >= 15
    assert sum(a != b for a, b in zip(seed_1, other_sample)) >= 15
    assert len(set(seed_1)) >= 15  # positions differ too


# ---------------------------------------------------------------------------------------------------------------
# compute_logprobs


def test_compute_logprobs_matches_log_softmax_of_raw_logits():
    logits = torch.randn(4, 50) * 3
    token_ids = torch.tensor([0, 17, 49, 3])
    reference = torch.log_softmax(logits.double(), dim=-1)
    result = compute_logprobs(logits, token_ids, num_top=5)
    assert result.token_logprobs.dtype == torch.float32 and result.token_logprobs.shape == (4,)
    torch.testing.assert_close(result.token_logprobs.double(), reference[torch.arange(4), token_ids],
                               atol=1e-5, rtol=0)
    expected_top, expected_ids = reference.topk(5, dim=-1)
    assert torch.equal(result.top_ids, expected_ids)
    torch.testing.assert_close(result.top_logprobs.double(), expected_top, atol=1e-5, rtol=0)


@pytest.mark.parametrize("num_top", [None, 0])
def test_compute_logprobs_without_top_tokens_returns_none_for_them(num_top):
    token_logprobs, top_ids, top_logprobs = compute_logprobs(torch.randn(2, 10), torch.tensor([1, 2]), num_top)
    assert token_logprobs.shape == (2,) and top_ids is None and top_logprobs is None


@pytest.mark.parametrize("num_top", [-1, 11, 2.0])
def test_compute_logprobs_rejects_bad_num_top(num_top):
    with pytest.raises(ValueError, match="num_top"):
        compute_logprobs(torch.randn(2, 10), torch.tensor([1, 2]), num_top)


# ---------------------------------------------------------------------------------------------------------------
# The GPU's fused sampler (fused_sampling.py), run here by Triton's interpreter: the same distribution as
# `sample`, noise that depends on a row's seed alone, greedy rows untouched.


FUSED_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # compiled on a GPU, else the interpreter (conftest)


def fused_sampler():
    pytest.importorskip("triton")
    from reference import fused_sampling
    from reference.triton_compat import patch_interpreter

    patch_interpreter()
    return fused_sampling


def fused_frequencies(logits: list[float], params: SamplingParams, mutate=None) -> torch.Tensor:
    """Empirical frequencies of NUM_DRAWS draws of the fused sampler from one row (NUM_DRAWS unseeded rows).
    mutate(inv_temperatures, thresholds) may break the kernel's inputs, to show the test would notice."""
    fused = fused_sampler()
    batch = torch.tensor(logits, device=FUSED_DEVICE).expand(NUM_DRAWS, -1).contiguous()
    if mutate is None:
        tokens = fused.sample(batch, [params] * NUM_DRAWS, [None] * NUM_DRAWS)
    else:
        inv_temperatures = torch.full((NUM_DRAWS,), 1 / params.temperature, device=FUSED_DEVICE)
        thresholds = torch.full((NUM_DRAWS,), float("-inf"), device=FUSED_DEVICE)
        fused._cut_thresholds(thresholds, batch, [params] * NUM_DRAWS, [True] * NUM_DRAWS)
        inv_temperatures, thresholds = mutate(inv_temperatures, thresholds)
        seeds = torch.from_numpy(fused._unseeded_row_seeds(NUM_DRAWS)).to(FUSED_DEVICE)
        tokens = fused.race(batch, inv_temperatures, thresholds, seeds)
    return torch.bincount(tokens.cpu(), minlength=len(logits)).double() / NUM_DRAWS


def test_fused_sampler_row_inputs_arrive_in_one_buffer_unchanged():
    # sample() sends seeds, inverse temperatures and (no cut) -inf thresholds in one copy of one byte buffer.
    fused = fused_sampler()
    seeds = np.array([2**62 + 3, -5, 0], dtype=np.int64)
    on_device, inv_temperatures, thresholds = fused._row_inputs(seeds, [1 / 0.6, 0.0, 2.5], torch.device("cpu"))
    assert on_device.tolist() == seeds.tolist()
    assert torch.equal(inv_temperatures, torch.tensor([1 / 0.6, 0.0, 2.5], dtype=torch.float32))
    assert thresholds.dtype == torch.float32 and torch.isneginf(thresholds).all()


@pytest.mark.parametrize("batch", [1, 2, 3, 5, 6, 7, 8])
def test_fused_sampler_row_inputs_start_16_byte_aligned_for_every_batch(batch):
    # Triton compiles its kernels again for each pointer alignment: parts aligned only for some batch sizes made
    # a timed call compile both sampling kernels (a first odd batch after a warm-up of even ones).
    seeds = np.arange(batch, dtype=np.int64)
    parts = fused_sampler()._row_inputs(seeds, [1.0] * batch, torch.device("cpu"))
    base = parts[0].data_ptr()
    assert [(part.data_ptr() - base) % 16 for part in parts] == [0, 0, 0]
    assert [part.numel() for part in parts] == [batch] * 3
    assert parts[0].tolist() == seeds.tolist() and parts[1].tolist() == [1.0] * batch


FUSED_SETTINGS = [  # (temperature, top_k, top_p) on NUCLEUS_LOGITS; each case's kept set is named
    (0.6, -1, 1.0),  # the benchmark's: temperature alone, all five tokens
    (2.0, -1, 1.0),
    (1.0, 2, 1.0),  # {0, 1}
    (1.0, -1, 0.85),  # {0, 1, 2}
    (2.0, 3, 0.7),  # {0, 1}: top-p after top-k on the scaled distribution
]


@pytest.mark.parametrize("temperature, top_k, top_p", FUSED_SETTINGS)
def test_fused_sampler_draws_the_distribution_of_the_slow_sampler(temperature, top_k, top_p):
    expected = reference_distribution(NUCLEUS_LOGITS, temperature, top_k, top_p)
    params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p)
    assert_frequencies_match(fused_frequencies(NUCLEUS_LOGITS, params), expected)


@pytest.mark.parametrize("mistake, mutate", [
    ("temperature forgotten", lambda inv_t, thr: (torch.ones_like(inv_t), thr)),
    ("top-k / top-p cut forgotten", lambda inv_t, thr: (inv_t, torch.full_like(thr, float("-inf")))),
    ("temperature applied twice", lambda inv_t, thr: (inv_t * inv_t, thr)),
])
def test_the_distribution_test_catches_a_wrong_fused_sampler(mistake, mutate):
    # The power of the test above: the same check fails when the kernel gets what a plausible bug would give it.
    params = SamplingParams(temperature=0.6, top_k=3, top_p=0.9)
    expected = reference_distribution(NUCLEUS_LOGITS, 0.6, 3, 0.9)
    assert_frequencies_match(fused_frequencies(NUCLEUS_LOGITS, params), expected)
    with pytest.raises(AssertionError):
        assert_frequencies_match(fused_frequencies(NUCLEUS_LOGITS, params, mutate), expected)


def test_fused_sampler_keeps_greedy_rows_argmax_with_ties_in_a_mixed_batch():
    fused = fused_sampler()
    logits = (torch.randn(6, 3000) * 2).to(FUSED_DEVICE, torch.bfloat16)  # bfloat16: many exact ties, the first wins
    edge = fused.MAX_TILE  # the first column of the second tile
    logits[1, edge - 1:edge + 2] = logits[1].max() + 1  # a three-way tie for the top, across a tile boundary
    logits[3, edge + 1:edge + 3] = logits[3].max() + 1  # a tie inside a tile that is not the first
    params = [SamplingParams(temperature=0.0 if i % 2 else 0.8) for i in range(6)]
    tokens = fused.sample(logits, params, [None] * 6)
    assert torch.equal(tokens[1::2], logits[1::2].argmax(dim=-1))  # torch.argmax: the first of tied maxima
    assert tokens[1].item() == edge - 1 and tokens[3].item() == edge + 1


def test_fused_first_round_gives_each_tiles_logsumexp_and_top():
    # The slow twin of the first kernel: torch's logsumexp and max over each tile of the kept, scaled row.
    fused = fused_sampler()
    tile = fused.MAX_TILE
    logits = (torch.randn(4, 2 * tile + 300) * 3).to(torch.bfloat16)  # bfloat16: ties; the last tile ragged
    logits[2, tile + 5] = float("nan")  # never drawn, never the top
    inv_t = torch.tensor([1 / 0.6, 0.0, 1.0, 1 / 1.3])
    thresholds = torch.tensor([float("-inf"), float("-inf"), 0.5, 2.0])
    x = logits.float() * inv_t[:, None]
    x[1] = logits[1].float()  # greedy: the raw logits
    x = x.masked_fill(~(logits.float() >= thresholds[:, None]), float("-inf"))
    for splits in (1, 2, 3):
        log_mass, top = (t.cpu() for t in fused.tile_stats(
            logits.to(FUSED_DEVICE), inv_t.to(FUSED_DEVICE), thresholds.to(FUSED_DEVICE), num_splits=splits))
        for t, chunk in enumerate(x.split(tile, dim=1)):
            torch.testing.assert_close(log_mass[:, t], torch.logsumexp(chunk, dim=1), rtol=1e-5, atol=1e-5)
            assert torch.equal(top[:, t], chunk.max(dim=1).values), f"tile {t}, {splits} splits"


@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_fused_sampler_races_tiles_by_their_whole_mass(temperature, monkeypatch):
    # The second round races tiles by log-mass, then the winner's columns. A plausible mistake, racing the tiles by
    # their largest logit alone, would draw the first tile's two tokens too rarely: the test tells the two apart.
    fused = fused_sampler()
    tile = 8  # tiles of 8 columns: three of them in a 21-column row, cheap for the interpreter's 20,000 rows
    monkeypatch.setattr(fused, "MAX_TILE", tile)
    columns = [3, tile - 1, 2 * tile - 1, 2 * tile + 2, 2 * tile + 4]  # NUCLEUS_LOGITS' tokens: tiles 0, 0, 1, 2, 2
    row = torch.full((2 * tile + 5,), -40.0)  # every other column: no mass to speak of
    row[columns] = torch.tensor(NUCLEUS_LOGITS)
    tokens = fused.sample(row.to(FUSED_DEVICE).expand(NUM_DRAWS, -1).contiguous(),
                          [SamplingParams(temperature=temperature)] * NUM_DRAWS, [None] * NUM_DRAWS).cpu()
    frequencies = torch.bincount(tokens, minlength=row.numel()).double()[columns] / NUM_DRAWS
    expected = reference_distribution(NUCLEUS_LOGITS, temperature, -1, 1.0)
    assert_frequencies_match(frequencies, expected)
    weights = [math.exp(x / temperature) for x in NUCLEUS_LOGITS]
    by_top = [weights[0], weights[2], weights[3]]  # each tile's largest weight
    tile_of = [0, 0, 1, 2, 2]
    tile_mass = [weights[0] + weights[1], weights[2], weights[3] + weights[4]]
    mistaken = [by_top[tile_of[i]] / sum(by_top) * weights[i] / tile_mass[tile_of[i]] for i in range(5)]
    with pytest.raises(AssertionError):
        assert_frequencies_match(frequencies, mistaken)


def test_fused_seeded_row_does_not_depend_on_the_batch_or_the_launch():
    fused = fused_sampler()
    from reference.sampling import seed_state

    vocab = 2500  # three blocks of columns: the last one ragged
    target = torch.randn(vocab, device=FUSED_DEVICE)
    params = SamplingParams(temperature=0.9, top_k=200, top_p=0.95, seed=42)
    alone = [fused.sample(target[None], [params], [seed_state(42, 0, pos)]).item() for pos in range(6)]
    assert len(set(alone)) >= 4  # the positions draw differently
    others = [SamplingParams(), SamplingParams(temperature=0), SamplingParams(top_k=3, seed=7)]
    for position in range(6):
        batch_size = 2 + position % 3
        row = position % batch_size
        logits = torch.randn(batch_size, vocab, device=FUSED_DEVICE)
        logits[row] = target
        params_batch = [others[(i + position) % 3] for i in range(batch_size)]
        params_batch[row] = params
        seeds = [seed_state(p.seed, 0, 99) if p.seed is not None else None for p in params_batch]
        seeds[row] = seed_state(42, 0, position)
        for splits in (1, 2):
            inv_t = torch.tensor([0.0 if p.greedy else 1 / p.temperature for p in params_batch], device=FUSED_DEVICE)
            thresholds = torch.full((batch_size,), float("-inf"), device=FUSED_DEVICE)
            fused._cut_thresholds(thresholds, logits, params_batch, [not p.greedy for p in params_batch])
            seed_tensor = torch.tensor([s if s is not None else 5 for s in seeds], device=FUSED_DEVICE)
            tokens = fused.race(logits, inv_t, thresholds, seed_tensor, num_splits=splits)
            assert tokens[row].item() == alone[position], f"position {position}, row {row}, {splits} splits"


def test_fused_unseeded_rows_follow_torch_manual_seed():
    fused = fused_sampler()
    logits = torch.randn(4, 700, device=FUSED_DEVICE)
    params = [SamplingParams(temperature=1.0)] * 4
    torch.manual_seed(3)
    first = fused.sample(logits, params, [None] * 4)
    torch.manual_seed(3)
    assert torch.equal(fused.sample(logits, params, [None] * 4), first)


def test_seed_state_is_what_seeded_generator_seeds_with():
    from reference.sampling import seed_state

    assert seeded_generator(5, 1, 9, "cpu").initial_seed() == seed_state(5, 1, 9)
    with pytest.raises(ValueError, match="position"):
        seed_state(5, 1, -1)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_sampler_on_the_gpu_draws_the_slow_samplers_distribution(dtype):
    from reference import fused_sampling

    for temperature, top_k, top_p in FUSED_SETTINGS:
        logits = torch.tensor(NUCLEUS_LOGITS, dtype=dtype)
        expected = reference_distribution(logits.float().tolist(), temperature, top_k, top_p)
        params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p)
        batch = logits.cuda().expand(NUM_DRAWS, -1).contiguous()
        tokens = fused_sampling.sample(batch, [params] * NUM_DRAWS, [None] * NUM_DRAWS).cpu()
        assert_frequencies_match(torch.bincount(tokens, minlength=5).double() / NUM_DRAWS, expected)


@pytest.mark.gpu
def test_fused_sampler_on_the_gpu_matches_the_interpreters_tokens_on_a_real_vocabulary():
    # Same seeds, same Philox words, same arithmetic up to float rounding: a 152k-column row draws the same token
    # compiled and interpreted (the interpreter runs in a subprocess: TRITON_INTERPRET is read at import).
    import subprocess
    import sys

    from reference import fused_sampling
    from reference.sampling import seed_state

    logits = torch.randn(3, 151936, generator=torch.Generator().manual_seed(0)) * 3
    params = [SamplingParams(temperature=0.6), SamplingParams(temperature=1.0, top_p=0.9), SamplingParams(temperature=0)]
    seeds = [seed_state(1, 0, 5), seed_state(2, 0, 5), None]
    gpu = fused_sampling.sample(logits.cuda().bfloat16(), params, seeds).tolist()
    script = (
        "import os, sys, torch; os.environ['TRITON_INTERPRET'] = '1'\n"
        "from reference import fused_sampling; from reference.triton_compat import patch_interpreter\n"
        "from reference.sampling import SamplingParams, seed_state; patch_interpreter()\n"
        "logits = torch.randn(3, 151936, generator=torch.Generator().manual_seed(0)) * 3\n"
        "params = [SamplingParams(temperature=0.6), SamplingParams(temperature=1.0, top_p=0.9),"
        " SamplingParams(temperature=0)]\n"
        "print(fused_sampling.sample(logits.bfloat16(), params, [seed_state(1, 0, 5), seed_state(2, 0, 5), None])"
        ".tolist())\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600,
                          env={**__import__("os").environ, "CUDA_VISIBLE_DEVICES": ""})
    assert done.returncode == 0, done.stderr[-2000:]
    assert eval(done.stdout.strip().splitlines()[-1]) == gpu


# SmolLM2's vocabulary; two chunks; not a multiple of the chunk (torch's own argmax then)
@pytest.mark.parametrize("vocab", [49152, 512, 1000])
def test_cpu_argmax_gives_torch_argmax_ids_with_ties_nan_and_infinities(vocab):
    from reference.sampling import argmax

    generator = torch.Generator().manual_seed(vocab)
    scores = torch.randn(12, vocab, generator=generator)
    scores[1, [7, vocab - 3]] = 9.0  # a tie: the first wins
    scores[2, [vocab // 2, 5]] = float("nan")  # NaN counts as the maximum, the first NaN wins
    scores[3] = float("-inf")  # all -inf: index 0
    scores[4, vocab - 1] = float("inf")
    scores[5] = 0.0  # all equal
    scores[6, 300 % vocab] = 1e30
    assert torch.equal(argmax(scores), scores.argmax(dim=-1))
