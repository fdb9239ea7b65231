"""Attention in plain PyTorch: the slow, obviously-correct twin of every fast kernel.

Runs on any device. It loops over the sequences of a packed batch in Python and, for each, gathers that
sequence's K/V through its block table, so a reader can follow every index. Fast paths (Triton, FlashAttention)
are tested against these functions on random inputs.
"""

from __future__ import annotations

import torch

from ..kv.layout import blocks_for_tokens
from .metadata import AttentionMetadata


def store_kvcache(
    k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    """Write each new token's K/V into its cache slot.

    k, v: [num_tokens, kv_heads, head_dim]; caches: [num_blocks, block_size, kv_heads, head_dim];
    slot_mapping: int64 [num_tokens], slot = block_id * block_size + offset; -1 means "padding, skip".
    """
    keep = slot_mapping >= 0
    slots = slot_mapping[keep]
    kv_heads, head_dim = k_cache.shape[-2:]
    k_cache.view(-1, kv_heads, head_dim)[slots] = k[keep].to(k_cache.dtype)
    v_cache.view(-1, kv_heads, head_dim)[slots] = v[keep].to(v_cache.dtype)


def attend_one_sequence(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """Causal GQA attention for one sequence whose new tokens are the LAST q_len of its context.

    q: [q_len, heads, head_dim]; k, v: [context_len, kv_heads, head_dim] -> [q_len, heads, head_dim].
    Query i sits at position context_len - q_len + i and may look at keys 0 .. that position.
    """
    q_len, heads, head_dim = q.shape
    context_len, kv_heads, _ = k.shape
    group = heads // kv_heads  # query heads sharing one KV head (GQA); 1 = MHA, heads = MQA
    qg = q.reshape(q_len, kv_heads, group, head_dim)
    scores = torch.einsum("qkgd,ckd->kgqc", qg.float(), k.float()) * scale  # [kv_heads, group, q_len, ctx]
    query_pos = torch.arange(context_len - q_len, context_len, device=q.device)
    key_pos = torch.arange(context_len, device=q.device)
    future = key_pos[None, :] > query_pos[:, None]  # [q_len, ctx]
    scores = scores.masked_fill(future, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    out = torch.einsum("kgqc,ckd->qkgd", probs, v.float())
    return out.reshape(q_len, heads, head_dim).to(q.dtype)


def gather_context(cache: torch.Tensor, block_table: torch.Tensor, context_len: int) -> torch.Tensor:
    """The first context_len tokens of one sequence, read through its block table.

    cache: [num_blocks, block_size, kv_heads, head_dim]; block_table: int [max_blocks] (-1 = unused).
    Returns [context_len, kv_heads, head_dim].
    """
    block_size = cache.shape[1]
    num_blocks = blocks_for_tokens(context_len, block_size)
    blocks = block_table[:num_blocks].long()
    return cache[blocks].reshape(-1, *cache.shape[2:])[:context_len]


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                    cu_seqlens_q: torch.Tensor, context_lens: torch.Tensor, scale: float) -> torch.Tensor:
    """Attention of packed new tokens over each sequence's cached context (new tokens already stored).

    q: [num_tokens, heads, head_dim] packed by cu_seqlens_q (int32 [batch + 1]); block_tables: int32
    [batch, max_blocks]; context_lens: int32 [batch] (cached tokens including this step's). Decode is the
    special case of one query per sequence. Returns [num_tokens, heads, head_dim].
    """
    out = torch.empty_like(q)
    starts = cu_seqlens_q.tolist()
    lengths = context_lens.tolist()
    for b, context_len in enumerate(lengths):
        lo, hi = starts[b], starts[b + 1]
        if hi == lo:
            continue
        k = gather_context(k_cache, block_tables[b], context_len)
        v = gather_context(v_cache, block_tables[b], context_len)
        out[lo:hi] = attend_one_sequence(q[lo:hi], k, v, scale)
    return out


def varlen_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor, scale: float
) -> torch.Tensor:
    """Causal attention of packed sequences over their own tokens only (no cache).

    q: [num_tokens, heads, head_dim]; k, v: [num_tokens, kv_heads, head_dim]; cu_seqlens: int32 [batch + 1].
    """
    out = torch.empty_like(q)
    starts = cu_seqlens.tolist()
    for lo, hi in zip(starts[:-1], starts[1:]):
        if hi > lo:
            out[lo:hi] = attend_one_sequence(q[lo:hi], k[lo:hi], v[lo:hi], scale)
    return out


class TorchAttentionBackend:
    """The attention backend every path can use: store the new K/V, then attend through the block tables."""

    name = "torch"
    supports_cuda_graphs = False  # loops over sequences with lengths read on the host (.tolist())

    def forward(self, q, k, v, k_cache, v_cache, metadata: AttentionMetadata, scale: float) -> torch.Tensor:
        """q: [tokens, heads, head_dim]; k, v: [tokens, kv_heads, head_dim]; caches: [num_blocks, block_size,
        kv_heads, head_dim] each, or None (no cache: attention over this step's tokens only)."""
        if k_cache is None or not metadata.uses_cache:
            return varlen_attention(q, k, v, metadata.cu_seqlens_q, scale)
        store_kvcache(k, v, k_cache, v_cache, metadata.slot_mapping)
        return paged_attention(
            q, k_cache, v_cache, metadata.block_tables, metadata.cu_seqlens_q, metadata.context_lens, scale
        )
