"""The speed floor (reference.costs): bytes that must move, counted by brute force, and the HF twin used as the
bench baseline."""

from __future__ import annotations

import random

import pytest
import torch

from reference.costs import kv_tokens_read, linear_params, weight_bytes, workload_floor


def test_kv_tokens_read_matches_a_token_by_token_count():
    rng = random.Random(0)
    inputs = [rng.randint(1, 50) for _ in range(20)]
    outputs = [rng.randint(1, 50) for _ in range(20)]
    # Output token i attends over the prompt and the i outputs before it.
    brute = sum(p + i for p, o in zip(inputs, outputs) for i in range(o))
    assert kv_tokens_read(inputs, outputs) == brute


def test_floor_adds_kv_and_one_weight_read_per_decode_step():
    floor = workload_floor([10, 20], [3, 5], kv_bytes_per_token=100, weight_bytes=1000, bandwidth=1e4)
    kv = (3 * 10 + 3) + (5 * 20 + 10)
    assert floor.kv_bytes == kv * 100 and floor.weight_bytes == 5 * 1000
    assert floor.seconds == pytest.approx((kv * 100 + 5000) / 1e4)
    assert floor.fraction(2 * floor.seconds) == pytest.approx(0.5)
    assert "reached 0.50" in floor.describe(2 * floor.seconds)


def test_the_floor_reads_the_weights_the_cost_model_counts():
    from reference.models.presets import preset_config

    config = preset_config("smollm2-135m")
    assert weight_bytes(config, 2) == 2 * linear_params(config)  # one definition, shared with step_bytes


def test_hf_twin_of_a_random_model_has_the_same_logits():
    from reference.bench import hf_twin
    from reference.models import load_model

    model, _ = load_model("random:smollm2-135m")
    twin = hf_twin(model, "random:smollm2-135m").eval()
    ids = torch.tensor([[1, 5, 9, 200, 3000, 7]])
    from reference.attention import build_metadata

    positions, metadata = build_metadata([ids.shape[1]], None, None, None, "cpu")
    with torch.no_grad():
        ours = model.compute_logits(model(ids[0], positions, metadata))
        theirs = twin(ids).logits[0]
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)
