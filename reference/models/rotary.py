"""Rotary position embedding (RoPE), including Llama 3's frequency scaling.

Each pair of dimensions (i, i + head_dim/2) of a query or key is rotated by the angle position * inv_freq[i].
Because a rotation by a and one by b differ by a rotation by a - b, the dot product q.k then depends only on
the distance between the two positions. cos/sin are tabulated once per position (float32).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..config import ModelConfig


def rope_inverse_frequencies(config: ModelConfig) -> torch.Tensor:
    """inv_freq[i] = theta^(-2i / head_dim), float32 [head_dim // 2], with Llama 3 scaling when configured."""
    dim = config.head_dim
    exponents = torch.arange(0, dim, 2, dtype=torch.int64).float() / dim
    inv_freq = 1.0 / (config.rope_theta**exponents)
    if config.rope_scaling is None:
        return inv_freq
    # Llama 3: long wavelengths (low frequencies) are slowed down by `factor`, short ones are kept, and the band
    # in between is interpolated smoothly, so the model reaches longer contexts without retraining short range.
    s = config.rope_scaling
    factor = s["factor"]
    low, high = s.get("low_freq_factor", 1.0), s.get("high_freq_factor", 4.0)
    original_len = s["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > original_len / low, inv_freq / factor, inv_freq)
    smooth = (original_len / wavelen - low) / (high - low)
    interpolated = (1 - smooth) * scaled / factor + smooth * scaled
    in_band = (wavelen >= original_len / high) & (wavelen <= original_len / low)
    return torch.where(in_band, interpolated, scaled)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """(x1, x2) -> (-x2, x1) on the two halves of the last dimension."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class RotaryEmbedding(nn.Module):
    """cos/sin of every position's angles, tabulated once (float32) for the model's whole context length.

    A table lookup needs no data-dependent shapes or host syncs, so it can run inside a CUDA graph.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        inv_freq = rope_inverse_frequencies(config)
        angles = torch.arange(config.max_position_embeddings, dtype=torch.float32)[:, None] * inv_freq
        angles = torch.cat((angles, angles), dim=-1)  # [max_position, head_dim]: both halves rotate together
        # Plain attributes, not buffers: model.to(bfloat16) must not round the tables.
        self.cos_table, self.sin_table = angles.cos(), angles.sin()

    def cos_sin(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """positions: int64 [num_tokens] -> cos, sin: float32 [num_tokens, 1, head_dim] (the 1 broadcasts over heads).

        Computed once per forward pass and shared by every layer.
        """
        if self.cos_table.device != positions.device:
            self.cos_table, self.sin_table = self.cos_table.to(positions.device), self.sin_table.to(positions.device)
        return self.cos_table[positions].unsqueeze(1), self.sin_table[positions].unsqueeze(1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x: [num_tokens, heads, head_dim] by the angles whose cos/sin are given (computed in x's dtype)."""
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return x * cos + rotate_half(x) * sin
