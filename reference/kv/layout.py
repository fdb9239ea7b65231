"""The KV cache's layout, written once: how many blocks a length needs, which slot a token's K/V lives in, how
many bytes a token costs, and the cache tensors themselves.

Every cache in the engine has the paged layout: per layer, one K and one V tensor of shape
[num_blocks, block_size, kv_heads, head_dim]. A slot is one token position in it, slot = block_id * block_size
+ offset; a sequence's block table lists its blocks in order, so the token at position p lives in slot
block_table[p // block_size] * block_size + p % block_size. The contiguous cache is the special case of one
block of max_len slots per sequence row.
"""

from __future__ import annotations

import torch

from ..config import ModelConfig

# Per layer: (K, V), each [num_blocks, block_size, kv_heads, head_dim].
KVCaches = list[tuple[torch.Tensor, torch.Tensor]]


def blocks_for_tokens(num_tokens: int, block_size: int) -> int:
    """Blocks that hold num_tokens tokens: ceil(num_tokens / block_size)."""
    return -(-num_tokens // block_size)


def kv_bytes_per_token(config: ModelConfig, dtype: torch.dtype | int) -> int:
    """Bytes of K and V one token occupies across all layers: 2 x layers x kv_heads x head_dim x dtype size.

    dtype: a torch dtype, or its size in bytes (the cost model of lab 0.2 counts in bytes)."""
    element_size = dtype if isinstance(dtype, int) else torch.empty((), dtype=dtype).element_size()
    return 2 * config.num_hidden_layers * config.num_key_value_heads * config.head_dim * element_size


def batched_slot_mapping(block_tables, owner, positions, block_size: int):
    """Cache slot of each token of a packed batch: block_tables[owner, pos // bs] * bs + pos % bs (bs: block_size).

    block_tables: [batch, max_blocks] (torch tensor or numpy array); owner: [num_tokens], the row of each
    token's sequence; positions: [num_tokens], each token's position in its sequence. Same type out."""
    return block_tables[owner, positions // block_size] * block_size + positions % block_size


def slot_mapping(block_table: list[int], positions: torch.Tensor, block_size: int) -> torch.Tensor:
    """Cache slot of each position of one sequence (lab 0.3).

    block_table: the sequence's block ids in order; positions: int64 [n], each >= 0 or -1 (padding).
    Returns int64 [n]: block_table[p // block_size] * block_size + p % block_size, and -1 where p == -1.
    Raises ValueError when a position's block is not in the table (past its end, or an entry of -1).
    """
    positions = torch.as_tensor(positions, dtype=torch.int64)
    table = torch.tensor([list(block_table) + [-1]], dtype=torch.int64)  # the extra -1 catches "past the end"
    padding = positions < 0
    safe = torch.where(padding, 0, positions).clamp(max=(table.shape[1] - 1) * block_size)
    blocks = table[0, safe // block_size]
    if bool(((blocks < 0) & ~padding).any()):
        bad = int(positions[(blocks < 0) & ~padding][0])
        raise ValueError(f"position {bad} needs block {bad // block_size} of a table with {len(block_table)} "
                         f"entries {list(block_table)}")
    slots = batched_slot_mapping(table, torch.zeros_like(safe), safe, block_size)
    return torch.where(padding, torch.full_like(slots, -1), slots)


def allocate_kv_caches(config: ModelConfig, num_blocks: int, block_size: int, dtype: torch.dtype,
                       device: str | torch.device) -> KVCaches:
    """Zeroed K and V tensors for every layer, [num_blocks, block_size, kv_heads, head_dim] each."""
    shape = (num_blocks, block_size, config.num_key_value_heads, config.head_dim)
    return [(torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device))
            for _ in range(config.num_hidden_layers)]


def kv_caches_bytes(kv_caches: KVCaches) -> int:
    """Bytes the cache tensors occupy."""
    return sum(t.numel() * t.element_size() for pair in kv_caches for t in pair)
