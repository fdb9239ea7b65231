"""The decode kernel's split rule in the engine: one fresh engine per setting, interleaved, on the public-API workload.

    python benchmarks/decode_split_ab.py [--programs-per-sm 3,6,8] [--repeats 2]

choose_num_splits (reference/attention/triton_ops.py) splits each sequence's context until the launch has
PROGRAMS_PER_MULTIPROCESSOR programs per multiprocessor. The CUDA graphs fix the split count per batch size when
they are captured, so each setting needs its own engine: this script builds one per setting and repeat, in
interleaved order (a, b, c, a, b, c: the card's drift between minutes falls on every setting alike), and times one
`generate` call on fresh prompts (workload seed 1, default settings, temperature 0.6, random Qwen3-0.6B). Printed
per setting: the decode-only steps' GPU time (CUDA events around each launch, as step_costs.py), the
prompt-running steps' time, and the call's wall time. Times only: nothing here is a test.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import tempfile
import time

import torch

from public_api_throughput import save_random_checkpoint
from reference import LLM
from reference.attention import triton_ops
from reference.models.presets import ARCHITECTURES
from reference.workload import make_workload
from step_costs import generate, time_launches


def one_call(path: str, programs_per_sm: int, workload) -> dict:
    triton_ops.PROGRAMS_PER_MULTIPROCESSOR = programs_per_sm  # read by choose_num_splits at capture and launch
    llm = LLM(path, device="cuda", dtype="bfloat16")
    timings = []
    undo = time_launches(llm.engine.runner, timings)
    start = time.perf_counter()
    generate(llm, workload)
    wall = time.perf_counter() - start
    undo()
    torch.cuda.synchronize()
    busy = [(t.start.elapsed_time(t.end) / 1e3, t.tokens == t.batch) for t in timings]
    del llm
    gc.collect()
    torch.cuda.empty_cache()
    return dict(wall=wall, decode=sum(b for b, d in busy if d), prompt=sum(b for b, d in busy if not d))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--programs-per-sm", default="3,6,8", help="settings of PROGRAMS_PER_MULTIPROCESSOR")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    settings = [int(v) for v in args.programs_per_sm.split(",")]
    vocab = ARCHITECTURES["qwen3-0.6b"]["vocab_size"]
    workload = make_workload(256, (100, 1024), (100, 1024), vocab_size=vocab, seed=1)
    results = {s: [] for s in settings}
    with tempfile.TemporaryDirectory() as path:
        save_random_checkpoint(path, torch.bfloat16)
        for _ in range(args.repeats):
            for setting in settings:
                results[setting].append(one_call(path, setting, workload))
    print(f"{torch.cuda.get_device_name()}; medians over {args.repeats} engines per setting, interleaved")
    print("| programs per SM | decode-only steps s | prompt-running steps s | call wall s | each call's decode s |")
    print("|---|---|---|---|---|")
    for setting, rows in results.items():
        med = {key: statistics.median(r[key] for r in rows) for key in ("decode", "prompt", "wall")}
        each = ", ".join(f"{r['decode']:.3f}" for r in rows)
        print(f"| {setting} | {med['decode']:.3f} | {med['prompt']:.3f} | {med['wall']:.2f} | {each} |")


if __name__ == "__main__":
    main()
