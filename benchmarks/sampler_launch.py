"""The GPU sampler's launch shape and its input's dtype, timed alone (CUDA-graph replays).

    python benchmarks/sampler_launch.py [--rows 32,128,256]

fused_sampling.race draws one token per row of [rows, vocab] logits (Qwen3's 151,936 columns here) in two
kernels; the first splits each row's tiles over several programs, and which split count fills the GPU is a launch
choice (the tokens depend on neither the split nor the dtype: the same columns get the same noise). For each row
count this prints the time of one race for several programs-per-multiprocessor targets and for one tile a
program, on float32 logits and on bf16 logits, what the float32 copy of bf16 logits costs (what the model's
compute_logits did before the fast runner kept bf16), and how long reading the bf16 logits once takes (a sum).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from decode_gemms import graph_ms  # noqa: E402 (this folder is on the path when run as a script)
from reference import fused_sampling  # noqa: E402

VOCAB = 151_936


def graph_us(fn) -> float:
    return graph_ms(fn, replays=50) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", default="32,128,256")
    args = parser.parse_args()
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    targets = [4, 8, 16, 32, 64]
    print(f"{torch.cuda.get_device_name()}, {sms} multiprocessors; us per race (median of graph replays); "
          f"* = fused_sampling's PROGRAMS_PER_MULTIPROCESSOR ({fused_sampling.PROGRAMS_PER_MULTIPROCESSOR})")
    print("| rows | logits | " + " | ".join(f"{t}/SM" for t in targets) + " | a tile a program "
          "| float32 copy of bf16 | one read (sum) |")
    print("|---|---|" + "---|" * (len(targets) + 3))
    for rows in [int(r) for r in args.rows.split(",")]:
        bf16 = torch.randn(rows, VOCAB, device="cuda").to(torch.bfloat16)
        inv_temp = torch.full((rows,), 1 / 0.6, device="cuda")
        thresholds = torch.full((rows,), float("-inf"), device="cuda")
        seeds = torch.arange(rows, device="cuda", dtype=torch.int64) * 7919 + 1
        tokens = {}
        for name, logits in (("float32", bf16.float()), ("bf16", bf16)):
            cells = []
            for target in targets + [None]:
                splits = triton_cdiv(target * sms, rows) if target else triton_cdiv(VOCAB, fused_sampling.MAX_TILE)
                us = graph_us(lambda: fused_sampling.race(logits, inv_temp, thresholds, seeds, num_splits=splits))
                tokens[(name, target)] = fused_sampling.race(logits, inv_temp, thresholds, seeds, num_splits=splits)
                star = "*" if target == fused_sampling.PROGRAMS_PER_MULTIPROCESSOR else ""
                cells.append(f"{us:.1f}{star}")
            copy = graph_us(lambda: bf16.float()) if name == "bf16" else float("nan")
            read = graph_us(lambda: logits.sum(dim=1))
            print(f"| {rows} | {name} | " + " | ".join(cells) + f" | {copy:.1f} | {read:.1f} |")
        first = next(iter(tokens.values()))
        same = all(torch.equal(first, t) for t in tokens.values())
        print(f"|  | every split count and dtype drew the same tokens: {same} |" + " |" * (len(targets) + 3))


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)


if __name__ == "__main__":
    main()
