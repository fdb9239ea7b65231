"""Fused Triton kernels for the decoder's elementwise work: residual add + RMSNorm, RoPE, and SiLU-and-multiply.

Why: in a decode step each of these is a handful of tiny torch kernels (RMSNorm alone is upcast, square, mean,
rsqrt, multiply, downcast, multiply). At a few microseconds each, times 28 layers, they cost as much GPU time
as the weight matrices. One kernel per operation reads each input once and writes each output once.

Second round (fewer launches per layer): the residual add with the RMSNorm after it (add_rms_norm), which must
give the bits of the add and the norm kernel, composed: the same per-row code through shared helpers
(_inverse_rms, _normed) on tiles of one shape for a row width, and the add computed in float32 then rounded to
nearest even, as torch's add of two bf16 / fp16 tensors is. A different float32 sum order changes last bits, and
with them which side of a near-tie a bf16 model's greedy token falls (see NORM_ROW_ELEMENTS); tests/test_fused.py
checks the equality in the interpreter and, compiled, on a GPU (its `gpu` test). A kernel for Qwen3's q/k-norm
followed by RoPE (one launch for both tensors) was tried on 2026-12-01 and removed: bit-equal in the interpreter,
but compiled for an H200 its bf16 / fp16 outputs differed from the two kernels it replaced (benchmarks/RESULTS.md).

Third round (issue 16): with q/k/v and gate/up packed into one matrix multiply each, q, k, gate and up are views
into a wider output. The kernels read such views in place (a row's start from the token and head strides) instead
of copying them out first (four copies a layer, which had eaten the packing's gain), and Qwen3's q-norm and k-norm,
like q's and k's RoPE, run in one launch each: the first programs do q's rows, the rest k's, each row by the same
code as the single kernel, so the bits are those of two launches (tests/test_fused.py, compiled on the GPU too).

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


# LOADS: every load of a norm kernel is written before its float32 sum. The sum crosses warps through shared memory
# behind a barrier, and a load written after it is issued only then: one more memory round trip for a program that
# does a few short rows (these kernels are latency-bound). Same arithmetic, same bits.


@triton.jit
def _rounded(x, dtype: tl.constexpr):
    """x (float32) rounded to `dtype` the way torch rounds each op's result (nearest even), kept in float32."""
    return x.to(dtype, fp_downcast_rounding="rtne").to(tl.float32)


# RMSNorm's launch shape: a program norms ROWS rows, ROWS = NORM_ROW_ELEMENTS // the row's padded size (at least
# one): Qwen3's q/k-norm rows, 128 wide, go 8 to a program, hidden-size rows one. One short row per program made a
# prefill step's q/k-norm 8192 tokens x 24 heads = 196k programs, most of each one's time spent starting up.
# Bits: a row's float32 sum is the same in every program (the tile's layout is regular), and every RMSNorm kernel
# takes its ROWS from the row width alone, so all of them give one row the same bits. (Another ROWS may sum in
# another order: a last-bit difference, which is why the norm kernels once kept one row each; tests/test_gpu.py now
# measures near-tie differences on many prompts instead, see its note.)
NORM_ROW_ELEMENTS = 1024


