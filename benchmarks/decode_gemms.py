"""A decode step's matrix multiplies, alone: how far from reading the weights at copy bandwidth (GPU).

    python benchmarks/decode_gemms.py [--batches 8,32,64,128,256]

A decode step multiplies a few rows (one per sequence) by every weight matrix, so it should cost about the
weights' bytes over the memory bandwidth. benchmarks/step_costs.py found the step's GEMMs taking about 4x that on
the H200. This script times the 28 layers' projections of Qwen3-0.6B (distinct weights per layer, so nothing
stays in L2), recorded in one CUDA graph as the engine replays them, per batch size:
- separate: q, k, v, o, gate, up, down as seven F.linear calls per layer (the engine's default on the GPU);
- packed: q/k/v and gate/up stacked (pack_projections=True), four calls per layer;
- each also through cuBLASLt (torch.backends.cuda.preferred_blas_library);
then the paged decode attention kernel's split choice against every split count, batch x context, also replayed
from CUDA graphs (Python's launch cost would otherwise be what is timed at small batches).
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from reference.attention import triton_ops  # noqa: E402
from reference.costs import measure_memory_bandwidth  # noqa: E402
from reference.models import fused, pdl, skinny_gemm  # noqa: E402

HIDDEN, Q_OUT, KV_OUT, INTERMEDIATE, LAYERS = 1024, 2048, 1024, 3072, 28  # Qwen3-0.6B
DTYPE = torch.bfloat16


def graph_ms(fn, replays: int = 20) -> float:
    """Median ms of one replay of fn recorded in a CUDA graph."""
    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    for _ in range(3):
        graph.replay()
    times = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def layer_weights(packed: bool) -> list[list[torch.Tensor]]:
    """Per layer, the weight matrices [out, in] in call order."""
    shapes = ([(Q_OUT + 2 * KV_OUT, HIDDEN), (HIDDEN, Q_OUT), (2 * INTERMEDIATE, HIDDEN), (HIDDEN, INTERMEDIATE)]
              if packed else
              [(Q_OUT, HIDDEN), (KV_OUT, HIDDEN), (KV_OUT, HIDDEN), (HIDDEN, Q_OUT), (INTERMEDIATE, HIDDEN),
               (INTERMEDIATE, HIDDEN), (HIDDEN, INTERMEDIATE)])
    return [[torch.randn(s, device="cuda", dtype=DTYPE) * 0.02 for s in shapes] for _ in range(LAYERS)]


def step_gemms(weights, batch: int):
    """All layers' projections for `batch` rows; inputs of the right width per matrix (values do not matter)."""
    inputs = {w.shape[1]: torch.randn(batch, w.shape[1], device="cuda", dtype=DTYPE) for w in weights[0]}

    def run():
        for layer in weights:
            for w in layer:
                F.linear(inputs[w.shape[1]], w)

    return run


def bench_gemms(batches: list[int], bandwidth: float) -> None:
    weight_bytes = LAYERS * 2 * HIDDEN * (Q_OUT + 2 * KV_OUT + Q_OUT + 3 * INTERMEDIATE)
    floor_ms = weight_bytes / bandwidth * 1e3
    print(f"\n28 layers' projections, {weight_bytes / 1e9:.2f} GB of weights: floor {floor_ms:.3f} ms at "
          f"{bandwidth / 1e9:.0f} GB/s (copy). One CUDA graph replay, median ms (fraction of the floor's speed):")
    variants = [("separate", False, "cublas"), ("packed", True, "cublas"),
                ("separate, cublasLt", False, "cublaslt"), ("packed, cublasLt", True, "cublaslt")]
    print("| batch | " + " | ".join(name for name, *_ in variants) + " |")
    print("|---|" + "---|" * len(variants))
    weights = {packed: layer_weights(packed) for packed in (False, True)}
    for batch in batches:
        cells = []
        for _, packed, library in variants:
            torch.backends.cuda.preferred_blas_library(library)
            ms = graph_ms(step_gemms(weights[packed], batch))
            cells.append(f"{ms:.3f} ({floor_ms / ms:.0%})")
        torch.backends.cuda.preferred_blas_library("cublas")
        print(f"| {batch} | " + " | ".join(cells) + " |")


# One decode layer's matrix multiplies, packed: (name, out features, in features, silu_mul). gate_up's product
# feeds silu_and_mul; the Triton kernel does both in one pass (skinny_gemm.linear_silu_mul).
SHAPES = [("qkv", Q_OUT + 2 * KV_OUT, HIDDEN, False), ("o", HIDDEN, Q_OUT, False),
          ("gate_up+silu", 2 * INTERMEDIATE, HIDDEN, True), ("down", HIDDEN, INTERMEDIATE, False)]
# (BLOCK_N, BLOCK_K, num_warps, num_stages) tried for each BLOCK_M.
TRITON_CONFIGS = [(16, 256, 4, 4), (16, 128, 4, 5), (32, 128, 4, 4), (32, 256, 4, 3), (32, 64, 4, 6),
                  (64, 128, 4, 3), (64, 64, 4, 4), (64, 128, 8, 4), (128, 64, 8, 3)]


