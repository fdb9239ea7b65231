"""Decode attention that starts from the q/k/v projection: Qwen3's q/k-norm, RoPE and the store of the new K/V done
by the attention kernel itself, one launch a layer fewer than models/fused_qk.py's kernel followed by the decode
kernel.

Why: a decode step is launch-bound (some 275 kernels, each a few microseconds whatever its bytes; RESULTS.md), and
between the q/k/v projection and attention each layer still launched fused_qk's kernel. Here each decode program
(sequence, KV head, split) first makes what it needs itself:
- its group's q rows, normed and rotated by fused_qk's code, written to a small buffer and read back as the
  attention's q matrix (the norm works on tiles of ROWS rows, the attention on at least 16: the buffer joins them);
- in the one split that holds the new token's position, the token's k row (normed, rotated) and its v row, stored
  into the cache slot, as fused_qk stores them;
then waits at a barrier (its own stores must be seen by its own loads) and does the decode kernel's work
(triton_ops._decode_program). The other splits of the sequence never read the new position, and the slot of a new
token is in a block no other sequence shares (prefix sharing covers full blocks only).

Bits: q and k go through fused_qk's row code on tiles of the norm kernels' shape (fused.NORM_ROW_ELEMENTS), and a
row's bits do not depend on where it sits in a tile (tests/test_fused.py), so the output and the cache are those of
qk_norm_rope_store then paged_decode_attention, bit for bit (tests/test_decode_prologue.py).

Not the default backend (PrologueTritonBackend, below): not yet measured on a GPU (issue 16). The saving it
aims at is fused_qk's launch, about 9 us a layer at 256 sequences, some 0.2 ms of a 6 ms decode step.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..models.fused import norm_rows_per_program
from ..models.fused_qk import _check_cache, _qk_rows, checked_qkv
from .metadata import AttentionMetadata
from .triton_ops import (LOG2_E, TritonAttentionBackend, _check_attention_inputs, _decode_launch_config,
                         _decode_program, _split_range, choose_num_splits, combine_splits, decode_constants,
                         split_buffers)


@triton.jit
def _decode_prologue_kernel(
    q_ptr, q_weight_ptr, q_out_ptr, q_heads, q_stride_token, q_stride_head,
    k_ptr, k_weight_ptr, k_out_ptr, kv_heads, k_stride_token, k_stride_head,
    v_ptr, v_stride_token, v_stride_head, slot_mapping_ptr, cos_ptr, sin_ptr, n_cols, eps,
    k_cache_ptr, v_cache_ptr, block_tables_ptr, context_lens_ptr, seq_order_ptr,
    out_ptr, partial_out_ptr, partial_lse_ptr,
    qk_scale, block_size, stride_cache_block, stride_cache_slot, stride_cache_head, stride_table_seq,
    stride_out_seq, stride_out_head, num_splits,
    GROUP: tl.constexpr, GROUP_PADDED: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_PADDED: tl.constexpr,
    TILE_N: tl.constexpr, SPLIT: tl.constexpr, DOT_PRECISION: tl.constexpr, ORDERED: tl.constexpr,
    NORM: tl.constexpr, ROWS: tl.constexpr, BLOCK: tl.constexpr,
):
    """One program per (sequence, kv_head, split), as the decode kernel; token `seq` is sequence `seq`'s new one.
    n_cols is head_dim again, as a run-time value: the norm code is then compiled as in fused_qk's kernel."""
    seq = tl.load(seq_order_ptr + tl.program_id(0)) if ORDERED else tl.program_id(0)
    kv_head, split = tl.program_id(1), tl.program_id(2)
    context_len = tl.load(context_lens_ptr + seq)
    start, end = _split_range(context_len, split, num_splits, TILE_N)
    token = seq.to(tl.int64)
    cols = tl.arange(0, BLOCK)[None, :]

    for first in tl.static_range(0, GROUP, ROWS):  # the group's q rows, ROWS at a time
        in_group = first + tl.arange(0, ROWS)[:, None]
        rows = token * q_heads + kv_head * GROUP + in_group
        _qk_rows(q_ptr, q_weight_ptr, q_out_ptr, cos_ptr, sin_ptr, rows, cols, (in_group < GROUP) & (cols < n_cols),
                 q_heads, q_stride_token, q_stride_head, n_cols, eps, NORM)

    if (start < context_len) & (end == context_len):  # the one split that holds the new position, context_len - 1
        _new_kv_to_cache(k_ptr, k_weight_ptr, k_out_ptr, kv_heads, k_stride_token, k_stride_head, v_ptr,
                         v_stride_token, v_stride_head, slot_mapping_ptr, cos_ptr, sin_ptr, n_cols, eps, k_cache_ptr,
                         v_cache_ptr, block_size, stride_cache_block, stride_cache_slot, stride_cache_head, token,
                         kv_head, cols, NORM, ROWS)
    tl.debug_barrier()  # this program's q rows and new K/V, written above, are read below

    _decode_program(q_out_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr, out_ptr, partial_out_ptr, partial_lse_ptr,
                    seq, kv_head, split, start, end, qk_scale, block_size, q_heads * HEAD_DIM, HEAD_DIM,
                    stride_cache_block, stride_cache_slot, stride_cache_head, stride_table_seq, stride_out_seq,
                    stride_out_head, num_splits, GROUP, GROUP_PADDED, HEAD_DIM, HEAD_DIM_PADDED, TILE_N, SPLIT,
                    DOT_PRECISION)


