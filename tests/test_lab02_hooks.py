"""The pieces lab 0.2 adds to `reference` agree with the engine they describe.

- reference.costs: the FLOP and byte counts of a step match the model's parameters and the KV cache's size,
  and the machine measurements return sane, positive rates on CPU (and CUDA when present).
"""

from __future__ import annotations

import pytest
import torch

from reference import costs
from reference.config import ModelConfig
from reference.kv_cache import kv_bytes_per_token
from reference.models.llama import LlamaForCausalLM


def tiny_config(**fields) -> ModelConfig:
    base = dict(model_type="llama", vocab_size=50, hidden_size=24, intermediate_size=40, num_hidden_layers=3,
                num_attention_heads=6, num_key_value_heads=2, head_dim=8, tie_word_embeddings=False)
    return ModelConfig(**{**base, **fields})


def test_linear_params_are_the_model_linear_weights_including_the_lm_head():
    for tied in (False, True):
        config = tiny_config(tie_word_embeddings=tied)
        with torch.device("meta"):
            model = LlamaForCausalLM(config)
        linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
        assert costs.linear_params(config) == linear  # the tied head is one Linear sharing the embedding


def test_flops_per_token_is_two_per_weight_plus_four_per_head_dim_per_key():
    config = tiny_config()
    base = 2 * costs.linear_params(config)
    assert costs.flops_per_token(config, 1) == base + 4 * 3 * 6 * 8
    assert costs.flops_per_token(config, 10) - costs.flops_per_token(config, 9) == 4 * 3 * 6 * 8
    with pytest.raises(ValueError):
        costs.flops_per_token(config, 0)


def test_step_flops_of_a_prefill_is_the_sum_over_causal_positions_and_decodes_add_up():
    config = tiny_config()
    prefill = costs.step_flops(config, [5], [5])
    assert prefill == sum(costs.flops_per_token(config, n) for n in range(1, 6))
    chunk = costs.step_flops(config, [3], [8])  # positions 5, 6, 7 of a sequence: 6, 7, 8 keys
    assert chunk == sum(costs.flops_per_token(config, n) for n in (6, 7, 8))
    assert costs.step_flops(config, [1, 1], [4, 9]) == (costs.flops_per_token(config, 4)
                                                        + costs.flops_per_token(config, 9))
    with pytest.raises(ValueError):
        costs.step_flops(config, [4], [3])


def test_step_bytes_read_weights_once_and_kv_per_token_like_the_cache():
    config = tiny_config()
    assert costs.kv_bytes_per_token(config, 4) == kv_bytes_per_token(config, torch.float32)
    assert costs.kv_bytes_per_token(config, 2) == kv_bytes_per_token(config, torch.bfloat16)
    weights = 2 * costs.linear_params(config)
    one = costs.step_bytes(config, [1], [10], 2)
    two = costs.step_bytes(config, [1, 1], [10, 10], 2)
    assert one == weights + 11 * costs.kv_bytes_per_token(config, 2)
    assert two - one == one - weights  # a second sequence adds only its own K/V traffic


def test_decode_intensity_grows_with_batch_and_prefill_is_far_more_intense():
    config = tiny_config(hidden_size=256, intermediate_size=512, head_dim=32, num_attention_heads=8,
                         num_key_value_heads=2)
    single = costs.arithmetic_intensity(config, [1], [64], 2)
    batch = costs.arithmetic_intensity(config, [1] * 16, [64] * 16, 2)
    prefill = costs.arithmetic_intensity(config, [64], [64], 2)
    assert single < batch < prefill
    assert single == pytest.approx(costs.step_flops(config, [1], [64]) / costs.step_bytes(config, [1], [64], 2))


def measure_devices():
    return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", measure_devices())
def test_machine_measurements_are_positive_rates(device):
    flops = costs.measure_matmul_flops(device, torch.float32, size=256, repeats=2)
    bandwidth = costs.measure_memory_bandwidth(device, nbytes=1 << 24, repeats=2)
    assert 1e8 < flops < 1e16 and 1e8 < bandwidth < 1e14
