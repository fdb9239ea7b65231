"""Fused Triton kernels for the decoder's elementwise work: RMSNorm, RoPE, and SiLU-and-multiply.

Why: in a decode step each of these is a handful of tiny torch kernels (RMSNorm alone is upcast, square, mean,
rsqrt, multiply, downcast, multiply). At a few microseconds each, times 28 layers, they cost as much GPU time
as the weight matrices. One kernel per operation reads each input once and writes each output once.

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
def _rms_norm_kernel(x_ptr, weight_ptr, out_ptr, n_rows, n_cols, eps, ROWS: tl.constexpr, BLOCK: tl.constexpr):
    """ROWS rows per program (short rows, such as Qwen3's per-head q/k norms, would leave one program idle)."""
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)[:, None]
    cols = tl.arange(0, BLOCK)[None, :]
    mask = (rows < n_rows) & (cols < n_cols)
    x = tl.load(x_ptr + rows * n_cols + cols, mask=mask, other=0.0).to(tl.float32)
    inv_rms = 1.0 / tl.sqrt(tl.sum(x * x, axis=1) / n_cols + eps)
    dtype = out_ptr.dtype.element_ty
    normed = _rounded(x * inv_rms[:, None], dtype)  # torch: x.to(dtype) before the weight
    weight = tl.load(weight_ptr + cols, mask=cols < n_cols, other=0.0).to(tl.float32)
    tl.store(out_ptr + rows * n_cols + cols, _rounded(normed * weight, dtype).to(dtype), mask=mask)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x: [..., dim] (any float dtype), weight: [dim] of x's dtype -> [..., dim], normalised over the last dim."""
    shape = x.shape
    x = x.reshape(-1, shape[-1]).contiguous()
    out = torch.empty_like(x)
    n_rows, n_cols = x.shape
    if n_rows:
        block = triton.next_power_of_2(n_cols)
        rows = max(1, 2048 // block)  # about 2048 elements per program
        _rms_norm_kernel[(triton.cdiv(n_rows, rows),)](x, weight, out, n_rows, n_cols, eps, ROWS=rows, BLOCK=block)
    return out.view(shape)


@triton.jit
def _rotary_kernel(x_ptr, cos_ptr, sin_ptr, out_ptr, num_heads, HEADS: tl.constexpr, HALF: tl.constexpr):
    """All heads of one token: (x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin), rounding like the torch code."""
    token = tl.program_id(0).to(tl.int64)
    dtype = out_ptr.dtype.element_ty
    heads = tl.arange(0, HEADS)[:, None]  # HEADS: num_heads rounded up to a power of two
    cols = tl.arange(0, HALF)[None, :]
    mask = heads < num_heads
    first = (token * num_heads + heads) * 2 * HALF + cols  # offsets of each head's first half
    x1 = tl.load(x_ptr + first, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(x_ptr + first + HALF, mask=mask, other=0.0).to(tl.float32)
    # Both halves of a row rotate by the same angles; the tables are float32, cast to x's dtype as torch does.
    cos = _rounded(tl.load(cos_ptr + token * 2 * HALF + cols), dtype)
    sin = _rounded(tl.load(sin_ptr + token * 2 * HALF + cols), dtype)
    out1 = _rounded(_rounded(x1 * cos, dtype) + _rounded(-x2 * sin, dtype), dtype)
    out2 = _rounded(_rounded(x2 * cos, dtype) + _rounded(x1 * sin, dtype), dtype)
    tl.store(out_ptr + first, out1.to(dtype), mask=mask)
    tl.store(out_ptr + first + HALF, out2.to(dtype), mask=mask)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [num_tokens, heads, head_dim]; cos, sin: float32 [num_tokens, 1, head_dim] -> rotated x (new tensor)."""
    num_tokens, num_heads, head_dim = x.shape
    if head_dim & (head_dim - 1):
        raise ValueError(f"the fused RoPE kernel needs a power-of-two head_dim, got {head_dim}")
    x = x.contiguous()
    out = torch.empty_like(x)
    if num_tokens:
        _rotary_kernel[(num_tokens,)](x, cos.contiguous(), sin.contiguous(), out, num_heads,
                                      HEADS=triton.next_power_of_2(num_heads), HALF=head_dim // 2)
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