def shape_calls(out_features, in_features, silu_mul, batch, kind, config=None):
    """One shape's call for each of 28 distinct weights (nothing stays in L2): cuBLAS (+ silu_and_mul) or Triton."""
    weights = [torch.randn(out_features, in_features, device="cuda", dtype=DTYPE) * 0.02 for _ in range(LAYERS)]
    x = torch.randn(batch, in_features, device="cuda", dtype=DTYPE)

    def run():
        for w in weights:
            if kind == "cublas":
                y = F.linear(x, w)
                if silu_mul:
                    fused.silu_and_mul(*y.chunk(2, dim=-1))
            elif silu_mul:
                skinny_gemm.linear_silu_mul(x, w, config=config)
            else:
                skinny_gemm.linear(x, w, config=config)

    return run, weights, x


def check_triton(out_features, in_features, silu_mul, batch, config) -> float:
    """Largest difference from the torch twin, in units of the output's largest magnitude."""
    w = torch.randn(out_features, in_features, device="cuda", dtype=DTYPE) * 0.02
    x = torch.randn(batch, in_features, device="cuda", dtype=DTYPE)
    if silu_mul:
        want = fused.silu_and_mul(*F.linear(x, w).chunk(2, dim=-1)).float()
        got = skinny_gemm.linear_silu_mul(x, w, config=config).float()
    else:
        want, got = F.linear(x, w).float(), skinny_gemm.linear(x, w, config=config).float()
    return ((got - want).abs().max() / want.abs().max()).item()


def sweep_triton(batches: list[int], bandwidth: float) -> None:
    """Per shape and batch: cuBLAS against every Triton config; the best config and its speed."""
    print("\nTriton skinny GEMM sweep: us per call (28 distinct weights in one graph), best config "
          "(BLOCK_M, BLOCK_N, BLOCK_K, warps, stages), fraction of copy bandwidth, worst relative error")
    print("| shape | batch | cuBLAS us | chosen us | best us | best config | best at | max rel err |")
    print("|---|---|---|---|---|---|---|---|")
    for name, out_features, in_features, silu_mul in SHAPES:
        nbytes = out_features * in_features * 2
        for batch in batches:
            cublas = graph_ms(shape_calls(out_features, in_features, silu_mul, batch, "cublas")[0]) / LAYERS * 1e3
            chosen = graph_ms(shape_calls(out_features, in_features, silu_mul, batch, "triton")[0]) / LAYERS * 1e3
            smallest = max(16, triton_next_pow2(batch))
            block_ms = sorted({min(smallest, cap) for cap in (64, 128)})
            results, worst = {}, 0.0
            for block_m in block_ms:
                for block_n, block_k, warps, stages in TRITON_CONFIGS:
                    config = (block_m, block_n, block_k, warps, stages)
                    try:
                        worst = max(worst, check_triton(out_features, in_features, silu_mul, batch, config))
                        run = shape_calls(out_features, in_features, silu_mul, batch, "triton", config)[0]
                        results[config] = graph_ms(run) / LAYERS * 1e3
                    except Exception as error:  # e.g. out of shared memory: that config is not a candidate
                        print(f"  ({name}, {batch}, {config}: {type(error).__name__})")
            best = min(results, key=results.get)
            print(f"| {name} | {batch} | {cublas:.2f} | {chosen:.2f} | {results[best]:.2f} | {best} | "
                  f"{nbytes / (results[best] * 1e-6) / bandwidth:.0%} | {worst:.1e} |")
            ranked = sorted(results, key=results.get)[:4]
            print("|  |  | runners-up: " + ", ".join(f"{c} {results[c]:.2f}" for c in ranked[1:]) + " |||||")


def chain_step(batch: int, gemms: str, use_pdl: bool):
    """One decode step's layer chain without attention: add+norm, q/k/v, o (on q's columns), add+norm,
    gate/up + SiLU, down; 28 layers of distinct weights. gemms: "cublas" or "triton". Returns (run, output)."""
    weights = layer_weights(packed=True)
    x = torch.randn(batch, HIDDEN, device="cuda", dtype=DTYPE)
    norm_weight = torch.ones(HIDDEN, device="cuda", dtype=DTYPE)
    out = {}

    def run():
        pdl.ENABLED = use_pdl
        hidden, residual = x, torch.zeros_like(x)
        for qkv_w, o_w, gate_up_w, down_w in weights:
            residual, normed = fused.add_rms_norm(hidden, residual, norm_weight, 1e-6)
            if gemms == "cublas":
                attention = F.linear(F.linear(normed, qkv_w)[:, :Q_OUT], o_w)
                residual, normed = fused.add_rms_norm(attention, residual, norm_weight, 1e-6)
                hidden = F.linear(fused.silu_and_mul(*F.linear(normed, gate_up_w).chunk(2, dim=-1)), down_w)
            else:
                attention = skinny_gemm.linear(skinny_gemm.linear(normed, qkv_w)[:, :Q_OUT], o_w)
                residual, normed = fused.add_rms_norm(attention, residual, norm_weight, 1e-6)
                hidden = skinny_gemm.linear(skinny_gemm.linear_silu_mul(normed, gate_up_w), down_w)
        out["hidden"] = hidden
        pdl.ENABLED = True

    return run, out


