"""The contiguous KV cache's byte accounting equals the formula and the real tensor sizes."""

from __future__ import annotations

import pytest
import torch

from reference.config import ModelConfig
from reference.kv_cache import ContiguousKVCache, kv_bytes_per_token


def smollm2_like_config() -> ModelConfig:
    return ModelConfig(model_type="llama", vocab_size=100, hidden_size=576, intermediate_size=64,
                       num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3, head_dim=64)


@pytest.mark.parametrize("dtype, size", [(torch.float32, 4), (torch.float16, 2), (torch.bfloat16, 2)])
def test_bytes_per_token_is_2_layers_kvheads_headdim_dtype(dtype, size):
    config = smollm2_like_config()
    assert kv_bytes_per_token(config, dtype) == 2 * 30 * 3 * 64 * size
    if dtype == torch.float32:
        assert kv_bytes_per_token(config, dtype) == 45 * 1024  # SmolLM2's 45 KiB per token in fp32


def test_total_bytes_counts_every_allocated_tensor():
    config = smollm2_like_config()
    cache = ContiguousKVCache(config, max_batch=3, max_len=20, dtype=torch.float16, device="cpu")
    tensors = [t for pair in cache.layers for t in pair]
    assert len(tensors) == 2 * config.num_hidden_layers
    assert all(t.shape == (3, 20, 3, 64) and t.dtype == torch.float16 for t in tensors)
    assert cache.total_bytes == sum(t.untyped_storage().nbytes() for t in tensors)
    assert cache.total_bytes == cache.bytes_per_token * 3 * 20


def test_invalid_sizes_raise():
    with pytest.raises(ValueError, match="max_batch"):
        ContiguousKVCache(smollm2_like_config(), max_batch=0, max_len=4, dtype=torch.float32, device="cpu")
