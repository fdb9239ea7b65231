"""q and k from the packed projection to the paged cache in one launch: Qwen3's q/k-norm, RoPE, and the store of
the new K/V into their cache slots.

Why: a decode step is launch-bound (about 330 small kernels, 5-8 us each whatever their bytes, see
benchmarks/RESULTS.md), and per layer these were three launches: the q/k-norm pair, the RoPE pair and the cache
store. One program now takes a few (token, head) rows from the packed q/k/v output to their end: normed, rotated,
written out, and for k rows also written with that token's v row into the cache.

Bits: the rows are normed by the same code as fused.py's RMSNorm kernel (the same tile, the same float32 sum
through fused._inverse_rms), then rotated by RoPE's arithmetic, rounding where the torch code rounds. RoPE pairs
column i with column i +- head_dim/2 (rotate_half); rather than re-reading the normed row from memory, each
program also loads the row in partner order and norms it with the same inverse RMS, which gives every element
the very value the norm kernel would have stored (each is x * inv_rms * weight, element by element). So the
results are bit for bit rms_norm_pair, then apply_rotary_pair, then store_kvcache (tests/test_fused_qk.py, in the
interpreter and compiled on the GPU).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .fused import _inverse_rms, _normed, _rounded, _row_start, _tile, norm_rows_per_program


@triton.jit
def _qk_rows(x_ptr, weight_ptr, out_ptr, cos_ptr, sin_ptr, rows, cols, mask, rows_per_token, stride_token,
             stride_row, n_cols, eps, NORM: tl.constexpr):
    """Rows `rows` [ROWS, 1] of a [tokens, heads, n] view: normed (NORM) then rotated, into the same rows of a
    contiguous output. Returns the rotated rows (float32, already rounded to the output's dtype).
    Every load comes first: the norm's sum waits at a barrier, and a load written after it would start only then,
    one more memory round trip (the kernel is latency-bound)."""
    half = n_cols // 2
    partner = tl.where(cols < half, cols + half, cols - half)  # rotate_half's source column
    start = _row_start(rows, rows_per_token, stride_token, stride_row)
    x = tl.load(x_ptr + start + cols, mask=mask, other=0.0).to(tl.float32)
    x_partner = tl.load(x_ptr + start + partner, mask=mask, other=0.0).to(tl.float32)
    if NORM:
        weight = tl.load(weight_ptr + cols, mask=cols < n_cols, other=0.0).to(tl.float32)
        weight_partner = tl.load(weight_ptr + partner, mask=cols < n_cols, other=0.0).to(tl.float32)
    # Both halves of a row rotate by the same angles (the tables repeat them); float32, cast to x's dtype as torch.
    angle = (rows // rows_per_token) * n_cols + tl.where(cols < half, cols, cols - half)
    cos = tl.load(cos_ptr + angle, mask=mask, other=0.0)
    sin = tl.load(sin_ptr + angle, mask=mask, other=0.0)
    dtype = out_ptr.dtype.element_ty
    if NORM:
        inv_rms = _inverse_rms(x, n_cols, eps)  # the norm kernel's tile and sum (same ROWS for the width)
        x = _normed(x, inv_rms, weight, dtype)
        x_partner = _normed(x_partner, inv_rms, weight_partner, dtype)
    rotated = tl.where(cols < half, -x_partner, x_partner)  # rotate_half(x) = (-x2, x1)
    out = _rounded(x * _rounded(cos, dtype), dtype) + _rounded(rotated * _rounded(sin, dtype), dtype)
    out = _rounded(out, dtype)
    tl.store(out_ptr + rows * n_cols + cols, out.to(dtype), mask=mask)
    return out


# q_programs is only compared with: no separate compilation for each of its values' divisibility classes.
@triton.jit(do_not_specialize=["q_programs"])
def _qk_norm_rope_store_kernel(
    q_ptr, q_weight_ptr, q_out_ptr, q_rows, q_programs, q_heads, q_stride_token, q_stride_head,
    k_ptr, k_weight_ptr, k_out_ptr, k_rows, k_heads, k_stride_token, k_stride_head,
    v_ptr, v_stride_token, v_stride_head, k_cache_ptr, v_cache_ptr, slot_mapping_ptr,
    block_size, stride_cache_block, stride_cache_slot, stride_cache_head,
    cos_ptr, sin_ptr, n_cols, eps, NORM: tl.constexpr, STORE: tl.constexpr, ROWS: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """The first q_programs programs do q's rows, ROWS each (the norm kernel's tile), the others k's; a k row also
    goes to its token's cache slot (STORE), with the token's v row for the same head."""
    program = tl.program_id(0).to(tl.int64)
    if program < q_programs:
        rows, cols, mask = _tile(program, q_rows, n_cols, ROWS, BLOCK)
        _qk_rows(q_ptr, q_weight_ptr, q_out_ptr, cos_ptr, sin_ptr, rows, cols, mask, q_heads, q_stride_token,
                 q_stride_head, n_cols, eps, NORM)
    else:
        rows, cols, mask = _tile(program - q_programs, k_rows, n_cols, ROWS, BLOCK)
        token, head = rows // k_heads, rows % k_heads
        if STORE:  # loaded before the rows' work, for the same reason as _qk_rows' loads
            slot = tl.load(slot_mapping_ptr + token, mask=rows < k_rows, other=-1)
            v = tl.load(v_ptr + token * v_stride_token + head * v_stride_head + cols, mask=mask)
        k = _qk_rows(k_ptr, k_weight_ptr, k_out_ptr, cos_ptr, sin_ptr, rows, cols, mask, k_heads, k_stride_token,
                     k_stride_head, n_cols, eps, NORM)
        if STORE:
            stored = mask & (slot >= 0)  # -1: a padding token, nothing to store
            cache = (slot // block_size) * stride_cache_block + (slot % block_size) * stride_cache_slot
            cache += head * stride_cache_head + cols
            k_stored = k.to(k_out_ptr.dtype.element_ty)  # the value k_out holds, then the cache's dtype
            tl.store(k_cache_ptr + cache, k_stored.to(k_cache_ptr.dtype.element_ty), mask=stored)
            tl.store(v_cache_ptr + cache, v.to(v_cache_ptr.dtype.element_ty), mask=stored)


def _heads_view(x: torch.Tensor, name: str) -> torch.Tensor:
    if x.dim() != 3:
        raise ValueError(f"{name} must be [num_tokens, heads, head_dim], got shape {tuple(x.shape)}")
    return x if x.stride(-1) == 1 else x.contiguous()


def checked_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_weight, k_weight):
    """(q, k, v), each with a contiguous last dim, once their shapes and the norm weights are checked."""
    q, k, v = _heads_view(q, "q"), _heads_view(k, "k"), _heads_view(v, "v")
    tokens, _, head_dim = k.shape
    if q.shape[0] != tokens or q.shape[2] != head_dim or v.shape != k.shape:
        raise ValueError(f"q {tuple(q.shape)}, k {tuple(k.shape)} and v {tuple(v.shape)} must share tokens and "
                         "head_dim, and k and v their shape")
    if head_dim % 2:
        raise ValueError(f"RoPE rotates pairs of dimensions: head_dim must be even, got {head_dim}")
    if (q_weight is None) != (k_weight is None):
        raise ValueError("give both q_weight and k_weight (Qwen3's q/k-norm) or neither")
    return q, k, v


def _check_cache(k_cache, v_cache, slot_mapping, tokens: int, kv_heads: int, head_dim: int) -> None:
    if v_cache is None or slot_mapping is None:
        raise ValueError("storing into the cache needs k_cache, v_cache and slot_mapping")
    if k_cache.shape != v_cache.shape or k_cache.dim() != 4 or k_cache.shape[2:] != (kv_heads, head_dim):
        raise ValueError(f"caches must be [num_blocks, block_size, {kv_heads}, {head_dim}], got "
                         f"{tuple(k_cache.shape)} and {tuple(v_cache.shape)}")
    if not (k_cache.is_contiguous() and v_cache.is_contiguous()):
        raise ValueError("k_cache and v_cache must be contiguous tensors")
    if slot_mapping.shape != (tokens,):
        raise ValueError(f"slot_mapping must have shape [{tokens}], got {tuple(slot_mapping.shape)}")


def _outputs(q: torch.Tensor, k: torch.Tensor, out) -> tuple[torch.Tensor, torch.Tensor]:
    """New contiguous tensors like q and k, or `out`'s two once checked."""
    if out is None:
        return (torch.empty(q.shape, dtype=q.dtype, device=q.device),
                torch.empty(k.shape, dtype=k.dtype, device=k.device))
    for given, like, name in zip(out, (q, k), "qk"):
        if given.shape != like.shape or given.dtype != like.dtype or not given.is_contiguous():
            raise ValueError(f"out's {name} must be contiguous {like.dtype} {tuple(like.shape)}, got "
                             f"{given.dtype} {tuple(given.shape)}")
    return out


