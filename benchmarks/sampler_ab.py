"""Another version of the GPU sampler against this one: same logits, CUDA-graph replays, default launches.

    git show 93e9fdf:reference/fused_sampling.py > /tmp/old_fused_sampling.py
    python benchmarks/sampler_ab.py /tmp/old_fused_sampling.py

The other module is loaded from its file (a relative `from .sampling import` is pointed at this tree's). For each
row count it prints both races' time and whether greedy rows drew the same tokens; then it draws one peaked row
of Qwen3's vocabulary 400,000 times with each and prints how far the ten likeliest tokens' frequencies are from
softmax(l / 0.6), in standard errors.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from decode_gemms import graph_ms  # noqa: E402 (this folder is on the path when run as a script)
from reference import fused_sampling  # noqa: E402

VOCAB = 151_936
TEMPERATURE = 0.6


def load_other(path: str):
    source = Path(path).read_text().replace("from .sampling import", "from reference.sampling import")
    copy = Path(tempfile.mkdtemp()) / "other_fused_sampling.py"
    copy.write_text(source)
    spec = importlib.util.spec_from_file_location("other_fused_sampling", copy)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def race_args(rows: int, greedy: bool = False):
    inv_temp = torch.full((rows,), 0.0 if greedy else 1 / TEMPERATURE, device="cuda")
    thresholds = torch.full((rows,), float("-inf"), device="cuda")
    return inv_temp, thresholds


def timings(other) -> None:
    print("| rows | other us | this tree us | greedy tokens the same |\n|---|---|---|---|")
    for rows in (1, 8, 32, 64, 128, 256, 512):
        logits = (torch.randn(rows, VOCAB, device="cuda") * 2).bfloat16()
        seeds = torch.arange(rows, device="cuda", dtype=torch.int64) * 7919 + 1
        inv_temp, thresholds = race_args(rows)
        us = [graph_ms(lambda m=m: m.race(logits, inv_temp, thresholds, seeds), replays=50) * 1e3
              for m in (other, fused_sampling)]
        zero, _ = race_args(rows, greedy=True)
        greedy = [m.race(logits, zero, thresholds, seeds) for m in (other, fused_sampling)]
        same = torch.equal(*greedy)
        print(f"| {rows} | {us[0]:.1f} | {us[1]:.1f} | {same} |")


def frequencies(other, draws: int = 100_000, batches: int = 4) -> None:
    row = (torch.randn(VOCAB, device="cuda") * 3).bfloat16()
    probs = torch.softmax(row.float() / TEMPERATURE, 0)
    top = probs.topk(10).indices
    inv_temp, thresholds = race_args(draws)
    for name, module in (("other", other), ("this tree", fused_sampling)):
        counts = torch.zeros(VOCAB, device="cuda")
        for _ in range(batches):
            seeds = torch.randint(0, 2**62, (draws,), device="cuda")
            tokens = module.race(row.expand(draws, -1), inv_temp, thresholds, seeds)
            counts += torch.bincount(tokens, minlength=VOCAB)
        n = draws * batches
        z = ((counts[top] / n - probs[top]) / (probs[top] * (1 - probs[top]) / n).sqrt()).abs().max().item()
        print(f"{name}: the ten likeliest tokens (p {probs[top[-1]]:.4f}-{probs[top[0]]:.4f}) within {z:.2f} "
              f"standard errors over {n} draws")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("other", help="path of another fused_sampling.py")
    args = parser.parse_args()
    other = load_other(args.other)
    print(f"{torch.cuda.get_device_name()}; us per race (median of CUDA-graph replays), bf16 logits")
    timings(other)
    frequencies(other)


if __name__ == "__main__":
    main()
