"""Fused Triton kernels for the decoder's elementwise work: residual add + RMSNorm, RoPE, and SiLU-and-multiply.

Why: in a decode step each of these is a handful of tiny torch kernels (RMSNorm alone is upcast, square, mean,
rsqrt, multiply, downcast, multiply). At a few microseconds each, times 28 layers, they cost as much GPU time
as the weight matrices. One kernel per operation reads each input once and writes each output once.

Second round (fewer launches per layer, 5 instead of 10 small ones): the residual add with the RMSNorm after it
(add_rms_norm), and Qwen3's q/k-norm with RoPE for q and k (qk_norm_rotary; apply_rotary_qk without the norm).
Each must give the bits of the kernels it replaces, composed: the same per-row code through shared helpers
(_inverse_rms, _normed, _rotated), one norm row per program, the normed q/k rounded to the dtype before the
rotation as if stored, and the add computed in float32 then rounded to nearest even, as torch's add of two
bf16 / fp16 tensors is. That keeps tests/test_gpu.py's bf16 agreement with transformers unchanged (a different
float32 sum order is enough to break it, see the RMSNorm note below RoPE's launch shape). tests/test_fused.py
checks the equality in the interpreter and, compiled, on a GPU (its `gpu` test).

Exactness: each kernel rounds where the torch twin in llama.py / rotary.py rounds (for example RoPE multiplies
and adds in the tensor's dtype, as Hugging Face does). In the Triton interpreter RoPE is then bit-identical to
the torch code; compiled for an H200, about a fifth of its bfloat16 outputs land one unit in the last place
away (a step-by-step torch emulation of the kernel's arithmetic matches torch exactly, so the compiled code's
rounding differs somewhere; not yet pinned down). RMSNorm's float32 mean is summed in another order and SiLU's
exp is another implementation: last-bit differences. tests/test_fused.py bounds each kernel to one unit of the
output dtype, and tests/test_gpu.py checks the whole engine, fused, against transformers' greedy tokens.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rounded(x, dtype: tl.constexpr):
    """x (float32) rounded to `dtype` the way torch rounds each op's result (nearest even), kept in float32."""
    return x.to(dtype, fp_downcast_rounding="rtne").to(tl.float32)


@triton.jit
def _inverse_rms(x, n_cols, eps):
    """1 / sqrt(mean(x^2) + eps) of one float32 row x [BLOCK] (zeros past n_cols). Every RMSNorm kernel sums
    through this one function, one row per program, so they all add the squares in the same order."""
    return 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / n_cols + eps)


@triton.jit
def _normed(x, inv_rms, weight, dtype: tl.constexpr):
    """(x * inv_rms) * weight, rounded to `dtype` after each multiply as the torch code rounds."""
    normed = _rounded(x * inv_rms, dtype)  # torch: x.to(dtype) before the weight
    return _rounded(normed * weight, dtype)


