"""The contiguous KV cache of lab 0.1: one preallocated K and V tensor per layer for a batch of sequences.

Row r of the cache holds sequence r's keys and values at positions 0 .. max_len - 1, reserved up front
whether or not the sequence ever gets that long (the waste lab 0.3's paged cache removes). Its tensors have
the paged layout [num_blocks, block_size, kv_heads, head_dim] with one block per row and
block_size = max_len, so the same attention code reads both caches: row r's block table is just [r].

The code lives in reference/kv/ (contiguous.py, layout.py); this module keeps the name the lab 0.1 notebooks import.
"""

from .kv.contiguous import ContiguousKVCache
from .kv.layout import kv_bytes_per_token

__all__ = ["ContiguousKVCache", "kv_bytes_per_token"]
