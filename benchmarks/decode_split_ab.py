"""The decode kernel's split rule in the engine: one fresh engine per setting, interleaved, on the public-API workload.

    python benchmarks/decode_split_ab.py [--programs-per-sm 3,6,12/32x4x4] [--repeats 2]

choose_num_splits (reference/attention/triton_ops.py) splits each sequence's context until the launch has
PROGRAMS_PER_MULTIPROCESSOR programs per multiprocessor; a setting may also fix the kernel's tile configuration
(12/32x4x4: TILE_N 32, 4 warps, 4 stages, in place of triton_ops._decode_launch_config's). The CUDA graphs
fix the split count per batch size when they are captured, so each setting needs its own engine: this script starts
one per setting and repeat, each in a process of its own (an engine sizes its KV cache from the memory left free, so
two in one process do not fit), in interleaved order (a, b, c, a, b, c: the card's drift between minutes falls on
every setting alike), and times one `generate` call on fresh prompts (workload seed 1, default settings,
temperature 0.6, random Qwen3-0.6B). Printed per setting: the decode-only steps' GPU time (CUDA events around each
launch, as step_costs.py), the prompt-running steps' time, and the call's wall time. Times only: nothing here is a
test.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time

import torch

from public_api_throughput import save_random_checkpoint
from reference import LLM
from reference.attention import triton_ops
from reference.models.presets import ARCHITECTURES
from reference.workload import make_workload
from step_costs import generate, time_launches


def apply_setting(setting: str) -> None:
    """In this process: "12" sets PROGRAMS_PER_MULTIPROCESSOR; "12/32x4x4" also the decode kernel's (TILE_N,
    num_warps, num_stages) for every launch. Both are read when the CUDA graphs are captured."""
    programs_per_sm, _, config = setting.partition("/")
    triton_ops.PROGRAMS_PER_MULTIPROCESSOR = int(programs_per_sm)
    if config:
        tile = tuple(int(v) for v in config.split("x"))
        triton_ops._decode_launch_config = lambda dtype, head_dim: tile


def one_call(path: str, setting: str) -> dict:
    """In this process: an engine with the setting, one timed generate call on fresh prompts."""
    apply_setting(setting)
    vocab = ARCHITECTURES["qwen3-0.6b"]["vocab_size"]
    workload = make_workload(256, (100, 1024), (100, 1024), vocab_size=vocab, seed=1)
    llm = LLM(path, device="cuda", dtype="bfloat16")
    timings = []
    time_launches(llm.engine.runner, timings)
    start = time.perf_counter()
    generate(llm, workload)
    wall = time.perf_counter() - start
    torch.cuda.synchronize()
    busy = [(t.start.elapsed_time(t.end) / 1e3, t.tokens == t.batch) for t in timings]
    return dict(wall=wall, decode=sum(b for b, d in busy if d), prompt=sum(b for b, d in busy if not d))


def in_own_process(path: str, setting: str) -> dict:
    done = subprocess.run([sys.executable, __file__, "--one", setting, "--checkpoint", path],
                          capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--programs-per-sm", default="3,6,8",
                        help="settings of PROGRAMS_PER_MULTIPROCESSOR, each optionally /TILE_NxWARPSxSTAGES")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--one", help=argparse.SUPPRESS)  # a child process: run this setting once
    parser.add_argument("--checkpoint", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one is not None:
        print(json.dumps(one_call(args.checkpoint, args.one)))
        return
    settings = args.programs_per_sm.split(",")
    results = {s: [] for s in settings}
    with tempfile.TemporaryDirectory() as path:
        save_random_checkpoint(path, torch.bfloat16)
        for _ in range(args.repeats):
            for setting in settings:
                results[setting].append(in_own_process(path, setting))
    print(f"{torch.cuda.get_device_name()}; medians over {args.repeats} engines per setting, interleaved")
    print("| programs per SM / decode tile | decode-only steps s | prompt-running steps s | call wall s | each call's decode s |")
    print("|---|---|---|---|---|")
    for setting, rows in results.items():
        med = {key: statistics.median(r[key] for r in rows) for key in ("decode", "prompt", "wall")}
        each = ", ".join(f"{r['decode']:.3f}" for r in rows)
        print(f"| {setting} | {med['decode']:.3f} | {med['prompt']:.3f} | {med['wall']:.2f} | {each} |")


if __name__ == "__main__":
    main()
