"""The speed floor: bytes that must move, counted by brute force, and the HF twin used as the bench baseline."""

from __future__ import annotations

import random

import pytest
import torch

from reference.speed_floor import Floor, copy_bandwidth, kv_tokens_read, parameter_bytes, workload_floor


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


def test_parameter_bytes_counts_a_tied_matrix_once():
    embed = torch.nn.Embedding(10, 4)
    head = torch.nn.Linear(4, 10, bias=False)
    head.weight = embed.weight
    model = torch.nn.ModuleDict({"embed": embed, "head": head})
    assert parameter_bytes(model) == 10 * 4 * 4


def test_copy_bandwidth_is_a_positive_rate():
    assert copy_bandwidth("cpu", size_bytes=8 << 20, repeats=2) > 1e6  # any machine copies more than 1 MB/s


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
