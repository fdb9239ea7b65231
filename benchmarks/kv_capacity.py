"""KV capacity in the same memory: contiguous reservation (lab 0.2) vs paged blocks (lab 0.3).

Both managers get the same number of KV slots. Sequences with lengths drawn uniformly from a range are
admitted at their full length until the manager refuses; we report how many fit at once and how many
reserved slots hold nothing (internal fragmentation). No model runs: this measures the bookkeeping of the
real managers, and the bytes follow from the model's KV bytes per token.

    python benchmarks/kv_capacity.py [--slots 16384] [--max-model-len 2048] [--lengths 32:512] [--block-size 16]
"""

from __future__ import annotations

import argparse
import random

import torch

from reference.block_manager import BlockManager
from reference.kv_cache import kv_bytes_per_token
from reference.kv_manager import ContiguousKVManager
from reference.models.presets import preset_config
from reference.sampling import SamplingParams
from reference.sequence import Sequence


def fill(manager, lengths: list[int]) -> tuple[int, int, int]:
    """Admit sequences at full length until one does not fit: (admitted, slots reserved, slots used)."""
    used = 0
    for count, length in enumerate(lengths):
        seq = Sequence(f"r{count}", list(range(length)), SamplingParams())
        if not manager.can_allocate(seq, length):
            return count, manager.num_reserved_slots(), used
        manager.allocate(seq, length)
        used += length
    return len(lengths), manager.num_reserved_slots(), used


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--slots", type=int, default=16384, help="KV token slots given to each manager")
    parser.add_argument("--max-model-len", type=int, default=2048)
    parser.add_argument("--lengths", default="32:512", help="sequence lengths LOW:HIGH (prompt + output)")
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    low, high = map(int, args.lengths.split(":"))
    rng = random.Random(args.seed)
    lengths = [rng.randint(low, high) for _ in range(100_000)]
    bytes_per_token = kv_bytes_per_token(preset_config("smollm2-135m"), torch.float32)

    managers = {
        "contiguous": ContiguousKVManager(args.slots // args.max_model_len, args.max_model_len),
        "paged": BlockManager(args.slots // args.block_size, args.block_size, enable_prefix_caching=False),
    }
    print(f"{args.slots} KV slots = {args.slots * bytes_per_token / 2**30:.2f} GiB for SmolLM2 in float32; "
          f"max_model_len {args.max_model_len}, sequence lengths uniform {low}-{high}, block_size {args.block_size}")
    print(f"| {'manager':<10} | {'sequences at once':>17} | {'slots reserved':>14} | {'slots used':>10} | "
          f"{'wasted':>7} |")
    print(f"|{'-' * 12}|{'-' * 19}|{'-' * 16}|{'-' * 12}|{'-' * 9}|")
    for name, manager in managers.items():
        admitted, reserved, used = fill(manager, lengths)
        print(f"| {name:<10} | {admitted:>17} | {reserved:>14} | {used:>10} | {(reserved - used) / reserved:>6.1%} |")


if __name__ == "__main__":
    main()
