"""The paged decode kernel as a decode step runs it: 28 layers in one CUDA graph, contexts as in the workload.

    python benchmarks/decode_kernel_sweep.py [--batches 256,192,128,64,32] [--layers 28] [--variants all]

For each batch size, sequences get contexts as in the middle of the nano-vllm workload (input uniform in
[100, 1024] plus the tokens generated so far, more for the smaller batches that remain later in a call), their
blocks scattered through a paged cache of block size 16 (each layer its own cache, as in the engine), the
programs started longest context first and split as the engine splits them (choose_num_splits). Each variant
(a launch configuration, and the grid's order: sequences first, or a sequence's KV heads side by side) is
recorded as `layers` launches in one CUDA graph; its replay is timed (median of 20) and its KV read rate is
compared with the card's copy bandwidth. Every variant's output must equal the first variant's to within bf16
rounding of a different summation order (checked first). Without CUDA: --quick in the interpreter.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

HEADS, KV_HEADS, HEAD_DIM, BLOCK = 16, 8, 128, 16  # Qwen3-0.6B, the engine's block size
VARIANTS = {  # name: (TILE_N, num_warps, num_stages, heads_first); None: the engine's own choice
    "engine": None,
    "64/4/3": (64, 4, 3, False),  # the engine's choice before the seventeenth session
    "heads first": (64, 4, 3, True),
    "64/4/4": (64, 4, 4, False),
    "32/4/3": (32, 4, 3, False),
    "32/4/4": (32, 4, 4, False),
    "64/2/3": (64, 2, 3, False),
    "128/4/3": (128, 4, 3, False),
    "heads first 128/4/3": (128, 4, 3, True),
    "heads first 32/4/4": (32, 4, 4, True),
}


def contexts_for(batch: int, generator: torch.Generator) -> torch.Tensor:
    """Context lengths of `batch` running sequences: prompt in [100, 1024] plus the tokens made so far."""
    made = int(1024 * (1 - batch / 256)) if batch < 256 else 64
    return torch.randint(100, 1025, (batch,), generator=generator) + made


def paged_inputs(batch: int, layers: int, device: str, dtype: torch.dtype, seed: int = 0) -> dict:
    """q, per-layer caches, scattered block tables, context lengths and the longest-first order."""
    generator = torch.Generator().manual_seed(seed)
    lens = contexts_for(batch, generator)
    blocks_each = (lens + BLOCK - 1) // BLOCK
    widest = int(blocks_each.max())
    num_blocks = int(blocks_each.sum())
    permutation = torch.randperm(num_blocks, generator=generator).to(torch.int32)
    tables = torch.full((batch, widest), -1, dtype=torch.int32)
    start = 0
    for row, count in enumerate(blocks_each.tolist()):
        tables[row, :count] = permutation[start:start + count]
        start += count
    torch.manual_seed(seed)  # the caches are drawn where they live (28 layers of them: gigabytes)
    shape = (num_blocks, BLOCK, KV_HEADS, HEAD_DIM)
    caches = [(torch.randn(shape, device=device, dtype=dtype), torch.randn(shape, device=device, dtype=dtype))
              for _ in range(layers)]
    return dict(q=torch.randn(batch, HEADS, HEAD_DIM, generator=generator).to(device, dtype), caches=caches,
                tables=tables.to(device), lens=lens.to(torch.int32).to(device),
                order=torch.argsort(lens, descending=True).to(torch.int32).to(device), max_len=int(lens.max()),
                kv_bytes=int(lens.sum()) * KV_HEADS * HEAD_DIM * 2 * torch.finfo(dtype).bits // 8 * layers)


def launcher(triton_ops, data: dict, variant: tuple, outs: list[torch.Tensor]):
    splits = triton_ops.choose_num_splits(data["q"].shape[0], KV_HEADS, data["max_len"], data["q"].device)
    if variant is None:
        variant = (*triton_ops._decode_launch_config(data["q"].dtype, HEAD_DIM, splits), triton_ops.HEADS_FIRST)
    tile_n, warps, stages, heads_first = variant

    def run():
        for (k, v), out in zip(data["caches"], outs):
            triton_ops._launch_decode(data["q"], k, v, data["tables"], data["lens"], HEAD_DIM ** -0.5, out,
                                      num_splits=splits, tile_n=tile_n, num_warps=warps, num_stages=stages,
                                      seq_order=data["order"], heads_first=heads_first)
    return run, splits


def copy_gbps() -> float:
    """The card's copy bandwidth as the floor measures it (eager copies of 1 GiB; a copy recorded in a CUDA graph
    read 2,712 GB/s against ~4,100 eager on an H200, so the graph is not used here)."""
    from reference.costs import measure_memory_bandwidth

    return measure_memory_bandwidth("cuda", nbytes=1 << 30, repeats=20) / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", default="256,192,128,64,32")
    parser.add_argument("--layers", type=int, default=28)
    parser.add_argument("--variants", default="all", help="comma-separated names from VARIANTS, or all")
    parser.add_argument("--quick", action="store_true", help="the interpreter on the CPU: check outputs only")
    args = parser.parse_args()
    if args.quick:
        os.environ["TRITON_INTERPRET"] = "1"
    from decode_gemms import graph_ms  # imports triton: after TRITON_INTERPRET
    from reference.attention import triton_ops

    names = list(VARIANTS) if args.variants == "all" else args.variants.split(",")
    device, dtype = ("cpu", torch.float32) if args.quick else ("cuda", torch.bfloat16)
    batches = [4] if args.quick else [int(b) for b in args.batches.split(",")]
    layers = 1 if args.quick else args.layers
    bandwidth = None if args.quick else copy_gbps()
    if bandwidth:
        print(f"{torch.cuda.get_device_name()}; copy {bandwidth:.0f} GB/s; {layers} layers a replay")
    print("| batch | splits | variant | ms a step | KV GB/s | of copy | max diff to the first |")
    print("|---|---|---|---|---|---|---|")
    for batch in batches:
        data = paged_inputs(batch, layers, device, dtype)
        expected = None
        for name in names:
            outs = [torch.empty_like(data["q"]) for _ in range(layers)]
            run, splits = launcher(triton_ops, data, VARIANTS[name], outs)
            run()
            expected = outs[0].float() if expected is None else expected
            diff = (outs[0].float() - expected).abs().max().item()
            if diff > 0.02:
                raise SystemExit(f"{name} at batch {batch}: output differs from {names[0]}'s by {diff}")
            if args.quick:
                print(f"| {batch} | {splits} | {name} | - | - | - | {diff:.2e} |")
                continue
            ms = graph_ms(run)  # one replay of the recorded launches, median of 20
            gbps = data["kv_bytes"] / ms / 1e6
            print(f"| {batch} | {splits} | {name} | {ms:.3f} | {gbps:.0f} | {gbps / bandwidth:.1%} | {diff:.2e} |")
        del data


if __name__ == "__main__":
    main()