def qk_norm_rope_store(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                       q_weight: torch.Tensor | None = None, k_weight: torch.Tensor | None = None, eps: float = 0.0,
                       k_cache: torch.Tensor | None = None, v_cache: torch.Tensor | None = None,
                       slot_mapping: torch.Tensor | None = None,
                       out: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """q: [tokens, heads, head_dim], k and v: [tokens, kv_heads, head_dim] (views with a contiguous last dim, such
    as the packed q/k/v output, are read in place); cos, sin: float32 [tokens, 1, head_dim].
    With q_weight and k_weight (Qwen3's q_norm / k_norm), q and k are RMS-normed first (eps). With the caches
    ([num_blocks, block_size, kv_heads, head_dim], contiguous) and slot_mapping (int64 [tokens], -1 = skip), the
    rotated k and v are written into their slots as store_kvcache writes them.
    Returns the rotated (q, k): new contiguous tensors, or `out`'s two contiguous tensors of q's and k's shapes."""
    q, k, v = checked_qkv(q, k, v, q_weight, k_weight)
    tokens, kv_heads, head_dim = k.shape
    store = k_cache is not None
    if store:
        _check_cache(k_cache, v_cache, slot_mapping, tokens, kv_heads, head_dim)
    q_out, k_out = _outputs(q, k, out)
    q_rows, k_rows = q.shape[0] * q.shape[1], tokens * kv_heads
    if q_rows + k_rows:
        norm = q_weight is not None
        cache = k_cache if store else k_out  # placeholders when not storing: never read or written
        per_program = norm_rows_per_program(head_dim)
        q_programs = triton.cdiv(q_rows, per_program)
        _qk_norm_rope_store_kernel[(q_programs + triton.cdiv(k_rows, per_program),)](
            q, q_weight if norm else q, q_out, q_rows, q_programs, q.shape[1], q.stride(0), q.stride(1),
            k, k_weight if norm else k, k_out, k_rows, kv_heads, k.stride(0), k.stride(1),
            v, v.stride(0), v.stride(1), cache, v_cache if store else k_out,
            slot_mapping if store else k_out,
            cache.shape[1] if store else 1, cache.stride(0) if store else 0, cache.stride(1) if store else 0,
            cache.stride(2) if store else 0,
            cos.contiguous(), sin.contiguous(), head_dim, eps, NORM=norm, STORE=store, ROWS=per_program,
            BLOCK=triton.next_power_of_2(head_dim))
    return q_out, k_out