@triton.jit
def _rms_norm_kernel(x_ptr, weight_ptr, out_ptr, n_cols, eps, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    x = tl.load(x_ptr + row * n_cols + cols, mask=mask, other=0.0).to(tl.float32)
    inv_rms = _inverse_rms(x, n_cols, eps)
    dtype = out_ptr.dtype.element_ty
    weight = tl.load(weight_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * n_cols + cols, _normed(x, inv_rms, weight, dtype).to(dtype), mask=mask)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x: [..., dim] (any float dtype), weight: [dim] of x's dtype -> [..., dim], normalised over the last dim."""
    shape = x.shape
    x = x.reshape(-1, shape[-1]).contiguous()
    out = torch.empty_like(x)
    if x.shape[0]:
        _rms_norm_kernel[(x.shape[0],)](x, weight, out, x.shape[1], eps, BLOCK=triton.next_power_of_2(x.shape[1]))
    return out.view(shape)


@triton.jit
def _add_rms_norm_kernel(x_ptr, residual_ptr, weight_ptr, sum_ptr, out_ptr, n_cols, eps, BLOCK: tl.constexpr):
    """One row: sum = residual + x (rounded to the dtype, as torch's add rounds), then out = RMSNorm(sum) by the
    same code as _rms_norm_kernel, so out equals rms_norm(residual + x) bit for bit."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    dtype = out_ptr.dtype.element_ty
    x = tl.load(x_ptr + row * n_cols + cols, mask=mask, other=0.0).to(tl.float32)
    residual = tl.load(residual_ptr + row * n_cols + cols, mask=mask, other=0.0).to(tl.float32)
    hidden = _rounded(residual + x, dtype)
    tl.store(sum_ptr + row * n_cols + cols, hidden.to(dtype), mask=mask)
    inv_rms = _inverse_rms(hidden, n_cols, eps)
    weight = tl.load(weight_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * n_cols + cols, _normed(hidden, inv_rms, weight, dtype).to(dtype), mask=mask)


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The residual add and the next RMSNorm in one kernel (one launch, and the sum is not read back):
    x, residual: [..., dim] of one dtype -> (residual + x, rms_norm(residual + x)), both new tensors."""
    shape = x.shape
    x = x.reshape(-1, shape[-1]).contiguous()
    residual = residual.reshape(-1, shape[-1]).contiguous()
    total, out = torch.empty_like(x), torch.empty_like(x)
    if x.shape[0]:
        _add_rms_norm_kernel[(x.shape[0],)](x, residual, weight, total, out, x.shape[1], eps,
                                            BLOCK=triton.next_power_of_2(x.shape[1]))
    return total.view(shape), out.view(shape)


# RoPE's launch shape: a program rotates ROWS (token, head) rows, ROWS = ROW_ELEMENTS // the row's padded size.
# One head row per program made 8192 tokens x 24 heads = 196k programs of 128 elements per kernel, most of each
# program's time spent starting up. RoPE has no reduction, so the packing changes no bit of the result. (RMSNorm
# keeps one row per program: packing its q/k-norm rows changed the order of its float32 sum, and with it enough
# bf16 roundings that tests/test_gpu.py's random model disagreed with transformers more often than the tie rule
# allows, the 2026-11-28 experiment's failure, seen again on 2026-12-01.)
ROW_ELEMENTS = 1024


@triton.jit
def _rotated(x1, x2, cos, sin, dtype: tl.constexpr):
    """(x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin) in float32, rounded to `dtype` where the torch code rounds.
    cos, sin: float32 from the tables, cast to x's dtype first as torch does."""
    cos, sin = _rounded(cos, dtype), _rounded(sin, dtype)
    out1 = _rounded(_rounded(x1 * cos, dtype) + _rounded(-x2 * sin, dtype), dtype)
    out2 = _rounded(_rounded(x2 * cos, dtype) + _rounded(x1 * sin, dtype), dtype)
    return out1, out2


@triton.jit
def _rotate_rows(x_ptr, cos_ptr, sin_ptr, out_ptr, program, n_rows, num_heads, half, ROWS: tl.constexpr,
                 BLOCK: tl.constexpr):
    """Rotate the `program`-th group of ROWS (token, head) rows of x. half = head_dim / 2; BLOCK is the next power
    of two (a Triton block's size must be one), masked down."""
    rows = program.to(tl.int64) * ROWS + tl.arange(0, ROWS)[:, None]  # row = token * num_heads + head
    token = rows // num_heads
    dtype = out_ptr.dtype.element_ty
    base = rows * 2 * half
    cols = tl.arange(0, BLOCK)[None, :]
    mask = (rows < n_rows) & (cols < half)
    x1 = tl.load(x_ptr + base + cols, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(x_ptr + base + half + cols, mask=mask, other=0.0).to(tl.float32)
    # Both halves of a row rotate by the same angles.
    cos = tl.load(cos_ptr + token * 2 * half + cols, mask=mask, other=0.0)
    sin = tl.load(sin_ptr + token * 2 * half + cols, mask=mask, other=0.0)
    out1, out2 = _rotated(x1, x2, cos, sin, dtype)
    tl.store(out_ptr + base + cols, out1.to(dtype), mask=mask)
    tl.store(out_ptr + base + half + cols, out2.to(dtype), mask=mask)


@triton.jit
def _rotary_kernel(x_ptr, cos_ptr, sin_ptr, out_ptr, n_rows, num_heads, half, ROWS: tl.constexpr,
                   BLOCK: tl.constexpr):
    _rotate_rows(x_ptr, cos_ptr, sin_ptr, out_ptr, tl.program_id(0), n_rows, num_heads, half, ROWS, BLOCK)


# num_tokens changes every step; it only bounds the row mask, so one compiled variant serves every step size
# (Triton would otherwise compile one for 1, one for multiples of 16 and one for the rest: see warmup.py).
@triton.jit(do_not_specialize=["num_tokens"])
def _rotary_qk_kernel(q_ptr, k_ptr, cos_ptr, sin_ptr, q_out_ptr, k_out_ptr, num_tokens, num_q_heads,
                      num_kv_heads, half, ROWS: tl.constexpr, BLOCK: tl.constexpr):
    """_rotary_kernel over q and then k in one launch: the first programs take q's rows, the rest k's."""
    program = tl.program_id(0)
    q_programs = tl.cdiv(num_tokens * num_q_heads, ROWS)
    if program < q_programs:
        _rotate_rows(q_ptr, cos_ptr, sin_ptr, q_out_ptr, program, num_tokens * num_q_heads, num_q_heads, half,
                     ROWS, BLOCK)
    else:
        _rotate_rows(k_ptr, cos_ptr, sin_ptr, k_out_ptr, program - q_programs, num_tokens * num_kv_heads,
                     num_kv_heads, half, ROWS, BLOCK)


def _check_head_dim(head_dim: int) -> None:
    if head_dim % 2:
        raise ValueError(f"RoPE rotates pairs of dimensions: head_dim must be even, got {head_dim}")


def _rows_per_program(head_dim: int, rows_per_program: int | None) -> int:
    return rows_per_program or max(1, ROW_ELEMENTS // (2 * triton.next_power_of_2(head_dim // 2)))


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                 rows_per_program: int | None = None) -> torch.Tensor:
    """x: [num_tokens, heads, head_dim] (head_dim even); cos, sin: float32 [num_tokens, 1, head_dim] -> rotated x
    (new tensor). rows_per_program: (token, head) rows per program (None: ROW_ELEMENTS per program)."""
    num_tokens, num_heads, head_dim = x.shape
    _check_head_dim(head_dim)
    x = x.contiguous()
    out = torch.empty_like(x)
    if num_tokens:
        half = head_dim // 2
        rows = _rows_per_program(head_dim, rows_per_program)
        n_rows = num_tokens * num_heads
        _rotary_kernel[(triton.cdiv(n_rows, rows),)](x, cos.contiguous(), sin.contiguous(), out, n_rows, num_heads,
                                                     half, ROWS=rows, BLOCK=triton.next_power_of_2(half))
    return out


def apply_rotary_qk(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                    rows_per_program: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """apply_rotary(q, ...), apply_rotary(k, ...) in one launch, bit for bit (RoPE has no reduction).
    q: [num_tokens, q_heads, head_dim], k: [num_tokens, kv_heads, head_dim] of one dtype."""
    num_tokens, num_q_heads, head_dim = q.shape
    _check_head_dim(head_dim)
    q, k = q.contiguous(), k.contiguous()
    q_out, k_out = torch.empty_like(q), torch.empty_like(k)
    if num_tokens:
        rows = _rows_per_program(head_dim, rows_per_program)
        programs = triton.cdiv(num_tokens * num_q_heads, rows) + triton.cdiv(num_tokens * k.shape[1], rows)
        _rotary_qk_kernel[(programs,)](q, k, cos.contiguous(), sin.contiguous(), q_out, k_out, num_tokens,
                                       num_q_heads, k.shape[1], head_dim // 2, ROWS=rows,
                                       BLOCK=triton.next_power_of_2(head_dim // 2))
    return q_out, k_out


@triton.jit
def _norm_rotate_row(x_ptr, weight_ptr, cos_ptr, sin_ptr, out_ptr, token, row, head_dim, eps, BLOCK: tl.constexpr,
                     HALF_BLOCK: tl.constexpr):
    """RMSNorm one (token, head) row as _rms_norm_kernel does (the sum over the whole row at once), then rotate
    its halves as _rotary_kernel does: the normed values never leave registers, but round as if they had."""
    dtype = out_ptr.dtype.element_ty
    base = row * head_dim
    cols = tl.arange(0, BLOCK)
    x = tl.load(x_ptr + base + cols, mask=cols < head_dim, other=0.0).to(tl.float32)
    inv_rms = _inverse_rms(x, head_dim, eps)
    half = head_dim // 2
    halves = tl.arange(0, HALF_BLOCK)
    mask = halves < half
    x1 = tl.load(x_ptr + base + halves, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(x_ptr + base + half + halves, mask=mask, other=0.0).to(tl.float32)
    w1 = tl.load(weight_ptr + halves, mask=mask, other=0.0).to(tl.float32)
    w2 = tl.load(weight_ptr + half + halves, mask=mask, other=0.0).to(tl.float32)
    cos = tl.load(cos_ptr + token * head_dim + halves, mask=mask, other=0.0)
    sin = tl.load(sin_ptr + token * head_dim + halves, mask=mask, other=0.0)
    out1, out2 = _rotated(_normed(x1, inv_rms, w1, dtype), _normed(x2, inv_rms, w2, dtype), cos, sin, dtype)
    tl.store(out_ptr + base + halves, out1.to(dtype), mask=mask)
    tl.store(out_ptr + base + half + halves, out2.to(dtype), mask=mask)


@triton.jit
def _qk_norm_rotary_kernel(q_ptr, k_ptr, q_weight_ptr, k_weight_ptr, cos_ptr, sin_ptr, q_out_ptr, k_out_ptr,
                           num_q_heads, num_kv_heads, head_dim, eps, BLOCK: tl.constexpr, HALF_BLOCK: tl.constexpr):
    """Program (token, head): heads below num_q_heads are q's, the rest k's. One row per program, like RMSNorm."""
    token = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    if head < num_q_heads:
        _norm_rotate_row(q_ptr, q_weight_ptr, cos_ptr, sin_ptr, q_out_ptr, token, token * num_q_heads + head,
                         head_dim, eps, BLOCK, HALF_BLOCK)
    else:
        _norm_rotate_row(k_ptr, k_weight_ptr, cos_ptr, sin_ptr, k_out_ptr, token,
                         token * num_kv_heads + (head - num_q_heads), head_dim, eps, BLOCK, HALF_BLOCK)


def qk_norm_rotary(q: torch.Tensor, k: torch.Tensor, q_weight: torch.Tensor, k_weight: torch.Tensor, eps: float,
                   cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Qwen3's per-head RMSNorm of q and k, then RoPE, in one launch: bit for bit
    apply_rotary(rms_norm(q, q_weight, eps), cos, sin) and the same for k.
    q: [num_tokens, q_heads, head_dim], k: [num_tokens, kv_heads, head_dim]; weights: [head_dim]."""
    num_tokens, num_q_heads, head_dim = q.shape
    _check_head_dim(head_dim)
    q, k = q.contiguous(), k.contiguous()
    q_out, k_out = torch.empty_like(q), torch.empty_like(k)
    if num_tokens:
        grid = (num_tokens, num_q_heads + k.shape[1])
        _qk_norm_rotary_kernel[grid](q, k, q_weight, k_weight, cos.contiguous(), sin.contiguous(), q_out, k_out,
                                     num_q_heads, k.shape[1], head_dim, eps, BLOCK=triton.next_power_of_2(head_dim),
                                     HALF_BLOCK=triton.next_power_of_2(head_dim // 2))
    return q_out, k_out


@triton.jit
def _silu_and_mul_kernel(gate_ptr, up_ptr, out_ptr, n, BLOCK: tl.constexpr):
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < n
    dtype = out_ptr.dtype.element_ty
    gate = tl.load(gate_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(up_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    silu = _rounded(gate / (1.0 + tl.exp(-gate)), dtype)  # torch rounds silu's output first
    tl.store(out_ptr + offsets, _rounded(silu * up, dtype).to(dtype), mask=mask)


def silu_and_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up for two tensors of one shape and dtype."""
    gate, up = gate.contiguous(), up.contiguous()
    out = torch.empty_like(gate)
    n = gate.numel()
    if n:
        block = 1024
        _silu_and_mul_kernel[(triton.cdiv(n, block),)](gate, up, out, n, BLOCK=block)
    return out
