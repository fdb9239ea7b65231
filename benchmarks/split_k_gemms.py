"""Would a split-K GEMM, reduced inside the next add+RMSNorm, take the decode step's o and down projections
under cuBLAS's time? (GPU; --check runs the kernels' correctness on small shapes, in the interpreter too.)

    python benchmarks/split_k_gemms.py [--batches 8,32,64,128,256]
    TRITON_INTERPRET=1 python benchmarks/split_k_gemms.py --check

A decode step's four projections take 5-8 us each whatever their bytes (RESULTS.md, sixth and twelfth sessions).
The o (1024 x 2048) and down (1024 x 3072) projections have only 1,024 output columns: in tiles of 64 that is 16
column blocks, so a plain GEMM keeps 16-64 of the H200's 132 multiprocessors busy streaming the weights. Split
the reduction dimension K over S programs as well and each program reads 1/S of a column block's weights: S x as
many programs. The S partial products (float32 [S, rows, 1024]) must then be summed; the add+RMSNorm kernel that
follows each of these projections reads the projection's output anyway, so here it sums the partials instead
(no extra launch). This script times, over the 28 layers of Qwen3-0.6B with distinct weights in one CUDA graph
replay, for each batch:
- cuBLAS (F.linear) + reference.models.fused.add_rms_norm, the engine's pair, for o and down;
- the split-K GEMM + the summing add+RMSNorm, over split counts and tile shapes;
and prints the best, its time against the pair's, and the largest difference of its outputs from the pair's.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

HIDDEN, Q_OUT, INTERMEDIATE, LAYERS, EPS = 1024, 2048, 3072, 28, 1e-6  # Qwen3-0.6B
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@triton.jit
def _split_k_gemm_kernel(a_ptr, w_ptr, partial_ptr, rows, n, k, k_per_split,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Program (column block, split, row block): partial[split, rows, cols] = a[rows, ks] @ w[cols, ks]^T over the
    split's k_per_split columns of K, in float32. a [rows, k] and w [n, k] row-major (a linear layer's weight)."""
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    split = tl.program_id(1)
    row_ids = tl.program_id(2) * BLOCK_M + tl.arange(0, BLOCK_M)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    first = split * k_per_split
    for start in range(first, tl.minimum(first + k_per_split, k), BLOCK_K):
        ks = start + tl.arange(0, BLOCK_K)
        k_ok = ks < tl.minimum(first + k_per_split, k)
        a = tl.load(a_ptr + row_ids[:, None] * k + ks[None, :], mask=(row_ids[:, None] < rows) & k_ok[None, :],
                    other=0.0)
        w = tl.load(w_ptr + cols[:, None] * k + ks[None, :], mask=(cols[:, None] < n) & k_ok[None, :], other=0.0)
        acc += tl.dot(a, tl.trans(w))
    out = partial_ptr + (split * rows + row_ids[:, None]) * n + cols[None, :]
    tl.store(out, acc, mask=(row_ids[:, None] < rows) & (cols[None, :] < n))


