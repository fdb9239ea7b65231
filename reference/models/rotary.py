"""Rotary position embedding (RoPE), including Llama 3's frequency scaling.

Each pair of dimensions (i, i + head_dim/2) of a query or key is rotated by the angle position * inv_freq[i].
Because a rotation by a and one by b differ by a rotation by a - b, the dot product q.k then depends only on
the distance between the two positions. cos/sin are tabulated once per position (float32) and grown on demand.
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
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.register_buffer("inv_freq", rope_inverse_frequencies(config), persistent=False)
        self._cos = self._sin = None  # [max_position, head_dim] tables, built lazily on the right device

    def _table(self, needed: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        if self._cos is None or self._cos.shape[0] < needed or self._cos.device != device:
            size = max(needed, 2 * (0 if self._cos is None else self._cos.shape[0]), 4096)
            angles = torch.arange(size, device=device, dtype=torch.float32)[:, None] * self.inv_freq.to(device)
            angles = torch.cat((angles, angles), dim=-1)
            self._cos, self._sin = angles.cos(), angles.sin()
        return self._cos, self._sin

    def cos_sin(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """positions: int64 [num_tokens] -> cos, sin: float32 [num_tokens, 1, head_dim] (the 1 broadcasts over heads).

        Computed once per forward pass and shared by every layer.
        """
        max_position = int(positions.max()) + 1 if positions.numel() else 1
        cos_table, sin_table = self._table(max_position, positions.device)
        return cos_table[positions].unsqueeze(1), sin_table[positions].unsqueeze(1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x: [num_tokens, heads, head_dim] by the angles whose cos/sin are given (computed in x's dtype)."""
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return x * cos + rotate_half(x) * sin
