"""A decode step's matrix multiplies, alone: how far from reading the weights at copy bandwidth (GPU).

    python benchmarks/decode_gemms.py [--batches 8,32,64,128,256] [--context-order | --uneven-sweep | --l2]

A decode step multiplies a few rows (one per sequence) by every weight matrix, so it should cost about the
weights' bytes over the memory bandwidth. benchmarks/step_costs.py found the step's GEMMs taking about 4x that on
the H200. This script times the 28 layers' projections of Qwen3-0.6B (distinct weights per layer, so nothing
stays in L2), recorded in one CUDA graph as the engine replays them, per batch size:
- separate: q, k, v, o, gate, up, down as seven F.linear calls per layer (the engine's default on the GPU);
- packed: q/k/v and gate/up stacked (pack_projections=True), four calls per layer;
- each also through cuBLASLt (torch.backends.cuda.preferred_blas_library);
then the paged decode attention kernel's split choice against every split count, batch x context, also replayed
from CUDA graphs (Python's launch cost would otherwise be what is timed at small batches); then, over uneven
contexts, the kernel's programs started in batch order against longest context first (--context-order: only that).
--l2 (only that): would the projections run faster from L2? The packed chain with each layer's weights read from
memory, against the same chain reusing one layer's 30 MB (L2-resident after the first layer: the bound), and against
each layer's weights read once by a plain reduction just before its GEMMs (a prefetch), then with an attention
stand-in before each layer's GEMMs, alone and with the prefetch on a side stream beside it (where its cost hides).
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from reference.attention import triton_ops  # noqa: E402
from reference.costs import measure_memory_bandwidth  # noqa: E402

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


@triton.jit
def _stream_kernel(src_ptr, out_ptr, n, BLOCK: tl.constexpr, EVICT_FIRST: tl.constexpr):
    """Read n bf16 values once, grid-strided, and store one sum per program (so the loads are not dropped).
    EVICT_FIRST: the loads ask L2 to drop their lines first (how attention would read a KV cache it reads once),
    else to keep them (a prefetch, whose lines the next GEMMs should find)."""
    acc = tl.zeros([BLOCK], tl.float32)
    for start in range(tl.program_id(0) * BLOCK, n, tl.num_programs(0) * BLOCK):
        offsets = start + tl.arange(0, BLOCK)
        if EVICT_FIRST:
            x = tl.load(src_ptr + offsets, mask=offsets < n, other=0.0, eviction_policy="evict_first")
        else:
            x = tl.load(src_ptr + offsets, mask=offsets < n, other=0.0, eviction_policy="evict_last")
        acc += x.to(tl.float32)
    tl.store(out_ptr + tl.program_id(0), tl.sum(acc, axis=0))


def stream(tensor: torch.Tensor, sums: torch.Tensor, evict_first: bool) -> None:
    _stream_kernel[(sums.numel(),)](tensor, sums, tensor.numel(), BLOCK=4096, EVICT_FIRST=evict_first)


def layers_with_attention(weights, batch: int, prefetch: bool):
    """Per layer: an attention stand-in (one read of the KV a decode step of `batch` sequences of ~800 tokens
    reads per layer, evict-first), then the four projections; with `prefetch`, a side stream reads the layer's
    weights (evict-last) while the stand-in runs, joined before the projections."""
    inputs = {w.shape[1]: torch.randn(batch, w.shape[1], device="cuda", dtype=DTYPE) for w in weights[0]}
    kv = torch.randn(batch * 800 * 2 * 8 * 128, device="cuda", dtype=DTYPE)  # K and V, 8 KV heads of 128
    programs = 8 * torch.cuda.get_device_properties(0).multi_processor_count
    sums, side_sums = torch.empty(programs, device="cuda"), torch.empty(programs, device="cuda")
    side = torch.cuda.Stream()

    def run():
        for layer in weights:
            if prefetch:
                side.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(side):
                    for w in layer:
                        stream(w, side_sums, evict_first=False)
            stream(kv, sums, evict_first=True)
            if prefetch:
                torch.cuda.current_stream().wait_stream(side)
            for w in layer:
                F.linear(inputs[w.shape[1]], w)

    return run


def bench_l2(batches: list[int]) -> None:
    weights = layer_weights(packed=True)
    l2_mb = torch.cuda.get_device_properties(0).L2_cache_size >> 20
    layer_mb = sum(w.numel() * w.element_size() for w in weights[0]) >> 20
    print(f"\npacked projections, 28 layers, one CUDA graph replay, median ms (L2 {l2_mb} MB, a layer's weights "
          f"{layer_mb} MB). The last two columns put an attention stand-in before each layer's projections (~800 "
          f"tokens of KV a sequence, read once): the gain of prefetching is the difference between them.")
    print("| batch | weights from memory | one layer's weights 28 times (L2) | each layer prefetched, then its GEMMs "
          "| stand-in, then GEMMs | stand-in while a side stream prefetches, then GEMMs |")
    print("|---|---|---|---|---|---|")
    for batch in batches:
        from_memory = graph_ms(step_gemms(weights, batch))
        resident = graph_ms(step_gemms([weights[0]] * LAYERS, batch))
        inputs = {w.shape[1]: torch.randn(batch, w.shape[1], device="cuda", dtype=DTYPE) for w in weights[0]}

        def prefetched():
            for layer in weights:
                for w in layer:
                    w.amax()  # reads every byte once, through L2
                for w in layer:
                    F.linear(inputs[w.shape[1]], w)

        cells = [from_memory, resident, graph_ms(prefetched)]
        cells += [graph_ms(layers_with_attention(weights, batch, prefetch)) for prefetch in (False, True)]
        print(f"| {batch} | " + " | ".join(f"{ms:.3f}" for ms in cells) + " |")


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


def uneven_paged(batch: int, generator: torch.Generator, kv_heads: int = 8, head_dim: int = 128,
                 block_size: int = 16, width: int = 4096 // 16):
    """A decode batch over uneven contexts (uniform 100-2048 tokens, as the nano-vllm workload's mid-run batches):
    (q, k_cache, v_cache, block tables max_model_len wide, context lens, longest-first order, KV bytes read)."""
    lens_host = torch.randint(100, 2049, (batch,), generator=generator)
    blocks = (lens_host + block_size - 1) // block_size
    total_blocks = int(blocks.sum())
    shape = (total_blocks, block_size, kv_heads, head_dim)
    k_cache = torch.randn(shape, device="cuda", dtype=DTYPE)
    v_cache = torch.randn(shape, device="cuda", dtype=DTYPE)
    ids = torch.randperm(total_blocks).to(torch.int32)
    tables = torch.zeros(batch, width, dtype=torch.int32)
    start = 0
    for row, count in enumerate(blocks.tolist()):
        tables[row, :count] = ids[start:start + count]
        start += count
    order = torch.argsort(lens_host, descending=True, stable=True).to(torch.int32).cuda()
    q = torch.randn(batch, 2 * kv_heads, head_dim, device="cuda", dtype=DTYPE)
    kv_bytes = 2 * int(lens_host.sum()) * kv_heads * head_dim * 2
    return q, k_cache, v_cache, tables.cuda(), lens_host.to(torch.int32).cuda(), order, kv_bytes


def bench_context_order(bandwidth: float) -> None:
    """The decode kernel over uneven contexts: sequences started in batch order against longest first
    (paged_decode_attention's seq_order)."""
    print("\npaged decode kernel, uneven contexts (100-2048), one CUDA graph replay: ms (fraction of copy bandwidth)")
    print("| batch | splits | batch order | longest first |\n|---|---|---|---|")
    generator = torch.Generator().manual_seed(0)
    for batch in (64, 128, 256):
        q, k_cache, v_cache, tables, lens, order, kv_bytes = uneven_paged(batch, generator)
        out = torch.empty_like(q)
        chosen = triton_ops.choose_num_splits(batch, k_cache.shape[2], 4096, q.device)
        for splits in sorted({1, 2, chosen}):
            cells = []
            for seq_order in (None, order):
                ms = graph_ms(lambda s=splits, o=seq_order: triton_ops.paged_decode_attention(
                    q, k_cache, v_cache, tables, lens, q.shape[-1]**-0.5, out=out, num_splits=s, seq_order=o))
                cells.append(f"{ms:.3f} ({kv_bytes / ms / 1e6 / (bandwidth / 1e9):.0%})")
            print(f"| {batch} | {splits}{'*' if splits == chosen else ''} | " + " | ".join(cells) + " |")
        del k_cache, v_cache


# (TILE_N, num_warps, num_stages) besides the engine's (triton_ops._decode_launch_config). Fewer stages or a narrower tile take less shared
# memory, so more programs fit on a multiprocessor; that matters where programs are short and each one's start
# (the block table, then the first K tile: two memory round trips) is not hidden by the others.
TILE_CONFIGS = [(64, 4, 3), (64, 4, 2), (64, 4, 4), (32, 4, 3), (32, 4, 4), (32, 2, 3), (32, 2, 4), (16, 2, 4),
                (64, 8, 3), (128, 8, 2)]


def sweep_uneven(bandwidth: float, batches: list[int]) -> None:
    """Every tile configuration x split count over uneven contexts, longest first, as the engine launches it:
    where in a call (which batch sizes) another configuration would read the KV faster. Outputs are checked
    against the engine's configuration (the same math in another order: close, not equal)."""
    print("\npaged decode kernel, uneven contexts (100-2048), longest first, one CUDA graph replay: fraction of copy "
          "bandwidth per (TILE_N, warps, stages) and split count; * = the engine's choice")
    print("| batch | the engine's | the four fastest |\n|---|---|---|")
    generator = torch.Generator().manual_seed(1)
    for batch in batches:
        q, k_cache, v_cache, tables, lens, order, kv_bytes = uneven_paged(batch, generator)
        scale = q.shape[-1]**-0.5
        chosen = triton_ops.choose_num_splits(batch, k_cache.shape[2], 4096, q.device)
        engine_config = triton_ops._decode_launch_config(q.dtype, q.shape[-1])
        expected = triton_ops.paged_decode_attention(q, k_cache, v_cache, tables, lens, scale, seq_order=order)
        rows = []
        for config in [engine_config] + [c for c in TILE_CONFIGS if c != engine_config]:
            for splits in sorted({1, 2, 3, 4, 6, chosen}):
                out = torch.empty_like(q)

                def run(config=config, splits=splits, out=out):
                    tile_n, num_warps, num_stages = config
                    return triton_ops._launch_decode(q, k_cache, v_cache, tables, lens, scale, out,
                                                     num_splits=splits, tile_n=tile_n, num_warps=num_warps,
                                                     num_stages=num_stages, seq_order=order)
                try:
                    ms = graph_ms(run)
                except Exception as error:  # noqa: BLE001 - a configuration may not fit in shared memory
                    print(f"  batch {batch} {config} splits {splits}: failed ({type(error).__name__})")
                    continue
                if not torch.allclose(out.float(), expected.float(), atol=2e-2, rtol=2e-2):
                    raise AssertionError(f"batch {batch} {config} splits {splits}: output differs")
                star = "*" if config == engine_config and splits == chosen else ""
                rows.append((ms, f"{config} x{splits}{star}", kv_bytes / ms / 1e6 / (bandwidth / 1e9)))
        rows.sort()
        engine = next(r for r in rows if r[1].endswith("*"))
        best = ", ".join(f"{name} {share:.0%}" for _, name, share in rows[:4])
        print(f"| {batch} | engine {engine[1]} {engine[2]:.0%} ({engine[0]:.3f} ms) | best: {best} |")
        del k_cache, v_cache


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", default="1,8,32,64,128,256")
    parser.add_argument("--context-order", action="store_true", help="only the uneven-contexts table")
    parser.add_argument("--uneven-sweep", action="store_true",
                        help="only the tile-configuration sweep over uneven contexts, at --batches")
    parser.add_argument("--l2", action="store_true", help="only the projections from L2 against from memory")
    args = parser.parse_args()
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}")
    if args.l2:
        bench_l2([int(b) for b in args.batches.split(",")])
        return
    bandwidth = measure_memory_bandwidth("cuda", nbytes=1 << 30, repeats=10)
    if args.uneven_sweep:
        sweep_uneven(bandwidth, [int(b) for b in args.batches.split(",")])
        return
    if not args.context_order:
        bench_gemms([int(b) for b in args.batches.split(",")], bandwidth)
        bench_splits(bandwidth)
    bench_context_order(bandwidth)


if __name__ == "__main__":
    main()