@triton.jit
def _sum_add_rms_norm_kernel(partial_ptr, residual_ptr, weight_ptr, sum_ptr, out_ptr, rows, n, splits, eps,
                             BLOCK: tl.constexpr):
    """Row program: x = the splits' partials summed (float32) and rounded to the dtype, as a GEMM's output is;
    then the engine's add+RMSNorm: sum = residual + x rounded, out = RMSNorm(sum) with a rounding after each
    multiply (reference/models/fused.py's arithmetic)."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n
    dtype = out_ptr.dtype.element_ty
    x = tl.zeros([BLOCK], dtype=tl.float32)
    for split in range(splits):
        x += tl.load(partial_ptr + (split * rows + row) * n + cols, mask=mask, other=0.0)
    x = x.to(dtype).to(tl.float32)
    residual = tl.load(residual_ptr + row * n + cols, mask=mask, other=0.0).to(tl.float32)
    hidden = (residual + x).to(dtype).to(tl.float32)
    tl.store(sum_ptr + row * n + cols, hidden.to(dtype), mask=mask)
    inv_rms = 1.0 / tl.sqrt(tl.sum(hidden * hidden, axis=0) / n + eps)
    normed = (hidden * inv_rms).to(dtype).to(tl.float32)
    weight = tl.load(weight_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * n + cols, (normed * weight).to(dtype), mask=mask)


def split_k_linear_add_norm(a, w, residual, norm_weight, splits: int, block_n: int, block_k: int,
                            num_warps: int = 4, num_stages: int = 3, partial: torch.Tensor | None = None):
    """(residual + a @ w^T, rms_norm of it): the split-K GEMM, then the summing add+RMSNorm."""
    rows, k = a.shape
    n = w.shape[0]
    block_m = max(16, min(128, triton.next_power_of_2(rows)))
    k_per_split = triton.cdiv(triton.cdiv(k, splits), block_k) * block_k
    splits = triton.cdiv(k, k_per_split)
    if partial is None or partial.numel() < splits * rows * n:
        partial = torch.empty(splits * rows * n, device=a.device, dtype=torch.float32)
    grid = (triton.cdiv(n, block_n), splits, triton.cdiv(rows, block_m))
    _split_k_gemm_kernel[grid](a, w, partial, rows, n, k, k_per_split, BLOCK_M=block_m, BLOCK_N=block_n,
                               BLOCK_K=block_k, num_warps=num_warps, num_stages=num_stages)
    total, out = torch.empty_like(residual), torch.empty_like(residual)
    _sum_add_rms_norm_kernel[(rows,)](partial, residual, norm_weight, total, out, rows, n, splits, EPS,
                                      BLOCK=triton.next_power_of_2(n))
    return total, out


def torch_pair(a, w, residual, norm_weight):
    """The slow twin: torch's GEMM output (rounded to the dtype), the add rounded, then RMSNorm as the model's."""
    hidden = residual + F.linear(a, w)
    normed = (hidden.float() * torch.rsqrt(hidden.float().pow(2).mean(-1, keepdim=True) + EPS)).to(a.dtype)
    return hidden, normed * norm_weight


def check() -> None:
    """Small odd shapes against the torch twin, every split count (float32 on the CPU, bf16 on a GPU)."""
    dtype = torch.bfloat16 if DEVICE == "cuda" else torch.float32
    torch.manual_seed(0)
    for rows, n, k in ((3, 48, 96), (17, 64, 200), (40, 130, 64)):
        a = torch.randn(rows, k, device=DEVICE, dtype=dtype)
        w = torch.randn(n, k, device=DEVICE, dtype=dtype) * 0.1
        residual = torch.randn(rows, n, device=DEVICE, dtype=dtype)
        norm_weight = torch.rand(n, device=DEVICE, dtype=dtype) + 0.5
        want_sum, want_out = torch_pair(a, w, residual, norm_weight)
        for splits in (1, 2, 3, 8):
            got_sum, got_out = split_k_linear_add_norm(a, w, residual, norm_weight, splits, 32, 32)
            tolerance = 2e-2 if dtype == torch.bfloat16 else 1e-4
            for got, want in ((got_sum, want_sum), (got_out, want_out)):
                error = ((got.float() - want.float()).abs() / (want.float().abs() + 1)).max().item()
                assert error < tolerance, f"rows {rows}, n {n}, k {k}, {splits} splits: relative error {error:.2e}"
    print(f"split-K GEMM + summing add+RMSNorm match the torch twin ({DEVICE}, {dtype})")


def timed_chain(batch: int, weights, run_pair) -> float:
    """Median ms of one CUDA-graph replay of 28 layers x (o pair, down pair) with distinct weights."""
    from decode_gemms import graph_ms

    a = {k: torch.randn(batch, k, device="cuda", dtype=torch.bfloat16) for k in (Q_OUT, INTERMEDIATE)}
    residual = torch.randn(batch, HIDDEN, device="cuda", dtype=torch.bfloat16)
    norm_weight = torch.ones(HIDDEN, device="cuda", dtype=torch.bfloat16)

    def run():
        for o, down in weights:
            run_pair(a[Q_OUT], o, residual, norm_weight)
            run_pair(a[INTERMEDIATE], down, residual, norm_weight)

    return graph_ms(run)


def bench(batches: list[int]) -> None:
    from reference.models import fused

    weights = [(torch.randn(HIDDEN, Q_OUT, device="cuda", dtype=torch.bfloat16) * 0.02,
                torch.randn(HIDDEN, INTERMEDIATE, device="cuda", dtype=torch.bfloat16) * 0.02) for _ in range(LAYERS)]
    partial = torch.empty(8 * 256 * HIDDEN, device="cuda", dtype=torch.float32)
    configs = [(s, bn, bk, warps, stages) for s in (1, 2, 4, 8) for bn, bk, warps, stages in
               ((64, 128, 4, 3), (32, 128, 4, 3), (64, 64, 4, 4), (128, 64, 8, 3))]
    print("| batch | cuBLAS + add_rms_norm ms | best split-K (splits, BLOCK_N, BLOCK_K, warps, stages) ms | "
          "ratio | max output difference |\n|---|---|---|---|---|")
    for batch in batches:
        engine = timed_chain(batch, weights, lambda a, w, r, g: fused.add_rms_norm(F.linear(a, w), r, g, EPS))
        best = None
        for config in configs:
            s, bn, bk, warps, stages = config
            try:
                ms = timed_chain(batch, weights, lambda a, w, r, g, c=config: split_k_linear_add_norm(
                    a, w, r, g, c[0], c[1], c[2], c[3], c[4], partial=partial))
            except Exception as error:  # noqa: BLE001 - a tile may not fit in shared memory
                print(f"  {config}: {type(error).__name__}")
                continue
            best = min(best or (ms, config), (ms, config))
        a = torch.randn(batch, INTERMEDIATE, device="cuda", dtype=torch.bfloat16)
        r = torch.randn(batch, HIDDEN, device="cuda", dtype=torch.bfloat16)
        g = torch.ones(HIDDEN, device="cuda", dtype=torch.bfloat16)
        ours = split_k_linear_add_norm(a, weights[0][1], r, g, *best[1])[1]
        theirs = fused.add_rms_norm(F.linear(a, weights[0][1]), r, g, EPS)[1]
        diff = (ours.float() - theirs.float()).abs().max().item()
        print(f"| {batch} | {engine:.3f} | {best[0]:.3f} {best[1]} | {best[0] / engine:.2f} | {diff:.2e} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", default="8,32,64,128,256")
    parser.add_argument("--check", action="store_true", help="only the correctness check (small shapes)")
    args = parser.parse_args()
    check()
    if not args.check:
        bench([int(b) for b in args.batches.split(",")])


if __name__ == "__main__":
    main()
