"""The contiguous KV cache of lab 0.1: one preallocated K and V tensor per layer for a batch of sequences.

Row r of the cache holds sequence r's keys and values at positions 0 .. max_len - 1, reserved up front
whether or not the sequence ever gets that long (the waste lab 0.3's paged cache removes). Its tensors have
the paged layout [num_blocks, block_size, kv_heads, head_dim] with one block per row and
block_size = max_len, so the same attention code reads both caches: row r's block table is just [r].
"""

from __future__ import annotations

import torch

from ..config import ModelConfig
from .layout import allocate_kv_caches, kv_bytes_per_token, kv_caches_bytes


class ContiguousKVCache:
    def __init__(
        self, config: ModelConfig, max_batch: int, max_len: int, dtype: torch.dtype, device: str | torch.device
    ) -> None:
        if max_batch < 1 or max_len < 1:
            raise ValueError(f"max_batch and max_len must be >= 1, got {max_batch} and {max_len}")
        self.config, self.max_batch, self.max_len, self.dtype = config, max_batch, max_len, dtype
        self.layers = allocate_kv_caches(config, max_batch, max_len, dtype, device)

    @property
    def block_size(self) -> int:
        """Seen as a paged cache, each row is one block of max_len slots."""
        return self.max_len

    def block_table(self, row: int) -> list[int]:
        return [row]

    @property
    def bytes_per_token(self) -> int:
        return kv_bytes_per_token(self.config, self.dtype)

    @property
    def total_bytes(self) -> int:
        """Bytes actually allocated: every row reserves max_len tokens."""
        return kv_caches_bytes(self.layers)
