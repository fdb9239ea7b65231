"""Fused Triton kernels for the decoder's elementwise work: residual add + RMSNorm, RoPE, and SiLU-and-multiply.

Why: in a decode step each of these is a handful of tiny torch kernels (RMSNorm alone is upcast, square, mean,
rsqrt, multiply, downcast, multiply). At a few microseconds each, times 28 layers, they cost as much GPU time
as the weight matrices. One kernel per operation reads each input once and writes each output once.

Second round (fewer launches per layer): the residual add with the RMSNorm after it (add_rms_norm), which must
give the bits of the add and the norm kernel, composed: the same per-row code through shared helpers
(_inverse_rms, _normed), one norm row per program, and the add computed in float32 then rounded to nearest even,
as torch's add of two bf16 / fp16 tensors is. That keeps tests/test_gpu.py's bf16 agreement with transformers unchanged (a different
float32 sum order is enough to break it, see the RMSNorm note below RoPE's launch shape). tests/test_fused.py
checks the equality in the interpreter and, compiled, on a GPU (its `gpu` test). A kernel for Qwen3's q/k-norm
followed by RoPE (one launch for both tensors) was tried on 2026-12-01 and removed: bit-equal in the interpreter,
but compiled for an H200 its bf16 / fp16 outputs differed from the two kernels it replaced (benchmarks/RESULTS.md).

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
def _rotary_kernel(x_ptr, cos_ptr, sin_ptr, out_ptr, n_rows, num_heads, half, ROWS: tl.constexpr,
                   BLOCK: tl.constexpr):
    """ROWS (token, head) rows: (x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin), rounding like the torch code.
    half = head_dim / 2; BLOCK is the next power of two (a Triton block's size must be one), masked down."""
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)[:, None]  # row = token * num_heads + head
    token = rows // num_heads
    dtype = out_ptr.dtype.element_ty
    base = rows * 2 * half
    cols = tl.arange(0, BLOCK)[None, :]
    mask = (rows < n_rows) & (cols < half)
    x1 = tl.load(x_ptr + base + cols, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(x_ptr + base + half + cols, mask=mask, other=0.0).to(tl.float32)
    # Both halves of a row rotate by the same angles; the tables are float32, cast to x's dtype as torch does.
    cos = _rounded(tl.load(cos_ptr + token * 2 * half + cols, mask=mask, other=0.0), dtype)
    sin = _rounded(tl.load(sin_ptr + token * 2 * half + cols, mask=mask, other=0.0), dtype)
    out1 = _rounded(_rounded(x1 * cos, dtype) + _rounded(-x2 * sin, dtype), dtype)
    out2 = _rounded(_rounded(x2 * cos, dtype) + _rounded(x1 * sin, dtype), dtype)
    tl.store(out_ptr + base + cols, out1.to(dtype), mask=mask)
    tl.store(out_ptr + base + half + cols, out2.to(dtype), mask=mask)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                 rows_per_program: int | None = None) -> torch.Tensor:
    """x: [num_tokens, heads, head_dim] (head_dim even); cos, sin: float32 [num_tokens, 1, head_dim] -> rotated x
    (new tensor). rows_per_program: (token, head) rows per program (None: ROW_ELEMENTS per program)."""
    num_tokens, num_heads, head_dim = x.shape
    if head_dim % 2:
        raise ValueError(f"RoPE rotates pairs of dimensions: head_dim must be even, got {head_dim}")
    x = x.contiguous()
    out = torch.empty_like(x)
    if num_tokens:
        half = head_dim // 2
        block = triton.next_power_of_2(half)
        rows = rows_per_program or max(1, ROW_ELEMENTS // (2 * block))
        n_rows = num_tokens * num_heads
        _rotary_kernel[(triton.cdiv(n_rows, rows),)](x, cos.contiguous(), sin.contiguous(), out, n_rows, num_heads,
                                                     half, ROWS=rows, BLOCK=block)
    return out


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
