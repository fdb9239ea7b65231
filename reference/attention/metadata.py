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

import itertools
from dataclasses import dataclass

import numpy as np
import torch

from ..kv.layout import batched_slot_mapping


@dataclass
class AttentionMetadata:
    cu_seqlens_q: torch.Tensor  # int32 [batch + 1]: sequence b's new tokens are q[cu[b]:cu[b+1]]
    query_lens: list[int]  # host copy of the per-sequence new-token counts
    # The fields below are None when there is no KV cache: attention then runs over this step's tokens only.
    context_lens: torch.Tensor | None = None  # int32 [batch]: cached tokens AFTER this step's store
    context_lens_host: list[int] | None = None
    slot_mapping: torch.Tensor | None = None  # int64 [num_tokens]: cache slot of each new token, -1 = skip
    block_tables: torch.Tensor | None = None  # int32 [batch, max_blocks]: unused entries are -1
    # block_tables with unused entries 0, a real block, for kernels that want a block id in every entry (FlashAttention
    # 4's page table); built once per step here rather than once per layer by the backend.
    page_table: torch.Tensor | None = None
    # int32 [batch], decode steps only: the order the decode kernel starts the sequences in (longest context first,
    # see triton_ops.paged_decode_attention); None: batch order. Outputs do not depend on it.
    decode_order: torch.Tensor | None = None

    @property
    def batch_size(self) -> int:
        return len(self.query_lens)

    @property
    def max_query_len(self) -> int:
        return max(self.query_lens, default=0)

    @property
    def uses_cache(self) -> bool:
        return self.slot_mapping is not None

    @property
    def is_decode(self) -> bool:
        """Every sequence brings exactly one new token (the decode kernels' steps)."""
        return bool(self.query_lens) and all(n == 1 for n in self.query_lens)


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

    Token t of the packed batch, the i-th new token of sequence b, sits at position
    context_lens[b] - query_lens[b] + i and goes to slot block_tables[b][pos // block_size] * block_size +
    pos % block_size. Computed with numpy array ops on the host (a Python loop over 8k tokens per step is slow).
    """
    # numpy, not torch, for these host arrays: on a few thousand int64s torch's per-op cost dominates (a mixed step
    # of 8,192 tokens took ~30 ms to describe with torch ops, longer than the GPU took to run it).
    lens = np.asarray(query_lens, dtype=np.int64)
    cu_seqlens = np.zeros(len(lens) + 1, dtype=np.int64)
    np.cumsum(lens, out=cu_seqlens[1:])
    # Which sequence each packed token belongs to, and its index among that sequence's new tokens.
    owner = np.repeat(np.arange(len(lens)), lens)
    offset_in_chunk = np.arange(cu_seqlens[-1]) - cu_seqlens[:-1][owner]
    if context_lens is None:
        metadata = AttentionMetadata(_to(cu_seqlens, device, torch.int32), list(query_lens))
        return _to(offset_in_chunk, device), metadata

    if block_tables is None or block_size is None:
        raise ValueError("a cached step needs block_tables and block_size")
    positions = (np.asarray(context_lens, dtype=np.int64) - lens)[owner] + offset_in_chunk
    num_blocks = np.fromiter(map(len, block_tables), dtype=np.int64, count=len(block_tables))
    tables = np.full((len(block_tables), int(num_blocks.max(initial=0))), -1, dtype=np.int64)
    tables[np.arange(tables.shape[1]) < num_blocks[:, None]] = np.fromiter(
        itertools.chain.from_iterable(block_tables), dtype=np.int64, count=int(num_blocks.sum()))
    slots = batched_slot_mapping(tables, owner, positions, block_size)
    metadata = AttentionMetadata(
        cu_seqlens_q=_to(cu_seqlens, device, torch.int32),
        query_lens=list(query_lens),
        context_lens=_to(np.asarray(context_lens), device, torch.int32),
        context_lens_host=list(context_lens),
        slot_mapping=_to(slots, device),
        block_tables=_to(tables, device, torch.int32),
        page_table=_to(np.maximum(tables, 0), device, torch.int32),
    )
    return _to(positions, device), metadata


def _to(array: np.ndarray, device: torch.device | str, dtype: torch.dtype = torch.int64) -> torch.Tensor:
    """A host array as a torch tensor of `dtype` on `device`."""
    return torch.from_numpy(np.ascontiguousarray(array)).to(device, dtype)
