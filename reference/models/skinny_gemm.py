"""Matrix multiplies for decode steps: a few rows times a large weight matrix, read once at memory speed (GPU).

A decode step multiplies one row per sequence (8-256 rows) by every weight matrix. That is a memory-bound job: the
weights' bytes over the memory bandwidth. cuBLAS, tuned for large GEMMs, read Qwen3-0.6B's 4-12 MB matrices at a
third of the copy bandwidth on an H200 (benchmarks/decode_gemms.py): each call is mostly ramp-up and tail. This
kernel is the plain idea instead: a program owns BLOCK_N output columns (BLOCK_N rows of the [out, in] weight,
contiguous along `in`), streams them through once with all of the step's rows beside them, and writes its tile.
Many narrow programs keep every multiprocessor loading; the rows (a few KB) stay in L2.

`linear_silu_mul` also does the MLP's next step in the same pass: a program multiplies the gate rows and the up
rows of its columns (the two halves of the packed gate/up matrix) and writes silu(gate) * up, rounded where
fused.silu_and_mul rounds, so the [rows, 2 x intermediate] product never goes to memory and one launch is saved.

The slow twin is F.linear (and fused.silu_and_mul): tests/test_skinny_gemm.py compares them on random inputs in
the interpreter and, compiled, on a GPU. The sums run in another order than cuBLAS's, so outputs may differ in
the last bit; the engine's agreement with transformers is checked in tests/test_gpu.py.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .pdl import enabled_for, launch_options, wait_for_previous_kernel

# Rows up to which the model uses these kernels; above, cuBLAS (the product stops being memory-bound).
MAX_ROWS = 256


@triton.jit
def _rounded(x, dtype: tl.constexpr):
    return x.to(dtype, fp_downcast_rounding="rtne").to(tl.float32)


@triton.jit
def _tile_product(x_ptr, w_ptr, rows, cols, M, N, K, stride_xm, stride_wn, USE_PDL: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """x[rows, :] @ w[cols, :]^T in float32: [BLOCK_M, BLOCK_N], K walked in BLOCK_K steps.

    USE_PDL (programmatic dependent launch, Hopper on): the program may start while the kernel before it still
    runs. The weights do not depend on it, so the first weight tile is loaded before waiting for it to finish;
    x, its output, only after."""
    ks = tl.arange(0, BLOCK_K)
    w_mask = (cols[:, None] < N) & (ks[None, :] < K)
    w = tl.load(w_ptr + cols[:, None] * stride_wn + ks[None, :], mask=w_mask, other=0.0)
    wait_for_previous_kernel(USE_PDL)
    x = tl.load(x_ptr + rows[:, None] * stride_xm + ks[None, :], mask=(rows[:, None] < M) & (ks[None, :] < K),
                other=0.0)
    acc = tl.dot(x, tl.trans(w))
    for k0 in range(BLOCK_K, K, BLOCK_K):
        k = k0 + ks
        x = tl.load(x_ptr + rows[:, None] * stride_xm + k[None, :], mask=(rows[:, None] < M) & (k[None, :] < K),
                    other=0.0)
        w = tl.load(w_ptr + cols[:, None] * stride_wn + k[None, :], mask=(cols[:, None] < N) & (k[None, :] < K),
                    other=0.0)
        acc += tl.dot(x, tl.trans(w))
    return acc


@triton.jit(do_not_specialize=["M"])
def _linear_kernel(x_ptr, w_ptr, bias_ptr, y_ptr, M, N, K, stride_xm, stride_wn, stride_ym,
                   HAS_BIAS: tl.constexpr, SILU_MUL: tl.constexpr, USE_PDL: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """y = x @ w^T (+ bias); SILU_MUL: w is [gate; up] stacked, N is the intermediate size, y = silu(gate) * up.
    Axis 0 walks the row blocks so the programs sharing a weight tile run side by side and share it in L2."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    dtype = y_ptr.dtype.element_ty
    acc = _tile_product(x_ptr, w_ptr, rows, cols, M, N, K, stride_xm, stride_wn, USE_PDL, BLOCK_M, BLOCK_N,
                        BLOCK_K)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols, mask=cols < N, other=0.0).to(tl.float32)[None, :]
    if SILU_MUL:
        up = _tile_product(x_ptr, w_ptr + N * stride_wn, rows, cols, M, N, K, stride_xm, stride_wn, False,
                           BLOCK_M, BLOCK_N, BLOCK_K)
        if HAS_BIAS:
            up += tl.load(bias_ptr + N + cols, mask=cols < N, other=0.0).to(tl.float32)[None, :]
        gate = _rounded(acc, dtype)  # the GEMM's output is rounded before silu_and_mul reads it
        up = _rounded(up, dtype)
        silu = _rounded(gate / (1.0 + tl.exp(-gate)), dtype)
        acc = silu * up
    tl.store(y_ptr + rows[:, None] * stride_ym + cols[None, :], acc.to(dtype, fp_downcast_rounding="rtne"),
             mask=(rows[:, None] < M) & (cols[None, :] < N))


