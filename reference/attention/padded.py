"""Attention for the CPU: the whole step as one padded batch through torch's SDPA (attention_backend="padded").

torch_ref.py loops over the sequences of a step in Python, and every sequence is a handful of small ops per
layer: with 48 sequences and 30 layers that is thousands of tiny ops a step, and on a CPU their overhead is
most of the step. Here a step's sequences are split into two groups, decodes (one new token) and the rest
(prefill chunks), and each group is ONE batched operation per layer:

1. gather each sequence's blocks through its block table into a padded [batch, kv_heads, max_context, head_dim]
   K and V (one index into the cache);
2. lay the queries out padded too, [batch, kv_heads, group x max_query, head_dim], the `group` query heads that
   share a KV head (GQA) folded into the query axis, so K and V are never repeated per query head;
3. one scaled_dot_product_attention with a boolean mask: query i of a sequence sits at position
   context_len - query_len + i and may see keys 0 .. that position; padding rows are dropped afterwards.
Decodes and prefills are kept apart so a 500-token chunk does not pad 47 one-token decodes to 500 rows each.

The index tensors and masks depend only on the step, not the layer, so they are built on the first layer's call
and reused by the others (`PaddedPlan`). Tested against torch_ref on random inputs (tests/test_padded_attention.py).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..kv.layout import blocks_for_tokens
from .metadata import AttentionMetadata
from .torch_ref import store_kvcache, varlen_attention


@dataclass
class PaddedGroup:
    """Some sequences of a step laid out as one padded batch."""

    rows: torch.Tensor | slice  # the packed-batch row of each real query, in padded order: int64 [tokens], or a
    # slice when they are consecutive (a view then, no copy: a step's decodes usually come first, in order)
    padded_index: torch.Tensor  # int64 [tokens]: where that query sits in the flattened [batch x max_query] grid
    batch: int
    max_query: int
    blocks: torch.Tensor  # int64 [batch x blocks]: block tables cut to the longest context, flat (-1 entries -> 0)
    # [batch, 1, share x max_query, context], in q's dtype: 0 = may attend, -inf = may not. (SDPA turns a boolean
    # mask into this in every call, i.e. every layer; made once here, it is the same numbers.)
    mask: torch.Tensor

    @classmethod
    def of(cls, seqs: list[int], metadata: AttentionMetadata, block_size: int, share: int,
           dtype: torch.dtype) -> "PaddedGroup":
        """The group of sequences `seqs` (indices into the step's batch); share = query heads per KV head;
        dtype: the queries'."""
        query_lens = [metadata.query_lens[b] for b in seqs]
        context_lens = [metadata.context_lens_host[b] for b in seqs]
        starts = [0, *itertools.accumulate(metadata.query_lens)]
        max_query, max_context = max(query_lens), max(context_lens)
        rows, padded_index = [], []
        for i, (b, q_len) in enumerate(zip(seqs, query_lens)):
            rows.extend(range(starts[b], starts[b] + q_len))
            padded_index.extend(range(i * max_query, i * max_query + q_len))
        tables = metadata.block_tables[seqs, : blocks_for_tokens(max_context, block_size)].long().clamp(min=0)
        first_query = torch.tensor(context_lens) - torch.tensor(query_lens)
        query_pos = first_query[:, None] + torch.arange(max_query)  # [batch, max_query]
        key_pos = torch.arange(tables.shape[1] * block_size)
        mask = key_pos[None, None, :] <= query_pos[:, :, None]  # causal; also hides slots past the context
        # The same mask for each of the `share` query heads folded into the query axis (see padded_group_attention);
        # a decode's one row broadcasts over them as it is.
        mask = mask[:, None].expand(-1, share, -1, -1).reshape(len(seqs), 1, share * max_query, -1) \
            if max_query > 1 else mask[:, None]
        additive = torch.zeros(mask.shape, dtype=dtype).masked_fill_(~mask, float("-inf"))
        consecutive = rows == list(range(rows[0], rows[0] + len(rows)))
        return cls(slice(rows[0], rows[0] + len(rows)) if consecutive else torch.tensor(rows),
                   torch.tensor(padded_index), len(seqs), max_query, tables.flatten(),
                   additive.to(metadata.block_tables.device))


class GatherBuffers:
    """Where the K/V gather writes, reused by every layer and step. A fresh 5 MB tensor per layer can be memory the
    allocator maps anew each time, and touching it page-faults: in a benchmark of 30 layers' gathers that took 3x
    as long as into a buffer that stays. The engine's own runs measured no difference (its allocator kept the
    memory), so this guards against the slow case (RESULTS.md, issue 21, 2026-12-01)."""

    def __init__(self) -> None:
        self.k: torch.Tensor | None = None
        self.v: torch.Tensor | None = None

    def take(self, cache: torch.Tensor, num_blocks: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Two [num_blocks, block_size, kv_heads, head_dim] tensors like cache's (views of the kept buffers)."""
        k = self.k
        if k is None or k.shape[0] < num_blocks or k.shape[1:] != cache.shape[1:] or k.dtype != cache.dtype \
                or k.device != cache.device:
            size = 1 << (num_blocks - 1).bit_length()  # a power of two: contexts grow a block at a time
            self.k, self.v = (cache.new_empty((size, *cache.shape[1:])) for _ in range(2))
        return self.k[:num_blocks], self.v[:num_blocks]


def padded_group_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, group: PaddedGroup,
                           scale: float, buffers: GatherBuffers | None = None) -> torch.Tensor:
    """Attention of the group's queries over their cached contexts. q: [tokens, heads, head_dim] (the step's packed
    queries); caches: [num_blocks, block_size, kv_heads, head_dim]; buffers: where to gather K/V (None: new
    tensors). Returns [group tokens, heads, head_dim], in the order of group.rows."""
    heads, head_dim = q.shape[1:]
    kv_heads = k_cache.shape[2]
    share = heads // kv_heads  # query heads per KV head (GQA)
    # K, V: [batch x blocks, block_size, kv_heads, d] -> [batch, kv_heads, context, d]. (index_select on a flat list
    # of blocks copies whole blocks; indexing with the 2-D table measured 1.7x slower for the same copy.)
    buffers = buffers or GatherBuffers()
    k, v = (torch.index_select(cache, 0, group.blocks, out=out).view(group.batch, -1, kv_heads, head_dim)
            .transpose(1, 2) for cache, out in zip((k_cache, v_cache), buffers.take(k_cache, len(group.blocks))))
    if group.max_query == 1:  # decodes: nothing to pad, and [batch, heads, d] is already [batch, kv_heads, share, d]
        queries = q[group.rows].view(group.batch, kv_heads, share, head_dim)
        out = F.scaled_dot_product_attention(queries, k, v, attn_mask=group.mask, scale=scale)
        return out.view(group.batch, heads, head_dim)
    queries = q.new_zeros(group.batch * group.max_query, heads, head_dim)
    queries[group.padded_index] = q[group.rows]
    # [batch, max_query, kv_heads, share, d] -> [batch, kv_heads, share x max_query, d]: one GQA group per KV head
    queries = queries.view(group.batch, group.max_query, kv_heads, share, head_dim).permute(0, 2, 3, 1, 4)
    queries = queries.reshape(group.batch, kv_heads, share * group.max_query, head_dim)
    out = F.scaled_dot_product_attention(queries, k, v, attn_mask=group.mask, scale=scale)
    out = out.view(group.batch, kv_heads, share, group.max_query, head_dim).permute(0, 3, 1, 2, 4)
    return out.reshape(group.batch * group.max_query, heads, head_dim)[group.padded_index]


@dataclass
class PaddedPlan:
    """A step's groups: the decodes, and the sequences with more than one new token."""

    groups: list[PaddedGroup]
    in_order: bool  # one group holding every sequence: its output rows are the step's rows as they are
    every_slot_used: bool  # no padding slot (-1) in the slot mapping: the store is one index_copy_

    @classmethod
    def of(cls, metadata: AttentionMetadata, block_size: int, share: int, dtype: torch.dtype) -> "PaddedPlan":
        decodes = [b for b, n in enumerate(metadata.query_lens) if n == 1]
        prefills = [b for b, n in enumerate(metadata.query_lens) if n > 1]
        groups = [PaddedGroup.of(seqs, metadata, block_size, share, dtype) for seqs in (decodes, prefills) if seqs]
        return cls(groups, len(groups) == 1, bool((metadata.slot_mapping >= 0).all()))


class PaddedAttentionBackend:
    """Store the new K/V, then attend with one padded SDPA call per group (see the module docstring)."""

    name = "padded"
    supports_cuda_graphs = False  # its plan reads the step's slot mapping on the host

    def __init__(self) -> None:
        self._plan_of: tuple[AttentionMetadata | None, PaddedPlan | None] = (None, None)
        self.buffers = GatherBuffers()

    def plan(self, metadata: AttentionMetadata, block_size: int, share: int, dtype: torch.dtype) -> PaddedPlan:
        """The step's plan, built by its first layer (the same metadata object) and reused by the rest."""
        if self._plan_of[0] is not metadata:
            self._plan_of = (metadata, PaddedPlan.of(metadata, block_size, share, dtype))
        return self._plan_of[1]

    def forward(self, q, k, v, k_cache, v_cache, metadata: AttentionMetadata, scale: float) -> torch.Tensor:
        """q: [tokens, heads, head_dim]; k, v: [tokens, kv_heads, head_dim]; caches as in torch_ref, or None."""
        if k_cache is None or not metadata.uses_cache:
            return varlen_attention(q, k, v, metadata.cu_seqlens_q, scale)
        plan = self.plan(metadata, k_cache.shape[1], q.shape[1] // k_cache.shape[2], q.dtype)
        if plan.every_slot_used:
            for cache, new in ((k_cache, k), (v_cache, v)):
                cache.view(-1, *cache.shape[2:]).index_copy_(0, metadata.slot_mapping, new.to(cache.dtype))
        else:
            store_kvcache(k, v, k_cache, v_cache, metadata.slot_mapping)
        if plan.in_order:  # every sequence in one group, in the step's order (only decodes, or only prefills)
            return padded_group_attention(q, k_cache, v_cache, plan.groups[0], scale, self.buffers)
        out = torch.empty_like(q)
        for group in plan.groups:  # each group's result is copied out before the next reuses the buffers
            out[group.rows] = padded_group_attention(q, k_cache, v_cache, group, scale, self.buffers)
        return out