def norm_rows_per_program(n_cols: int) -> int:
    return max(1, NORM_ROW_ELEMENTS // triton.next_power_of_2(n_cols))


@triton.jit
def _inverse_rms(x, n_cols, eps):
    """1 / sqrt(mean(x^2) + eps) of each row of a float32 tile x [ROWS, BLOCK] (zeros past n_cols), as [ROWS, 1].
    Every RMSNorm kernel sums through this one function, on tiles of one shape for one width (see ROWS above)."""
    return (1.0 / tl.sqrt(tl.sum(x * x, axis=1) / n_cols + eps))[:, None]


@triton.jit
def _normed(x, inv_rms, weight, dtype: tl.constexpr):
    """(x * inv_rms) * weight, rounded to `dtype` after each multiply as the torch code rounds."""
    normed = _rounded(x * inv_rms, dtype)  # torch: x.to(dtype) before the weight
    return _rounded(normed * weight, dtype)


@triton.jit
def _row_start(row, rows_per_token, stride_token, stride_row):
    """Where row `row` of a [tokens, rows_per_token, n] view starts: q or k inside the packed q/k/v output is such
    a view (token stride 4096, head stride 128 in Qwen3-0.6B), read in place instead of copied first."""
    return (row // rows_per_token) * stride_token + (row % rows_per_token) * stride_row


@triton.jit
def _tile(program, n_rows, n_cols, ROWS: tl.constexpr, BLOCK: tl.constexpr):
    """Program `program`'s rows [ROWS, 1] (int64), the columns [1, BLOCK], and the mask of the real elements."""
    rows = program * ROWS + tl.arange(0, ROWS)[:, None]
    cols = tl.arange(0, BLOCK)[None, :]
    return rows, cols, (rows < n_rows) & (cols < n_cols)


@triton.jit
def _rms_norm_rows(x_ptr, weight_ptr, out_ptr, program, n_rows, n_cols, eps, rows_per_token, stride_token,
                   stride_row, ROWS: tl.constexpr, BLOCK: tl.constexpr):
    """Program `program`'s RMSNorm rows of a strided view, into the same rows of a contiguous output."""
    rows, cols, mask = _tile(program, n_rows, n_cols, ROWS, BLOCK)
    start = _row_start(rows, rows_per_token, stride_token, stride_row)
    x = tl.load(x_ptr + start + cols, mask=mask, other=0.0).to(tl.float32)
    weight = tl.load(weight_ptr + cols, mask=cols < n_cols, other=0.0).to(tl.float32)  # before the sum: see LOADS
    inv_rms = _inverse_rms(x, n_cols, eps)
    dtype = out_ptr.dtype.element_ty
    tl.store(out_ptr + rows * n_cols + cols, _normed(x, inv_rms, weight, dtype).to(dtype), mask=mask)


@triton.jit
def _rms_norm_kernel(x_ptr, weight_ptr, out_ptr, n_rows, n_cols, eps, rows_per_token, stride_token, stride_row,
                     ROWS: tl.constexpr, BLOCK: tl.constexpr):
    _rms_norm_rows(x_ptr, weight_ptr, out_ptr, tl.program_id(0).to(tl.int64), n_rows, n_cols, eps, rows_per_token,
                   stride_token, stride_row, ROWS, BLOCK)


# a_programs is only compared with: no separate compilation for each of its values' divisibility classes.
@triton.jit(do_not_specialize=["a_programs"])
def _rms_norm_pair_kernel(a_ptr, a_weight_ptr, a_out_ptr, a_rows, a_programs, a_rows_per_token, a_stride_token,
                          a_stride_row, b_ptr, b_weight_ptr, b_out_ptr, b_rows, b_rows_per_token, b_stride_token,
                          b_stride_row, n_cols, eps, ROWS: tl.constexpr, BLOCK: tl.constexpr):
    """Two RMSNorms in one launch (Qwen3's q-norm and k-norm): the first a_programs programs norm a's rows, the
    others b's, each by the very code of _rms_norm_kernel, so the bits are those of two separate launches."""
    program = tl.program_id(0).to(tl.int64)
    if program < a_programs:
        _rms_norm_rows(a_ptr, a_weight_ptr, a_out_ptr, program, a_rows, n_cols, eps, a_rows_per_token,
                       a_stride_token, a_stride_row, ROWS, BLOCK)
    else:
        _rms_norm_rows(b_ptr, b_weight_ptr, b_out_ptr, program - a_programs, b_rows, n_cols, eps, b_rows_per_token,
                       b_stride_token, b_stride_row, ROWS, BLOCK)


def _rows_of(x: torch.Tensor) -> tuple[torch.Tensor, int, int, int]:
    """(x or a contiguous copy, rows per token, token stride, row stride): how the kernels above walk x's rows.
    [tokens, n] and [tokens, heads, n] views whose last dimension is contiguous are read in place."""
    if x.stride(-1) == 1 and x.dim() == 2:
        return x, 1, x.stride(0), 0
    if x.stride(-1) == 1 and x.dim() == 3:
        return x, x.shape[1], x.stride(0), x.stride(1)
    x = x.reshape(-1, x.shape[-1]).contiguous()
    return x, 1, x.shape[1], 0


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x: [..., dim] (any float dtype), weight: [dim] of x's dtype -> [..., dim] (contiguous), normalised over the
    last dim."""
    shape = x.shape
    out = torch.empty(shape, dtype=x.dtype, device=x.device)
    rows = out.numel() // shape[-1] if shape[-1] else 0
    if rows:
        x, per_token, stride_token, stride_row = _rows_of(x)
        per_program = norm_rows_per_program(shape[-1])
        _rms_norm_kernel[(triton.cdiv(rows, per_program),)](
            x, weight, out, rows, shape[-1], eps, per_token, stride_token, stride_row,
            ROWS=per_program, BLOCK=triton.next_power_of_2(shape[-1]))
    return out


def rms_norm_pair(a: torch.Tensor, a_weight: torch.Tensor, b: torch.Tensor, b_weight: torch.Tensor,
                  eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(rms_norm(a, a_weight, eps), rms_norm(b, b_weight, eps)) in one launch, bit for bit; a and b share their
    last dimension (q and k heads). One launch instead of two per layer: decode steps are launch-bound."""
    if a.shape[-1] != b.shape[-1]:
        raise ValueError(f"rms_norm_pair needs one row length, got {a.shape[-1]} and {b.shape[-1]}")
    a_out = torch.empty(a.shape, dtype=a.dtype, device=a.device)
    b_out = torch.empty(b.shape, dtype=b.dtype, device=b.device)
    n = a.shape[-1]
    a_rows, b_rows = (a_out.numel() // n, b_out.numel() // n) if n else (0, 0)
    if a_rows + b_rows:
        a, a_per_token, a_stride_token, a_stride_row = _rows_of(a)
        b, b_per_token, b_stride_token, b_stride_row = _rows_of(b)
        per_program = norm_rows_per_program(n)
        a_programs = triton.cdiv(a_rows, per_program)
        _rms_norm_pair_kernel[(a_programs + triton.cdiv(b_rows, per_program),)](
            a, a_weight, a_out, a_rows, a_programs, a_per_token, a_stride_token, a_stride_row,
            b, b_weight, b_out, b_rows, b_per_token, b_stride_token, b_stride_row,
            n, eps, ROWS=per_program, BLOCK=triton.next_power_of_2(n))
    return a_out, b_out


@triton.jit
def _add_rms_norm_kernel(x_ptr, residual_ptr, weight_ptr, sum_ptr, out_ptr, n_rows, n_cols, eps,
                         ROWS: tl.constexpr, BLOCK: tl.constexpr):
    """ROWS rows: sum = residual + x (rounded to the dtype, as torch's add rounds), then out = RMSNorm(sum) on a
    tile of the norm kernel's shape, so out equals rms_norm(residual + x) bit for bit."""
    rows, cols, mask = _tile(tl.program_id(0).to(tl.int64), n_rows, n_cols, ROWS, BLOCK)
    dtype = out_ptr.dtype.element_ty
    x = tl.load(x_ptr + rows * n_cols + cols, mask=mask, other=0.0).to(tl.float32)
    residual = tl.load(residual_ptr + rows * n_cols + cols, mask=mask, other=0.0).to(tl.float32)
    weight = tl.load(weight_ptr + cols, mask=cols < n_cols, other=0.0).to(tl.float32)  # before the sum: see LOADS
    hidden = _rounded(residual + x, dtype)
    tl.store(sum_ptr + rows * n_cols + cols, hidden.to(dtype), mask=mask)
    inv_rms = _inverse_rms(hidden, n_cols, eps)
    tl.store(out_ptr + rows * n_cols + cols, _normed(hidden, inv_rms, weight, dtype).to(dtype), mask=mask)


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The residual add and the next RMSNorm in one kernel (one launch, and the sum is not read back):
    x, residual: [..., dim] of one dtype -> (residual + x, rms_norm(residual + x)), both new tensors."""
    shape = x.shape
    x = x.reshape(-1, shape[-1]).contiguous()
    residual = residual.reshape(-1, shape[-1]).contiguous()
    total, out = torch.empty_like(x), torch.empty_like(x)
    rows, n = x.shape
    if rows:
        per_program = norm_rows_per_program(n)
        _add_rms_norm_kernel[(triton.cdiv(rows, per_program),)](x, residual, weight, total, out, rows, n, eps,
                                                                 ROWS=per_program, BLOCK=triton.next_power_of_2(n))
    return total.view(shape), out.view(shape)


# RoPE's launch shape: a program rotates ROWS (token, head) rows, ROWS = ROW_ELEMENTS // the row's padded size.
# One head row per program made 8192 tokens x 24 heads = 196k programs of 128 elements per kernel, most of each
# program's time spent starting up. RoPE has no reduction, so the packing changes no bit of the result. (RMSNorm
# packs rows too, see NORM_ROW_ELEMENTS.)
ROW_ELEMENTS = 1024


@triton.jit
def _rotary_rows(x_ptr, cos_ptr, sin_ptr, out_ptr, program, n_rows, num_heads, stride_token, stride_head, half,
                 ROWS: tl.constexpr, BLOCK: tl.constexpr):
    """Program `program`'s ROWS (token, head) rows: (x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin), rounding like
    the torch code. half = head_dim / 2; BLOCK is the next power of two (a Triton block's size must be one),
    masked down. x is read through its strides (a view into the packed q/k/v output), out is contiguous."""
    rows = program * ROWS + tl.arange(0, ROWS)[:, None]  # row = token * num_heads + head
    token = rows // num_heads
    dtype = out_ptr.dtype.element_ty
    source = token * stride_token + (rows % num_heads) * stride_head
    base = rows * 2 * half
    cols = tl.arange(0, BLOCK)[None, :]
    mask = (rows < n_rows) & (cols < half)
    x1 = tl.load(x_ptr + source + cols, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(x_ptr + source + half + cols, mask=mask, other=0.0).to(tl.float32)
    # Both halves of a row rotate by the same angles; the tables are float32, cast to x's dtype as torch does.
    cos = _rounded(tl.load(cos_ptr + token * 2 * half + cols, mask=mask, other=0.0), dtype)
    sin = _rounded(tl.load(sin_ptr + token * 2 * half + cols, mask=mask, other=0.0), dtype)
    out1 = _rounded(_rounded(x1 * cos, dtype) + _rounded(-x2 * sin, dtype), dtype)
    out2 = _rounded(_rounded(x2 * cos, dtype) + _rounded(x1 * sin, dtype), dtype)
    tl.store(out_ptr + base + cols, out1.to(dtype), mask=mask)
    tl.store(out_ptr + base + half + cols, out2.to(dtype), mask=mask)


@triton.jit
def _rotary_kernel(x_ptr, cos_ptr, sin_ptr, out_ptr, n_rows, num_heads, stride_token, stride_head, half,
                   ROWS: tl.constexpr, BLOCK: tl.constexpr):
    _rotary_rows(x_ptr, cos_ptr, sin_ptr, out_ptr, tl.program_id(0).to(tl.int64), n_rows, num_heads, stride_token,
                 stride_head, half, ROWS, BLOCK)


@triton.jit(do_not_specialize=["a_programs"])
def _rotary_pair_kernel(a_ptr, a_out_ptr, a_rows, a_heads, a_stride_token, a_stride_head, a_programs,
                        b_ptr, b_out_ptr, b_rows, b_heads, b_stride_token, b_stride_head,
                        cos_ptr, sin_ptr, half, ROWS: tl.constexpr, BLOCK: tl.constexpr):
    """RoPE of q and k in one launch: the first a_programs programs rotate a, the others b (no reduction, so
    the same bits as two launches)."""
    program = tl.program_id(0).to(tl.int64)
    if program < a_programs:
        _rotary_rows(a_ptr, cos_ptr, sin_ptr, a_out_ptr, program, a_rows, a_heads, a_stride_token, a_stride_head,
                     half, ROWS, BLOCK)
    else:
        _rotary_rows(b_ptr, cos_ptr, sin_ptr, b_out_ptr, program - a_programs, b_rows, b_heads, b_stride_token,
                     b_stride_head, half, ROWS, BLOCK)


def _rotary_launch(x: torch.Tensor, rows_per_program: int | None) -> tuple[torch.Tensor, int, int, int]:
    """(x with a contiguous last dimension, rows per program, its BLOCK, its programs) for x [tokens, heads, head_dim]."""
    num_tokens, num_heads, head_dim = x.shape
    if head_dim % 2:
        raise ValueError(f"RoPE rotates pairs of dimensions: head_dim must be even, got {head_dim}")
    if x.stride(-1) != 1:
        x = x.contiguous()
    block = triton.next_power_of_2(head_dim // 2)
    rows = rows_per_program or max(1, ROW_ELEMENTS // (2 * block))
    return x, rows, block, triton.cdiv(num_tokens * num_heads, rows)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                 rows_per_program: int | None = None) -> torch.Tensor:
    """x: [num_tokens, heads, head_dim] (head_dim even; a view with a contiguous last dim is read in place);
    cos, sin: float32 [num_tokens, 1, head_dim] -> rotated x (new contiguous tensor). rows_per_program: (token,
    head) rows per program (None: ROW_ELEMENTS per program)."""
    x, rows, block, programs = _rotary_launch(x, rows_per_program)
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if programs:
        _rotary_kernel[(programs,)](x, cos.contiguous(), sin.contiguous(), out, x.shape[0] * x.shape[1], x.shape[1],
                                    x.stride(0), x.stride(1), x.shape[2] // 2, ROWS=rows, BLOCK=block)
    return out


def apply_rotary_pair(a: torch.Tensor, b: torch.Tensor, cos: torch.Tensor,
                      sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(apply_rotary(a, cos, sin), apply_rotary(b, cos, sin)) in one launch, bit for bit: q and k of one step."""
    if a.shape[0] != b.shape[0] or a.shape[2] != b.shape[2]:
        raise ValueError(f"q and k must share tokens and head_dim, got {tuple(a.shape)} and {tuple(b.shape)}")
    a, rows, block, a_programs = _rotary_launch(a, None)
    b, _, _, b_programs = _rotary_launch(b, None)
    a_out = torch.empty(a.shape, dtype=a.dtype, device=a.device)
    b_out = torch.empty(b.shape, dtype=b.dtype, device=b.device)
    if a_programs + b_programs:
        _rotary_pair_kernel[(a_programs + b_programs,)](
            a, a_out, a.shape[0] * a.shape[1], a.shape[1], a.stride(0), a.stride(1), a_programs,
            b, b_out, b.shape[0] * b.shape[1], b.shape[1], b.stride(0), b.stride(1),
            cos.contiguous(), sin.contiguous(), a.shape[2] // 2, ROWS=rows, BLOCK=block)
    return a_out, b_out


@triton.jit
def _silu_and_mul_kernel(gate_ptr, up_ptr, out_ptr, n, n_cols, stride_gate, stride_up, BLOCK: tl.constexpr):
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < n
    row, col = offsets // n_cols, offsets % n_cols  # gate and up may be halves of the packed gate/up output
    dtype = out_ptr.dtype.element_ty
    gate = tl.load(gate_ptr + row * stride_gate + col, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(up_ptr + row * stride_up + col, mask=mask, other=0.0).to(tl.float32)
    silu = _rounded(gate / (1.0 + tl.exp(-gate)), dtype)  # torch rounds silu's output first
    tl.store(out_ptr + offsets, _rounded(silu * up, dtype).to(dtype), mask=mask)


def silu_and_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up for two tensors of one shape and dtype -> a new contiguous tensor. [rows, cols] views with
    a contiguous last dimension (the two halves of the packed gate/up output) are read in place."""
    if gate.shape != up.shape:
        raise ValueError(f"gate and up must have one shape, got {tuple(gate.shape)} and {tuple(up.shape)}")
    if not (gate.dim() == 2 and gate.stride(-1) == 1 and up.stride(-1) == 1):
        gate, up = gate.contiguous(), up.contiguous()
    out = torch.empty(gate.shape, dtype=gate.dtype, device=gate.device)
    n = gate.numel()
    if n:
        block = 1024
        n_cols = gate.shape[-1]
        stride_gate = gate.stride(0) if gate.dim() == 2 else n_cols
        stride_up = up.stride(0) if up.dim() == 2 else n_cols
        _silu_and_mul_kernel[(triton.cdiv(n, block),)](gate, up, out, n, n_cols, stride_gate, stride_up, BLOCK=block)
    return out