def bench_chain(batches: list[int], bandwidth: float) -> None:
    weight_bytes = LAYERS * 2 * HIDDEN * (Q_OUT + 2 * KV_OUT + Q_OUT + 3 * INTERMEDIATE)
    floor_us = weight_bytes / bandwidth * 1e6
    variants = [("cuBLAS", "cublas", False), ("cuBLAS, PDL norms", "cublas", True),
                ("Triton", "triton", False), ("Triton + PDL", "triton", True)]
    print(f"\nA decode step's layers without attention (28 x: add+norm, qkv, o, add+norm, gate/up+SiLU, down), one "
          f"CUDA graph replay, us (floor {floor_us:.0f} us); max |difference| from the first column's output")
    print("| batch | " + " | ".join(name for name, *_ in variants) + " |")
    print("|---|" + "---|" * len(variants))
    for batch in batches:
        cells, reference_out = [], None
        for _, gemms, use_pdl in variants:
            torch.manual_seed(0)
            run, out = chain_step(batch, gemms, use_pdl)
            us = graph_ms(run) * 1e3
            result = out["hidden"].float()
            reference_out = result if reference_out is None else reference_out
            cells.append(f"{us:.0f} ({(result - reference_out).abs().max().item():.1e})")
        print(f"| {batch} | " + " | ".join(cells) + " |")


def triton_next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def bench_splits(bandwidth: float) -> None:
    heads, kv_heads, head_dim, block_size = 16, 8, 128, 16
    print("\npaged decode kernel, one CUDA graph replay per call: ms for each split count (* = choose_num_splits'; "
          "fraction of copy bandwidth for the best)")
    for batch, context in [(8, 1024), (16, 1024), (32, 512), (32, 1024), (64, 512), (64, 1024), (96, 1024),
                           (128, 512), (128, 1024), (192, 1024), (256, 1024)]:
        blocks = -(-context // block_size)
        shape = (batch * blocks, block_size, kv_heads, head_dim)
        k_cache = torch.randn(shape, device="cuda", dtype=DTYPE)
        v_cache = torch.randn(shape, device="cuda", dtype=DTYPE)
        tables = torch.randperm(batch * blocks, device="cuda").to(torch.int32).view(batch, blocks)
        # The engine's graphs are captured with max_model_len-wide tables: 2048 tokens in the preset.
        wide = torch.zeros(batch, 2048 // block_size, dtype=torch.int32, device="cuda")
        wide[:, :blocks] = tables
        lens = torch.full((batch,), context, dtype=torch.int32, device="cuda")
        q = torch.randn(batch, heads, head_dim, device="cuda", dtype=DTYPE)
        out = torch.empty_like(q)
        chosen = triton_ops.choose_num_splits(batch, kv_heads, 2048, q.device)
        results = {}
        for splits in sorted({1, 2, 3, 4, 6, 8, 12, 16, chosen}):
            results[splits] = graph_ms(lambda s=splits: triton_ops.paged_decode_attention(
                q, k_cache, v_cache, wide, lens, head_dim**-0.5, out=out, num_splits=s))
        best = min(results, key=results.get)
        kv_bytes = 2 * batch * context * kv_heads * head_dim * 2
        cells = " ".join(f"{s}{'*' if s == chosen else ''}:{ms:.3f}" for s, ms in results.items())
        print(f"  batch {batch:3d} x {context:4d}: {cells} | best {best} at "
              f"{kv_bytes / results[best] / 1e6 / (bandwidth / 1e9):.0%}, chosen at "
              f"{kv_bytes / results[chosen] / 1e6 / (bandwidth / 1e9):.0%}")
        del k_cache, v_cache


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", default="1,8,32,64,128,256")
    parser.add_argument("--triton-sweep", action="store_true",
                        help="time every Triton config per shape and batch (skinny_gemm.choose_config's data)")
    parser.add_argument("--chain", action="store_true", help="time the layers' chain with and without PDL")
    args = parser.parse_args()
    bandwidth = measure_memory_bandwidth("cuda", nbytes=1 << 30, repeats=10)
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}")
    batches = [int(b) for b in args.batches.split(",")]
    if args.chain:
        bench_chain(batches, bandwidth)
        return
    if args.triton_sweep:
        sweep_triton(batches, bandwidth)
        return
    bench_gemms(batches, bandwidth)
    bench_splits(bandwidth)


if __name__ == "__main__":
    main()