def choose_config(rows: int, out_features: int, silu_mul: bool) -> tuple[int, int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) for `rows` rows and `out_features` output columns,
    from `python benchmarks/decode_gemms.py --triton-sweep` on an H200 (benchmarks/RESULTS.md): narrow outputs
    (o, down) take 16 columns a program so that enough programs stream the weights; longer K tiles for few rows."""
    block_m = min(64, max(16, triton.next_power_of_2(rows)))
    if out_features <= 2048:
        return (block_m, 16, 256, 4, 4) if rows <= 32 else (block_m, 16, 128, 4, 5)
    if silu_mul:
        return (block_m, 32, 256, 4, 3) if rows <= 8 else (block_m, 32, 128, 4, 4)
    return (block_m, 32, 128, 4, 4) if rows <= 64 else (block_m, 64, 128, 8, 4)


def _launch(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, out_features: int, silu_mul: bool,
            config: tuple[int, int, int, int, int] | None) -> torch.Tensor:
    if x.dim() != 2 or weight.dim() != 2 or x.shape[1] != weight.shape[1]:
        raise ValueError(f"expected x [rows, in] and weight [out, in], got {tuple(x.shape)} and {tuple(weight.shape)}")
    if x.stride(1) != 1:
        x = x.contiguous()
    if weight.stride(1) != 1:
        raise ValueError("the weight's rows must be contiguous (a row-major [out, in] matrix)")
    rows, in_features = x.shape
    y = torch.empty(rows, out_features, dtype=x.dtype, device=x.device)
    if rows == 0:
        return y
    block_m, block_n, block_k, warps, stages = config or choose_config(rows, out_features, silu_mul)
    grid = (triton.cdiv(rows, block_m), triton.cdiv(out_features, block_n))
    pdl = enabled_for(x.device)
    _linear_kernel[grid](x, weight, bias if bias is not None else weight, y, rows, out_features, in_features,
                         x.stride(0), weight.stride(0), y.stride(0), HAS_BIAS=bias is not None, SILU_MUL=silu_mul,
                         USE_PDL=pdl, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=warps,
                         num_stages=stages, **launch_options(pdl))
    return y


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
           config: tuple[int, int, int, int, int] | None = None) -> torch.Tensor:
    """F.linear(x, weight, bias) for x [rows, in], weight [out, in] with contiguous rows."""
    return _launch(x, weight, bias, weight.shape[0], False, config)


def linear_silu_mul(x: torch.Tensor, gate_up: torch.Tensor, bias: torch.Tensor | None = None,
                    config: tuple[int, int, int, int, int] | None = None) -> torch.Tensor:
    """silu(gate) * up where [gate, up] = F.linear(x, gate_up, bias).chunk(2, -1): gate_up is the packed
    [2 x intermediate, in] matrix -> [rows, intermediate]."""
    if gate_up.shape[0] % 2:
        raise ValueError(f"gate_up must stack two halves of equal size, got {gate_up.shape[0]} rows")
    return _launch(x, gate_up, bias, gate_up.shape[0] // 2, True, config)
