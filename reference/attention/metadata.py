"""AttentionMetadata: everything attention needs to know about one forward pass, built once per step.

A step runs ONE forward pass over a packed batch: the new tokens of every scheduled sequence concatenated
into a single [num_tokens] vector. Attention must know where each sequence starts (cu_seqlens_q), how long its
context is once this step's tokens are in the cache (context_lens), where each new token's K/V goes
(slot_mapping) and where each sequence's earlier K/V lives (block_tables). The model never sees sequences or
schedulers, only this object. This module owns the object and the one function that builds it.

Cache layout (per layer, for K and for V): [num_blocks, block_size, kv_heads, head_dim]. A "slot" is one
token position in that cache: slot = block_id * block_size + offset. The contiguous cache of lab 0.1 is the
special case block_size = max_model_len with one block per sequence row.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class AttentionMetadata:
    cu_seqlens_q: torch.Tensor  # int32 [batch + 1]: sequence b's new tokens are q[cu[b]:cu[b+1]]
    query_lens: list[int]  # host copy of the per-sequence new-token counts
    # The fields below are None when there is no KV cache: attention then runs over this step's tokens only.
    context_lens: torch.Tensor | None = None  # int32 [batch]: cached tokens AFTER this step's store
    context_lens_host: list[int] | None = None
    slot_mapping: torch.Tensor | None = None  # int64 [num_tokens]: cache slot of each new token, -1 = skip
    block_tables: torch.Tensor | None = None  # int32 [batch, max_blocks]: unused entries are -1

    @property
    def batch_size(self) -> int:
        return len(self.query_lens)

    @property
    def max_query_len(self) -> int:
        return max(self.query_lens, default=0)

    @property
    def uses_cache(self) -> bool:
        return self.slot_mapping is not None


def build_metadata(
    query_lens: list[int],
    context_lens: list[int] | None,
    block_tables: list[list[int]] | None,
    block_size: int | None,
    device: torch.device | str,
) -> tuple[torch.Tensor, AttentionMetadata]:
    """Build positions and attention metadata for one packed step.

    query_lens[b]: new tokens of sequence b in this step (a prefill chunk, or 1 for a decode).
    context_lens[b]: tokens of sequence b in the cache after this step (so its new tokens sit at positions
        context_lens[b] - query_lens[b] ... context_lens[b] - 1). None means "no cache": every sequence's new
        tokens are its whole context, starting at position 0.
    block_tables[b]: the cache blocks of sequence b, in order. Returns (positions [num_tokens] int64, metadata).
    """
    cu = [0]
    for n in query_lens:
        cu.append(cu[-1] + n)
    cu_seqlens_q = torch.tensor(cu, dtype=torch.int32, device=device)
    if context_lens is None:
        positions = [p for n in query_lens for p in range(n)]
        return torch.tensor(positions, dtype=torch.int64, device=device), AttentionMetadata(cu_seqlens_q, list(query_lens))

    if block_tables is None or block_size is None:
        raise ValueError("a cached step needs block_tables and block_size")
    positions, slots = [], []
    for n, ctx, table in zip(query_lens, context_lens, block_tables):
        for pos in range(ctx - n, ctx):
            positions.append(pos)
            slots.append(table[pos // block_size] * block_size + pos % block_size)
    width = max((len(t) for t in block_tables), default=0)
    padded_tables = [list(t) + [-1] * (width - len(t)) for t in block_tables]
    metadata = AttentionMetadata(
        cu_seqlens_q=cu_seqlens_q,
        query_lens=list(query_lens),
        context_lens=torch.tensor(context_lens, dtype=torch.int32, device=device),
        context_lens_host=list(context_lens),
        slot_mapping=torch.tensor(slots, dtype=torch.int64, device=device),
        block_tables=torch.tensor(padded_tables, dtype=torch.int32, device=device).reshape(len(block_tables), width),
    )
    return torch.tensor(positions, dtype=torch.int64, device=device), metadata
