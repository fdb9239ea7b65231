"""Triton kernels for the paged KV cache: store new K/V, decode attention (split-KV), prefill attention.

This module owns three kernels and their launchers, plus `TritonAttentionBackend`, which plugs them into the
model. It imports triton at the top, so only import it when a Triton backend is wanted: `import reference`
never imports it (so `TRITON_INTERPRET=1`, set before the import, makes every kernel run on the CPU through
Triton's interpreter). Every kernel has a plain-PyTorch twin in `torch_ref.py`; the tests compare them.

Layout (see metadata.py): caches [num_blocks, block_size, kv_heads, head_dim]; a sequence's token at context
position p lives in block block_tables[b, p // block_size], row p % block_size of that block.

Three ideas the kernels share (lab 0.3 explains them at length):
- A KV *tile* is TILE_N consecutive context positions. Each position looks up its own block in the block
  table, so a tile may span several small blocks (block_size 16, TILE_N 64) or part of one large block
  (block_size 256, or the contiguous cache whose one block is max_len long). Any block_size works, and the
  tile size is chosen for the GPU, not dictated by the cache. The per-position lookup costs one small,
  mostly-cached int32 load per position; each position's K row is head_dim contiguous values, so the big
  loads stay wide.
- Grouped-query attention: the query heads that share one KV head are processed by the same program, as rows
  of one matrix, so K and V are read from memory once per group rather than once per query head.
- Online softmax: scores are never stored. A running maximum m, a running sum l and an unnormalized output
  accumulator are rescaled as each tile arrives; everything is accumulated in float32. We use exp2 and fold
  log2(e) into the softmax scale (exp(x) = exp2(x * log2 e)), which is what the hardware computes natively.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from ..triton_compat import patch_interpreter
from . import torch_ref
from .metadata import AttentionMetadata

patch_interpreter()  # Triton < 3.7's CPU interpreter under NumPy >= 2.4 (see triton_compat.py)

LOG2_E = 1.4426950408889634  # exp(x) == exp2(x * LOG2_E)

# A split-KV partition is at least this long: shorter ones are a few tiles of work plus their share of the merge.
MIN_TOKENS_PER_SPLIT = 256
MAX_SPLITS = 64
PROGRAMS_PER_MULTIPROCESSOR = 12  # decode programs asked for per multiprocessor (see choose_num_splits)
HEADS_FIRST = True  # the decode grid's order (see _paged_decode_kernel): 0-4% faster on an H200 (RESULTS.md)
SPLIT_TILE_FACTOR = 2  # a split decode launch reads tiles this many times longer (see _decode_launch_config)


# ---------------------------------------------------------------------------------------------------------
# store_kvcache
# ---------------------------------------------------------------------------------------------------------


@triton.jit
def _store_kvcache_kernel(
    k_ptr, v_ptr, k_cache_ptr, v_cache_ptr, slot_mapping_ptr,
    block_size,
    stride_k_token, stride_k_head, stride_v_token, stride_v_head,
    stride_cache_block, stride_cache_slot, stride_cache_head,
    KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr,
    KV_HEADS_PADDED: tl.constexpr, HEAD_DIM_PADDED: tl.constexpr,
):
    """One program per new token: copy its [kv_heads, head_dim] K and V into its cache slot."""
    token = tl.program_id(0)
    slot = tl.load(slot_mapping_ptr + token)
    if slot < 0:  # padding token: nothing to store
        return
    # int64 because block * stride can overflow int32 in a large cache.
    block = (slot // block_size).to(tl.int64)
    row = (slot % block_size).to(tl.int64)

    # tl.arange needs powers of two: pad, then mask off the extra heads / dims (e.g. head_dim 96).
    heads = tl.arange(0, KV_HEADS_PADDED)[:, None]
    dims = tl.arange(0, HEAD_DIM_PADDED)[None, :]
    mask = (heads < KV_HEADS) & (dims < HEAD_DIM)
    cache_offsets = block * stride_cache_block + row * stride_cache_slot + heads * stride_cache_head + dims

    k = tl.load(k_ptr + token * stride_k_token + heads * stride_k_head + dims, mask=mask)
    tl.store(k_cache_ptr + cache_offsets, k.to(k_cache_ptr.dtype.element_ty), mask=mask)
    v = tl.load(v_ptr + token * stride_v_token + heads * stride_v_head + dims, mask=mask)
    tl.store(v_cache_ptr + cache_offsets, v.to(v_cache_ptr.dtype.element_ty), mask=mask)


def store_kvcache(
    k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    """Write each new token's K/V into its cache slot (in place).

    k, v: [num_tokens, kv_heads, head_dim] (any float dtype; cast to the cache's dtype);
    k_cache, v_cache: [num_blocks, block_size, kv_heads, head_dim], contiguous;
    slot_mapping: int64 [num_tokens], slot = block_id * block_size + offset; -1 means "padding, skip".
    """
    _check_cache(k_cache, v_cache)
    num_tokens, kv_heads, head_dim = k.shape
    if v.shape != k.shape or k_cache.shape[2:] != (kv_heads, head_dim):
        raise ValueError(
            f"k {tuple(k.shape)} and v {tuple(v.shape)} must both be [num_tokens, kv_heads, head_dim] matching "
            f"the cache's {tuple(k_cache.shape[2:])}"
        )
    if slot_mapping.shape != (num_tokens,):
        raise ValueError(f"slot_mapping must have shape [{num_tokens}], got {tuple(slot_mapping.shape)}")
    if num_tokens == 0:
        return
    if k.stride(-1) != 1 or v.stride(-1) != 1:
        raise ValueError("k and v must be contiguous in their last (head_dim) dimension")
    _store_kvcache_kernel[(num_tokens,)](
        k, v, k_cache, v_cache, slot_mapping,
        k_cache.shape[1],
        k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        KV_HEADS=kv_heads, HEAD_DIM=head_dim,
        KV_HEADS_PADDED=triton.next_power_of_2(kv_heads), HEAD_DIM_PADDED=triton.next_power_of_2(head_dim),
    )


# ---------------------------------------------------------------------------------------------------------
# Decode: one query token per sequence, split-KV ("flash-decoding")
# ---------------------------------------------------------------------------------------------------------


@triton.jit
def _paged_decode_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr, context_lens_ptr, seq_order_ptr,
    out_ptr, partial_out_ptr, partial_lse_ptr,
    qk_scale, block_size,
    stride_q_seq, stride_q_head,
    stride_cache_block, stride_cache_slot, stride_cache_head,
    stride_table_seq,
    stride_out_seq, stride_out_head,
    num_splits,
    GROUP: tl.constexpr, GROUP_PADDED: tl.constexpr,
    HEAD_DIM: tl.constexpr, HEAD_DIM_PADDED: tl.constexpr,
    TILE_N: tl.constexpr, SPLIT: tl.constexpr, DOT_PRECISION: tl.constexpr, ORDERED: tl.constexpr,
    HEADS_FIRST: tl.constexpr,
):
    """One program per (sequence, kv_head, split): all GROUP query heads against one slice of the context.

    Without SPLIT the program owns the whole context and writes the final output. With SPLIT it writes its
    normalized partial output and its log-sum-exp (base 2) for `_combine_splits_kernel` to merge.
    (num_splits is a runtime value, so a new split count does not compile a new kernel.)
    ORDERED: the programs take the sequences in seq_order's order (the GPU starts programs roughly in grid order;
    see paged_decode_attention), not in batch order. Each program's result is the same either way.
    HEADS_FIRST: the grid is (kv_heads, batch, splits), so a sequence's KV heads start side by side and read
    neighbouring bytes of the same cache rows (each row holds every KV head of a position); else (batch, kv_heads,
    splits), where the programs running at one time read one head's 256 bytes of many sequences' rows.
    """
    if HEADS_FIRST:
        kv_head, seq, num_kv_heads = tl.program_id(0), tl.program_id(1), tl.num_programs(0)
    else:
        seq, kv_head, num_kv_heads = tl.program_id(0), tl.program_id(1), tl.num_programs(1)
    if ORDERED:
        seq = tl.load(seq_order_ptr + seq)
    split = tl.program_id(2)
    context_len = tl.load(context_lens_ptr + seq)
    start, end = _split_range(context_len, split, num_splits, TILE_N)
    _decode_program(q_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr, out_ptr, partial_out_ptr, partial_lse_ptr,
                    seq, kv_head, num_kv_heads, split, start, end, qk_scale, block_size, stride_q_seq, stride_q_head,
                    stride_cache_block, stride_cache_slot, stride_cache_head, stride_table_seq, stride_out_seq,
                    stride_out_head, num_splits, GROUP, GROUP_PADDED, HEAD_DIM, HEAD_DIM_PADDED, TILE_N, SPLIT,
                    DOT_PRECISION)


@triton.jit
def _split_range(context_len, split, num_splits, TILE_N: tl.constexpr):
    """Split `split`'s share of the context, in whole tiles: [start, end) (empty for a split past a short context)."""
    num_tiles = tl.cdiv(context_len, TILE_N)
    tiles_per_split = tl.cdiv(num_tiles, num_splits)
    start = split * tiles_per_split * TILE_N
    return start, tl.minimum(start + tiles_per_split * TILE_N, context_len)