@triton.jit
def _new_kv_to_cache(k_ptr, k_weight_ptr, k_out_ptr, kv_heads, k_stride_token, k_stride_head, v_ptr, v_stride_token,
                     v_stride_head, slot_mapping_ptr, cos_ptr, sin_ptr, n_cols, eps, k_cache_ptr, v_cache_ptr,
                     block_size, stride_cache_block, stride_cache_slot, stride_cache_head, token, kv_head, cols,
                     NORM: tl.constexpr, ROWS: tl.constexpr):
    """The new token's k row for this KV head, normed and rotated (the first row of a ROWS-row tile, as fused_qk's
    norm sees tiles), and its v row, into the token's cache slot as fused_qk stores them."""
    first_row = tl.arange(0, ROWS)[:, None] < 1
    mask = first_row & (cols < n_cols)
    slot = tl.load(slot_mapping_ptr + token + tl.zeros_like(first_row.to(tl.int64)), mask=first_row, other=-1)
    v = tl.load(v_ptr + token * v_stride_token + kv_head * v_stride_head + cols, mask=mask)
    k = _qk_rows(k_ptr, k_weight_ptr, k_out_ptr, cos_ptr, sin_ptr, token * kv_heads + kv_head + tl.zeros_like(slot),
                 cols, mask, kv_heads, k_stride_token, k_stride_head, n_cols, eps, NORM)
    stored = mask & (slot >= 0)  # -1: a padding row of a CUDA graph, nothing to store
    cache = (slot // block_size) * stride_cache_block + (slot % block_size) * stride_cache_slot
    cache += kv_head * stride_cache_head + cols
    k_stored = k.to(k_out_ptr.dtype.element_ty)  # the value fused_qk's k_out holds, then the cache's dtype
    tl.store(k_cache_ptr + cache, k_stored.to(k_cache_ptr.dtype.element_ty), mask=stored)
    tl.store(v_cache_ptr + cache, v.to(v_cache_ptr.dtype.element_ty), mask=stored)


def decode_attention_from_qkv(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
    k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor,
    block_tables: torch.Tensor, context_lens: torch.Tensor, scale: float, *,
    q_weight: torch.Tensor | None = None, k_weight: torch.Tensor | None = None, eps: float = 0.0,
    max_context_len: int | None = None, num_splits: int | None = None, seq_order: torch.Tensor | None = None,
) -> torch.Tensor:
    """paged_decode_attention over the outputs of qk_norm_rope_store(q, k, v, cos, sin, q_weight, k_weight, eps,
    k_cache, v_cache, slot_mapping), in one launch (plus the splits' merge).

    q: [batch, heads, head_dim], k and v: [batch, kv_heads, head_dim], one new token per sequence (views with a
    contiguous last dim, such as the packed q/k/v output, are read in place); cos, sin: float32 [batch, 1,
    head_dim]; q_weight / k_weight: Qwen3's q/k-norm weights, or neither (RoPE only). The new K/V go into their
    slots (slot_mapping, -1 = skip); block_tables, context_lens (counting the new token), max_context_len,
    num_splits and seq_order as in paged_decode_attention. Returns [batch, heads, head_dim] in q's dtype.
    """
    q, k, v = _checked_inputs(q, k, v, k_cache, v_cache, slot_mapping, block_tables, context_lens, q_weight,
                              k_weight, seq_order)
    batch, num_heads, head_dim = q.shape
    kv_heads = k.shape[1]
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    if batch == 0:
        return out
    block_size = k_cache.shape[1]
    if max_context_len is None:
        max_context_len = block_tables.shape[1] * block_size
    if num_splits is None:
        num_splits = choose_num_splits(batch, kv_heads, max_context_len, q.device)
    tile_n, num_warps, num_stages = _decode_launch_config(q.dtype, head_dim)
    q_rotated, k_rotated = torch.empty_like(out), torch.empty(k.shape, dtype=k.dtype, device=k.device)
    partial_out, partial_lse = split_buffers(out, num_splits)
    norm = q_weight is not None
    _decode_prologue_kernel[(batch, kv_heads, num_splits)](
        q, q_weight if norm else q, q_rotated, num_heads, q.stride(0), q.stride(1),
        k, k_weight if norm else k, k_rotated, kv_heads, k.stride(0), k.stride(1),
        v, v.stride(0), v.stride(1), slot_mapping, cos.contiguous(), sin.contiguous(), head_dim, eps,
        k_cache, v_cache, block_tables, context_lens, context_lens if seq_order is None else seq_order,
        out, partial_out, partial_lse,
        scale * LOG2_E, block_size,
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        block_tables.stride(0),
        out.stride(0), out.stride(1),
        num_splits,
        **decode_constants(q.dtype, num_heads // kv_heads, head_dim, tile_n, num_splits),
        ORDERED=seq_order is not None, NORM=norm, ROWS=norm_rows_per_program(head_dim),
        BLOCK=triton.next_power_of_2(head_dim), num_warps=num_warps, num_stages=num_stages,
    )
    combine_splits(partial_out, partial_lse, out, num_splits)
    return out


def _checked_inputs(q, k, v, k_cache, v_cache, slot_mapping, block_tables, context_lens, q_weight, k_weight,
                    seq_order) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k, v (contiguous in their last dim), once every input is checked; a clear ValueError otherwise."""
    q, k, v = checked_qkv(q, k, v, q_weight, k_weight)
    batch, _, head_dim = q.shape
    _check_cache(k_cache, v_cache, slot_mapping, batch, k.shape[1], head_dim)
    _check_attention_inputs(q, k_cache, v_cache, block_tables, context_lens, batch)
    if seq_order is not None and seq_order.shape != (batch,):
        raise ValueError(f"seq_order must be a permutation of the {batch} sequences, got shape {tuple(seq_order.shape)}")
    return q, k, v


class PrologueTritonBackend(TritonAttentionBackend):
    """The Triton backend whose decode steps start from the q/k/v projection (the model calls decode_from_qkv
    instead of its fused_qk kernel, then forward). Not the default until measured on a GPU (issue 16);
    benchmarks/decode_split_ab.py builds engines with it for an A/B."""

    fuse_decode_prologue = True

    def decode_from_qkv(self, q, k, v, cos, sin, k_cache, v_cache, metadata: AttentionMetadata, scale: float,
                        **norm) -> torch.Tensor:
        """norm: q_weight, k_weight, eps (Qwen3's q/k-norm), or nothing."""
        return decode_attention_from_qkv(
            q, k, v, cos, sin, k_cache, v_cache, metadata.slot_mapping, metadata.block_tables, metadata.context_lens,
            scale, max_context_len=max(metadata.context_lens_host) if metadata.context_lens_host else None,
            seq_order=metadata.decode_order, **norm)
