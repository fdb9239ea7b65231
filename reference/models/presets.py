"""Architectures of real models, for random-initialised stand-ins (`model="random:qwen3-0.6b"`).

Benchmarks and notebooks need real shapes without downloading weights: a random model of the right shape
costs exactly as much memory and time as the real one. The numbers are the published configurations.
"""

from __future__ import annotations

import torch

from ..config import ModelConfig

ARCHITECTURES: dict[str, dict] = {
    "smollm2-135m": dict(
        model_type="llama", vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
        num_attention_heads=9, num_key_value_heads=3, head_dim=64, rms_norm_eps=1e-5, rope_theta=100000.0,
        max_position_embeddings=8192, tie_word_embeddings=True,
    ),
    "qwen3-0.6b": dict(
        model_type="qwen3", vocab_size=151936, hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
        num_attention_heads=16, num_key_value_heads=8, head_dim=128, rms_norm_eps=1e-6, rope_theta=1000000.0,
        max_position_embeddings=40960, tie_word_embeddings=True, qk_norm=True,
    ),
    "llama-3-8b": dict(
        model_type="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, head_dim=128, rms_norm_eps=1e-5, rope_theta=500000.0,
        max_position_embeddings=8192, tie_word_embeddings=False,
    ),
}


def preset_config(name: str) -> ModelConfig:
    if name not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {name!r}; known: {', '.join(ARCHITECTURES)}")
    return ModelConfig(**ARCHITECTURES[name])


@torch.no_grad()
def randomize_weights(model: torch.nn.Module, seed: int = 0, std: float = 0.02) -> None:
    """Normal(0, std) matrices, zero biases, unit norms: the usual initialisation, reproducible by seed."""
    generator = torch.Generator(device="cpu").manual_seed(seed)
    for name, param in model.named_parameters():
        if name.endswith("norm.weight"):
            param.fill_(1.0)
        elif name.endswith("bias"):
            param.zero_()
        else:
            values = torch.randn(param.shape, generator=generator, dtype=torch.float32) * std
            param.copy_(values)