@triton.jit
def _online_softmax_step(scores, max_score, sum_exp, acc, v_cache_ptr, kv_offsets, kv_mask,
                         DOT_PRECISION: tl.constexpr):
    """Add one K/V tile to a running softmax (both kernels' inner step): rescale what is there by
    exp2(old max - new max), then add the tile's weights exp2(score - new max) to the sum and the weights times V to
    the accumulator. scores: [rows, TILE_N] in base-2 units, -inf where masked. V (v_cache_ptr + kv_offsets) is
    addressed and loaded here, after the scores' arithmetic, where the kernels always loaded it: the compiled code
    is the one they had inline. Returns the new (max, sum, acc)."""
    new_max = tl.maximum(max_score, tl.max(scores, axis=1))
    correction = tl.exp2(max_score - new_max)
    probs = tl.exp2(scores - new_max[:, None])
    sum_exp = sum_exp * correction + tl.sum(probs, axis=1)
    v = tl.load(v_cache_ptr + kv_offsets, mask=kv_mask, other=0.0)
    acc = acc * correction[:, None] + tl.dot(probs.to(v.dtype), v, input_precision=DOT_PRECISION)
    return new_max, sum_exp, acc


@triton.jit
def _decode_program(
    q_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr, out_ptr, partial_out_ptr, partial_lse_ptr,
    seq, kv_head, num_kv_heads, split, start, end, qk_scale, block_size,
    stride_q_seq, stride_q_head,
    stride_cache_block, stride_cache_slot, stride_cache_head,
    stride_table_seq,
    stride_out_seq, stride_out_head,
    num_splits,
    GROUP: tl.constexpr, GROUP_PADDED: tl.constexpr,
    HEAD_DIM: tl.constexpr, HEAD_DIM_PADDED: tl.constexpr,
    TILE_N: tl.constexpr, SPLIT: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """The work of one decode program: context positions [start, end) of sequence `seq`."""
    # The group's query heads are the rows of a [GROUP_PADDED, HEAD_DIM_PADDED] matrix (padded for tl.dot
    # and tl.arange; padded rows are zeros and never stored).
    group_rows = tl.arange(0, GROUP_PADDED)
    dims = tl.arange(0, HEAD_DIM_PADDED)
    row_mask = group_rows < GROUP
    dim_mask = dims < HEAD_DIM
    heads = kv_head * GROUP + group_rows
    q = tl.load(
        q_ptr + seq * stride_q_seq + heads[:, None] * stride_q_head + dims[None, :],
        mask=row_mask[:, None] & dim_mask[None, :], other=0.0,
    )

    max_score = tl.full([GROUP_PADDED], float("-inf"), dtype=tl.float32)  # running max m (base-2 units)
    sum_exp = tl.zeros([GROUP_PADDED], dtype=tl.float32)  # running sum l of exp2(score - m)
    acc = tl.zeros([GROUP_PADDED, HEAD_DIM_PADDED], dtype=tl.float32)  # running sum of exp2(score - m) * v

    for tile_start in range(start, end, TILE_N):
        positions = tile_start + tl.arange(0, TILE_N)
        valid = positions < end
        # Each position finds its block, then its row inside the block.
        block = tl.load(block_tables_ptr + seq * stride_table_seq + positions // block_size, mask=valid, other=0)
        rows = block.to(tl.int64) * stride_cache_block + (positions % block_size) * stride_cache_slot
        kv_offsets = (rows + kv_head * stride_cache_head)[:, None] + dims[None, :]
        kv_mask = valid[:, None] & dim_mask[None, :]

        k = tl.load(k_cache_ptr + kv_offsets, mask=kv_mask, other=0.0)  # [TILE_N, HEAD_DIM_PADDED]
        scores = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale  # [GROUP_PADDED, TILE_N]
        scores = tl.where(valid[None, :], scores, float("-inf"))

        max_score, sum_exp, acc = _online_softmax_step(scores, max_score, sum_exp, acc, v_cache_ptr, kv_offsets,
                                                       kv_mask, DOT_PRECISION)

    # An empty split (a short context) has sum_exp == 0: it stores zeros with log-sum-exp -inf (weight 0).
    has_keys = sum_exp > 0
    safe_sum = tl.where(has_keys, sum_exp, 1.0)
    result = acc / safe_sum[:, None]
    out_mask = row_mask[:, None] & dim_mask[None, :]
    if not SPLIT:
        out_offsets = seq * stride_out_seq + heads[:, None] * stride_out_head + dims[None, :]
        tl.store(out_ptr + out_offsets, result.to(out_ptr.dtype.element_ty), mask=out_mask)
    else:
        # partial_out: fp32 [batch, heads, num_splits, HEAD_DIM]; partial_lse: fp32 [batch, heads, num_splits]
        split_row = (seq * num_kv_heads * GROUP + heads) * num_splits + split
        tl.store(partial_out_ptr + split_row[:, None] * HEAD_DIM + dims[None, :], result, mask=out_mask)
        lse = tl.where(has_keys, max_score + tl.log2(safe_sum), float("-inf"))
        tl.store(partial_lse_ptr + split_row, lse, mask=row_mask)


@triton.jit
def _combine_splits_kernel(
    partial_out_ptr, partial_lse_ptr, out_ptr,
    stride_out_seq, stride_out_head,
    num_heads, num_splits,
    HEAD_DIM: tl.constexpr, HEAD_DIM_PADDED: tl.constexpr, SPLITS_PADDED: tl.constexpr,
):
    """One program per (sequence, head): merge the splits' outputs, each weighted by its share of the sum.

    Split s saw sum_s = 2^lse_s of the softmax's denominator, so out = sum_s 2^lse_s * out_s / sum_s 2^lse_s.
    Subtracting the largest lse first keeps the powers of two in range.
    """
    seq = tl.program_id(0)
    head = tl.program_id(1)
    splits = tl.arange(0, SPLITS_PADDED)
    dims = tl.arange(0, HEAD_DIM_PADDED)
    split_rows = (seq * num_heads + head) * num_splits + splits
    lse = tl.load(partial_lse_ptr + split_rows, mask=splits < num_splits, other=float("-inf"))
    weights = tl.exp2(lse - tl.max(lse, axis=0))  # empty / padded splits: exp2(-inf) = 0
    mask = (splits[:, None] < num_splits) & (dims[None, :] < HEAD_DIM)
    partial = tl.load(partial_out_ptr + split_rows[:, None] * HEAD_DIM + dims[None, :], mask=mask, other=0.0)
    result = tl.sum(weights[:, None] * partial, axis=0) / tl.sum(weights, axis=0)
    tl.store(
        out_ptr + seq * stride_out_seq + head * stride_out_head + dims,
        result.to(out_ptr.dtype.element_ty), mask=dims < HEAD_DIM,
    )


def choose_num_splits(batch: int, kv_heads: int, max_context_len: int, device: torch.device) -> int:
    """How many slices to cut each sequence's context into, so that the GPU has enough programs to run.

    batch * kv_heads programs already fill the GPU for a big batch (then 1: no reduction at all). A small
    batch with long contexts gets more splits, but no split shorter than MIN_TOKENS_PER_SPLIT.
    """
    programs = batch * kv_heads
    # Twelve programs per multiprocessor, measured where it counts: whole generate calls of the public-API workload
    # on an H200 (benchmarks/decode_split_ab.py, RESULTS.md 2026-12-02 ninth session), decode-only steps 5.39 s at
    # 3, 5.36 at 6, 5.34 at 12, 5.46 at 24. Splitting pays in a call's tail, where a few long contexts are left;
    # a lone kernel at 64 sequences x 8 KV heads ran 6% slower in four splits (decode_gemms.py, fifth session).
    wanted = PROGRAMS_PER_MULTIPROCESSOR * _multiprocessor_count(device)
    if programs >= wanted:
        return 1
    by_occupancy = triton.cdiv(wanted, programs)
    by_length = max(1, triton.cdiv(max_context_len, MIN_TOKENS_PER_SPLIT))
    return max(1, min(by_occupancy, by_length, MAX_SPLITS))


def paged_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    *,
    out: torch.Tensor | None = None,
    max_context_len: int | None = None,
    num_splits: int | None = None,
    seq_order: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention of one new query token per sequence over that sequence's cached context.

    q: [batch, heads, head_dim] (float32 / float16 / bfloat16, same dtype as the caches);
    k_cache, v_cache: [num_blocks, block_size, kv_heads, head_dim], contiguous, heads % kv_heads == 0;
    block_tables: int32 [batch, max_blocks] (-1 = unused); context_lens: int32 [batch], each >= 1, counting
    the new token (already stored). Returns out (or a new tensor): [batch, heads, head_dim] in q's dtype.

    max_context_len: a host-side bound on context_lens (default: what the block tables can hold), used only
    to choose the number of splits; num_splits overrides that choice (tests use it to exercise the merge).
    seq_order: int32 [batch], a permutation of the sequences: the order their programs start in (None: batch
    order). Longest context first evens out the end of the launch: a program reads its context at a fraction of
    the GPU's bandwidth, so one long context started last can finish well after all the others (the engine's
    CUDA graphs pass it; the outputs do not depend on it).
    """
    batch, num_heads, head_dim = q.shape
    _check_attention_inputs(q, k_cache, v_cache, block_tables, context_lens, batch)
    kv_heads, block_size = k_cache.shape[2], k_cache.shape[1]
    out = _output_like(q, out)
    if batch == 0:
        return out
    if max_context_len is None:
        max_context_len = block_tables.shape[1] * block_size
    if num_splits is None:
        num_splits = choose_num_splits(batch, kv_heads, max_context_len, q.device)
    tile_n, num_warps, num_stages = _decode_launch_config(q.dtype, head_dim, num_splits)
    if seq_order is not None and seq_order.shape != (batch,):
        raise ValueError(f"seq_order must be a permutation of the {batch} sequences, got shape {tuple(seq_order.shape)}")
    return _launch_decode(
        q, k_cache, v_cache, block_tables, context_lens, scale, out,
        num_splits=num_splits, tile_n=tile_n, num_warps=num_warps, num_stages=num_stages, seq_order=seq_order,
    )


def _launch_decode(q, k_cache, v_cache, block_tables, context_lens, scale, out, *,
                   num_splits, tile_n, num_warps, num_stages, seq_order=None, heads_first=None) -> torch.Tensor:
    """Launch the decode kernel (and the merge when num_splits > 1) with an explicit tile configuration."""
    batch, num_heads, head_dim = q.shape
    kv_heads = k_cache.shape[2]
    heads_first = HEADS_FIRST if heads_first is None else heads_first
    partial_out, partial_lse = split_buffers(out, num_splits)
    grid = (kv_heads, batch, num_splits) if heads_first else (batch, kv_heads, num_splits)
    _paged_decode_kernel[grid](
        q, k_cache, v_cache, block_tables, context_lens, context_lens if seq_order is None else seq_order,
        out, partial_out, partial_lse,
        scale * LOG2_E, k_cache.shape[1],
        q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        block_tables.stride(0),
        out.stride(0), out.stride(1),
        num_splits,
        **decode_constants(q.dtype, num_heads // kv_heads, head_dim, tile_n, num_splits),
        ORDERED=seq_order is not None, HEADS_FIRST=heads_first, num_warps=num_warps, num_stages=num_stages,
    )
    combine_splits(partial_out, partial_lse, out, num_splits)
    return out


def split_buffers(out: torch.Tensor, num_splits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(partial_out, partial_lse) for a split launch; without splits the kernel writes `out` and never these."""
    if num_splits == 1:
        return out, out
    batch, num_heads, head_dim = out.shape
    return (torch.empty((batch, num_heads, num_splits, head_dim), dtype=torch.float32, device=out.device),
            torch.empty((batch, num_heads, num_splits), dtype=torch.float32, device=out.device))


def decode_constants(dtype: torch.dtype, group: int, head_dim: int, tile_n: int, num_splits: int) -> dict:
    """The decode program's compile-time arguments (_decode_program's)."""
    return dict(GROUP=group, GROUP_PADDED=max(16, triton.next_power_of_2(group)),  # tl.dot needs >= 16 rows
                HEAD_DIM=head_dim, HEAD_DIM_PADDED=_padded_head_dim(head_dim), TILE_N=tile_n, SPLIT=num_splits > 1,
                DOT_PRECISION=_dot_precision(dtype))


def combine_splits(partial_out: torch.Tensor, partial_lse: torch.Tensor, out: torch.Tensor, num_splits: int) -> None:
    """Merge a split launch's partial outputs into `out` (nothing to do without splits).

    A second launch on purpose: merging inside the decode kernel (the last split to finish merges, counted on an
    atomic) saves the launch but puts the merge on the end of the launch's critical path, and decode steps got 1.3%
    slower on an H200 (benchmarks/RESULTS.md, 2026-12-02 twelfth session)."""
    if num_splits == 1:
        return
    batch, num_heads, head_dim = out.shape
    _combine_splits_kernel[(batch, num_heads)](
        partial_out, partial_lse, out,
        out.stride(0), out.stride(1),
        num_heads, num_splits,
        HEAD_DIM=head_dim, HEAD_DIM_PADDED=_padded_head_dim(head_dim),
        SPLITS_PADDED=triton.next_power_of_2(num_splits),
    )


# ---------------------------------------------------------------------------------------------------------
# Prefill: many query tokens per sequence, causal
# ---------------------------------------------------------------------------------------------------------


@triton.jit
def _paged_prefill_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr, cu_seqlens_q_ptr, context_lens_ptr, out_ptr,
    qk_scale, block_size,
    stride_q_token, stride_q_head,
    stride_cache_block, stride_cache_slot, stride_cache_head,
    stride_table_seq,
    stride_out_token, stride_out_head,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_PADDED: tl.constexpr,
    TILE_M: tl.constexpr, TILE_N: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """One program per (sequence, kv_head, query tile).

    The rows of a query tile are (token, query head of this KV group) pairs, token-major: row r is token
    r // GROUP, head kv_head * GROUP + r % GROUP. So the group's heads share every K/V tile, as in decode.
    Query tiles go last tile first (axis 2 is the slowest to launch): a causal tile's work grows with its
    position, so the long ones start first and the short ones fill in behind them instead of running last.
    """
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    tile = tl.num_programs(2) - 1 - tl.program_id(2)
    q_start = tl.load(cu_seqlens_q_ptr + seq)
    q_len = tl.load(cu_seqlens_q_ptr + seq + 1) - q_start
    if tile * TILE_M >= q_len * GROUP:  # the grid is sized for the longest sequence; this one is shorter
        return
    context_len = tl.load(context_lens_ptr + seq)

    rows = tile * TILE_M + tl.arange(0, TILE_M)
    tokens = rows // GROUP
    heads = kv_head * GROUP + rows % GROUP
    row_mask = tokens < q_len
    dims = tl.arange(0, HEAD_DIM_PADDED)
    dim_mask = dims < HEAD_DIM
    q_mask = row_mask[:, None] & dim_mask[None, :]
    q = tl.load(
        q_ptr + (q_start + tokens)[:, None] * stride_q_token + heads[:, None] * stride_q_head + dims[None, :],
        mask=q_mask, other=0.0,
    )
    # The new tokens are the last q_len of the context. Rows past q_len get positions >= context_len: they
    # see every key, so they never produce an all-masked row (no NaN), and they are not stored.
    query_positions = context_len - q_len + tokens

    # Keys past the tile's last query are masked for every row: stop there (the causal saving). Keys up to the
    # tile's first query are seen by every row: the whole K/V tiles among them need no mask (most of them).
    last_token = tl.minimum((tile * TILE_M + TILE_M - 1) // GROUP, q_len - 1)
    kv_end = context_len - q_len + last_token + 1
    unmasked_end = (context_len - q_len + tile * TILE_M // GROUP + 1) // TILE_N * TILE_N

    max_score = tl.full([TILE_M], float("-inf"), dtype=tl.float32)
    sum_exp = tl.zeros([TILE_M], dtype=tl.float32)
    acc = tl.zeros([TILE_M, HEAD_DIM_PADDED], dtype=tl.float32)
    table = block_tables_ptr + seq * stride_table_seq
    head_offset = kv_head * stride_cache_head
    for tile_start in range(0, unmasked_end, TILE_N):
        max_score, sum_exp, acc = _prefill_tile(
            q, k_cache_ptr, v_cache_ptr, table, block_size, stride_cache_block, stride_cache_slot, head_offset,
            tile_start, kv_end, query_positions, dims, dim_mask, qk_scale, max_score, sum_exp, acc,
            False, TILE_N, DOT_PRECISION)
    for tile_start in range(unmasked_end, kv_end, TILE_N):
        max_score, sum_exp, acc = _prefill_tile(
            q, k_cache_ptr, v_cache_ptr, table, block_size, stride_cache_block, stride_cache_slot, head_offset,
            tile_start, kv_end, query_positions, dims, dim_mask, qk_scale, max_score, sum_exp, acc,
            True, TILE_N, DOT_PRECISION)

    result = acc / sum_exp[:, None]  # every row saw key 0 at least, so sum_exp > 0
    out_offsets = (q_start + tokens)[:, None] * stride_out_token + heads[:, None] * stride_out_head + dims[None, :]
    tl.store(out_ptr + out_offsets, result.to(out_ptr.dtype.element_ty), mask=q_mask)


@triton.jit
def _prefill_tile(q, k_cache_ptr, v_cache_ptr, table, block_size, stride_cache_block, stride_cache_slot,
                  head_offset, tile_start, kv_end, query_positions, dims, dim_mask, qk_scale, max_score, sum_exp,
                  acc, MASKED: tl.constexpr, TILE_N: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """One K/V tile of the online softmax. MASKED: the tile reaches past the tile's first query (the causal
    diagonal) or past kv_end; unmasked tiles skip the bounds and the causal comparison. The same arithmetic
    either way (the interpreter gives the same bits; compiled, the compiler may fuse a multiply-add differently)."""
    positions = tile_start + tl.arange(0, TILE_N)
    valid = positions < kv_end
    if MASKED:
        block = tl.load(table + positions // block_size, mask=valid, other=0)
    else:
        block = tl.load(table + positions // block_size)
    cache_rows = block.to(tl.int64) * stride_cache_block + (positions % block_size) * stride_cache_slot
    kv_offsets = (cache_rows + head_offset)[:, None] + dims[None, :]
    kv_mask = valid[:, None] & dim_mask[None, :] if MASKED else dim_mask[None, :]
    k = tl.load(k_cache_ptr + kv_offsets, mask=kv_mask, other=0.0)
    scores = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale  # [TILE_M, TILE_N]
    if MASKED:
        causal = positions[None, :] <= query_positions[:, None]
        scores = tl.where(causal & valid[None, :], scores, float("-inf"))
    return _online_softmax_step(scores, max_score, sum_exp, acc, v_cache_ptr, kv_offsets, kv_mask, DOT_PRECISION)


def paged_prefill_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    *,
    out: torch.Tensor | None = None,
    max_query_len: int | None = None,
) -> torch.Tensor:
    """Causal attention of packed new tokens over each sequence's cached context (new tokens already stored).

    q: [num_tokens, heads, head_dim] packed by cu_seqlens_q (int32 [batch + 1]); sequence b's new tokens are
    the LAST q_len_b = cu[b+1] - cu[b] of its context_lens[b] (int32 [batch]) tokens, so query i sits at
    position context_lens[b] - q_len_b + i. Caches and block_tables as in `paged_decode_attention`.
    Returns out (or a new tensor): [num_tokens, heads, head_dim] in q's dtype.

    max_query_len: the longest q_len_b, known on the host (sizes the grid); if None it is read from
    cu_seqlens_q, which waits for the GPU.
    """
    num_tokens, num_heads, head_dim = q.shape
    batch = cu_seqlens_q.shape[0] - 1
    _check_attention_inputs(q, k_cache, v_cache, block_tables, context_lens, batch)
    out = _output_like(q, out)
    if num_tokens == 0 or batch == 0:
        return out
    if max_query_len is None:
        max_query_len = int((cu_seqlens_q[1:] - cu_seqlens_q[:-1]).max())
    tile_m, tile_n, num_warps, num_stages = _prefill_launch_config(q.dtype, head_dim)
    return _launch_prefill(
        q, k_cache, v_cache, block_tables, cu_seqlens_q, context_lens, scale, out, max_query_len,
        tile_m=tile_m, tile_n=tile_n, num_warps=num_warps, num_stages=num_stages,
    )


def _launch_prefill(q, k_cache, v_cache, block_tables, cu_seqlens_q, context_lens, scale, out, max_query_len, *,
                    tile_m, tile_n, num_warps, num_stages) -> torch.Tensor:
    """Launch the prefill kernel with an explicit tile configuration."""
    batch, head_dim = cu_seqlens_q.shape[0] - 1, q.shape[2]
    kv_heads = k_cache.shape[2]
    group = q.shape[1] // kv_heads
    grid = (batch, kv_heads, triton.cdiv(max_query_len * group, tile_m))
    _paged_prefill_kernel[grid](
        q, k_cache, v_cache, block_tables, cu_seqlens_q, context_lens, out,
        scale * LOG2_E, k_cache.shape[1],
        q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        block_tables.stride(0),
        out.stride(0), out.stride(1),
        GROUP=group, HEAD_DIM=head_dim, HEAD_DIM_PADDED=_padded_head_dim(head_dim),
        TILE_M=tile_m, TILE_N=tile_n, DOT_PRECISION=_dot_precision(q.dtype),
        num_warps=num_warps, num_stages=num_stages,
    )
    return out


# ---------------------------------------------------------------------------------------------------------
# The backend the model uses
# ---------------------------------------------------------------------------------------------------------


class TritonAttentionBackend:
    """Store new K/V with the Triton store; attend with the decode kernel when every sequence brings exactly
    one token, else with the prefill kernel. Without a cache, fall back to torch_ref.varlen_attention."""

    name = "triton"
    supports_cuda_graphs = True  # reads lengths and tables from device memory; launches of fixed shapes
    accepts_stored_kv = True  # forward(..., kv_stored=True): the model's fused kernel already stored the new K/V

    def forward(self, q, k, v, k_cache, v_cache, metadata: AttentionMetadata, scale: float,
                kv_stored: bool = False) -> torch.Tensor:
        """q: [tokens, heads, head_dim]; k, v: [tokens, kv_heads, head_dim]; caches: [num_blocks, block_size,
        kv_heads, head_dim] each, or None (no cache: attention over this step's tokens only)."""
        if k_cache is None or not metadata.uses_cache:
            return torch_ref.varlen_attention(q, k, v, metadata.cu_seqlens_q, scale)
        if not kv_stored:
            store_kvcache(k, v, k_cache, v_cache, metadata.slot_mapping)
        max_context_len = max(metadata.context_lens_host) if metadata.context_lens_host else None
        if metadata.is_decode:
            return paged_decode_attention(
                q, k_cache, v_cache, metadata.block_tables, metadata.context_lens, scale,
                max_context_len=max_context_len, seq_order=metadata.decode_order,
            )
        return paged_prefill_attention(
            q, k_cache, v_cache, metadata.block_tables, metadata.cu_seqlens_q, metadata.context_lens, scale,
            max_query_len=metadata.max_query_len,
        )


# ---------------------------------------------------------------------------------------------------------
# Helpers: checks, padding, launch configurations
# ---------------------------------------------------------------------------------------------------------

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MAX_HEAD_DIM = 256


def _check_cache(k_cache: torch.Tensor, v_cache: torch.Tensor) -> None:
    if k_cache.dim() != 4 or k_cache.shape != v_cache.shape:
        raise ValueError(
            "k_cache and v_cache must both be [num_blocks, block_size, kv_heads, head_dim], got "
            f"{tuple(k_cache.shape)} and {tuple(v_cache.shape)}"
        )
    if not (k_cache.is_contiguous() and v_cache.is_contiguous()):
        raise ValueError("k_cache and v_cache must be contiguous tensors")
    if k_cache.dtype != v_cache.dtype or k_cache.dtype not in SUPPORTED_DTYPES:
        raise TypeError(
            f"caches must share one dtype, one of {SUPPORTED_DTYPES}; got {k_cache.dtype} and {v_cache.dtype}"
        )
    if k_cache.shape[-1] > MAX_HEAD_DIM:
        raise ValueError(
            f"head_dim {k_cache.shape[-1]} is not supported: these kernels handle head_dim <= {MAX_HEAD_DIM}"
        )


def _check_attention_inputs(q, k_cache, v_cache, block_tables, context_lens, batch: int) -> int:
    """Validate shapes and dtypes shared by both attention kernels; return the GQA group size."""
    _check_cache(k_cache, v_cache)
    if q.dim() != 3 or q.shape[-1] != k_cache.shape[-1]:
        raise ValueError(f"q must be [*, heads, head_dim={k_cache.shape[-1]}], got {tuple(q.shape)}")
    if q.stride(-1) != 1:
        raise ValueError("q must be contiguous in its last (head_dim) dimension")
    if q.dtype != k_cache.dtype:
        raise TypeError(f"q is {q.dtype} but the cache is {k_cache.dtype}; cast one to match")
    num_heads, kv_heads = q.shape[1], k_cache.shape[2]
    if num_heads % kv_heads != 0:
        raise ValueError(f"query heads ({num_heads}) must be a multiple of kv_heads ({kv_heads})")
    if block_tables.dim() != 2 or block_tables.shape[0] != batch or block_tables.dtype != torch.int32:
        raise ValueError(f"block_tables must be int32 [{batch}, max_blocks], got {block_tables.dtype} "
                         f"{tuple(block_tables.shape)}")
    if context_lens.shape != (batch,) or context_lens.dtype != torch.int32:
        raise ValueError(f"context_lens must be int32 [{batch}], got {context_lens.dtype} "
                         f"{tuple(context_lens.shape)}")
    return num_heads // kv_heads


def _output_like(q: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
    if out is None:
        return torch.empty(q.shape, dtype=q.dtype, device=q.device)
    if out.shape != q.shape or out.dtype != q.dtype or out.stride(-1) != 1:
        raise ValueError(f"out must be {q.dtype} {tuple(q.shape)}, contiguous in its last dimension")
    return out


def _padded_head_dim(head_dim: int) -> int:
    """tl.arange and tl.dot need a power of two >= 16: head_dim 96 computes on 128 lanes, 32 masked off."""
    return max(16, triton.next_power_of_2(head_dim))


def _dot_precision(dtype: torch.dtype) -> str:
    """float32 inputs get true float32 products; Triton's default would round them to tf32 on the GPU."""
    return "ieee" if dtype == torch.float32 else "tf32"


def _decode_launch_config(dtype: torch.dtype, head_dim: int, num_splits: int = 1) -> tuple[int, int, int]:
    """(TILE_N, num_warps, num_stages) for the decode kernel; 4-byte types get half the tile (same bytes).

    Chosen by `benchmarks/attention_kernels.py`'s sweep on an H200 (bf16, head_dim 128): three stages keep
    the next tiles' loads in flight while this one is computed (96% of copy bandwidth, against 90% with two).
    A split launch (smaller batches) reads SPLIT_TILE_FACTOR times longer tiles: half the loop trips for each
    program's short slice, 3-5% faster at 32-192 sequences, where a whole batch of 256 is not
    (`benchmarks/decode_kernel_sweep.py`, RESULTS.md 2026-12-03 seventeenth session).
    """
    tile_n = 64 if dtype != torch.float32 and head_dim <= 128 else 32
    return tile_n * (SPLIT_TILE_FACTOR if num_splits > 1 else 1), 4, 3


def _prefill_launch_config(dtype: torch.dtype, head_dim: int) -> tuple[int, int, int, int]:
    """(TILE_M, TILE_N, num_warps, num_stages) for the prefill kernel."""
    if head_dim > 128:
        return 64, 32, 8, 2
    if dtype == torch.float32:
        return 64, 32, 4, 2
    return 64, 64, 4, 2


@functools.lru_cache(maxsize=None)
def _multiprocessor_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4  # the interpreter on the CPU: any small number; it only shapes the split choice


__all__ = [
    "store_kvcache", "paged_decode_attention", "paged_prefill_attention", "TritonAttentionBackend",
    "choose_num_splits",
]
