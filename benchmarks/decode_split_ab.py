"""The decode kernel's split rule in the engine: one fresh engine per setting, interleaved, on the public-API workload.

    python benchmarks/decode_split_ab.py [--programs-per-sm 3,6,8] [--repeats 2]

choose_num_splits (reference/attention/triton_ops.py) splits each sequence's context until the launch has
PROGRAMS_PER_MULTIPROCESSOR programs per multiprocessor. The CUDA graphs fix the split count per batch size when
they are captured, so each setting needs its own engine: this script starts one per setting and repeat, each in a
process of its own (an engine sizes its KV cache from the memory left free, so two in one process do not fit), in
interleaved order (a, b, c, a, b, c: the card's drift between minutes falls on every setting alike), and times one
`generate` call on fresh prompts (workload seed 1, default settings, temperature 0.6, random Qwen3-0.6B). Printed
per setting: the decode-only steps' GPU time (CUDA events around each launch, as step_costs.py), the
prompt-running steps' time, and the call's wall time. Times only: nothing here is a test.
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


def one_call(path: str, programs_per_sm: int) -> dict:
    """In this process: an engine with the setting, one timed generate call on fresh prompts."""
    triton_ops.PROGRAMS_PER_MULTIPROCESSOR = programs_per_sm  # read by choose_num_splits at capture and launch
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


def in_own_process(path: str, programs_per_sm: int) -> dict:
    done = subprocess.run([sys.executable, __file__, "--one", str(programs_per_sm), "--checkpoint", path],
                          capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--programs-per-sm", default="3,6,8", help="settings of PROGRAMS_PER_MULTIPROCESSOR")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)  # a child process: run this setting once
    parser.add_argument("--checkpoint", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one is not None:
        print(json.dumps(one_call(args.checkpoint, args.one)))
        return
    settings = [int(v) for v in args.programs_per_sm.split(",")]
    results = {s: [] for s in settings}
    with tempfile.TemporaryDirectory() as path:
        save_random_checkpoint(path, torch.bfloat16)
        for _ in range(args.repeats):
            for setting in settings:
                results[setting].append(in_own_process(path, setting))
    print(f"{torch.cuda.get_device_name()}; medians over {args.repeats} engines per setting, interleaved")
    print("| programs per SM | decode-only steps s | prompt-running steps s | call wall s | each call's decode s |")
    print("|---|---|---|---|---|")
    for setting, rows in results.items():
        med = {key: statistics.median(r[key] for r in rows) for key in ("decode", "prompt", "wall")}
        each = ", ".join(f"{r['decode']:.3f}" for r in rows)
        print(f"| {setting} | {med['decode']:.3f} | {med['prompt']:.3f} | {med['wall']:.2f} | {each} |")


if __name__ == "__main__":
    main()
