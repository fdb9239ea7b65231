"""Where an engine step's time goes on the GPU: host Python vs GPU kernels, and which kernels.

    python benchmarks/profile_engine.py [--model random:qwen3-0.6b] [--num-requests 256] [--window 300:320]

Runs the bench workload (nano-vllm's lengths by default) through the engine twice over:
1. under cProfile, printing the host functions that take the most time over the whole run;
2. with torch.profiler around a window of steps (decode steps by default), printing the GPU kernels by total
   time and, per step, the wall time against the GPU busy time (the gap is host overhead the GPU waits on).
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import sys
import time

import torch

from reference import LLMEngine
from reference.bench import make_workload, parse_range, run_engine


def profile_window(engine: LLMEngine, first: int, last: int) -> None:
    """Wrap engine.step so that steps first..last-1 of the run are recorded by torch.profiler."""
    from torch.profiler import ProfilerActivity, profile

    step, count, state = engine.step, [0], {}

    def wrapped(*args, **kwargs):
        if count[0] == first:
            state["prof"] = profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA])
            state["prof"].__enter__()
            state["start"] = time.perf_counter()
        out = step(*args, **kwargs)
        count[0] += 1
        if count[0] == last:
            torch.cuda.synchronize()
            wall = time.perf_counter() - state["start"]
            state["prof"].__exit__(None, None, None)
            events = state["prof"].key_averages()
            gpu_us = sum(e.self_device_time_total for e in events)
            steps = last - first
            print(f"\nsteps {first}..{last - 1}: wall {1e3 * wall / steps:.2f} ms/step, "
                  f"GPU busy {gpu_us / 1e3 / steps:.2f} ms/step ({gpu_us / 1e6 / wall:.0%} of wall)")
            print(events.table(sort_by="self_device_time_total", row_limit=15, max_name_column_width=60))
        return out

    engine.step = wrapped


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="random:qwen3-0.6b")
    parser.add_argument("--num-requests", type=int, default=256)
    parser.add_argument("--input-len", type=parse_range, default=(100, 1024))
    parser.add_argument("--output-len", type=parse_range, default=(100, 1024))
    parser.add_argument("--max-num-seqs", type=int, default=256)
    parser.add_argument("--window", type=parse_range, default=(300, 320),
                        help="steps to trace, FIRST:LAST, counted from the run's first step (its warm-up included)")
    parser.add_argument("--enforce-eager", action="store_true")
    args = parser.parse_args(argv)
    engine = LLMEngine(args.model, dtype="bfloat16", max_num_seqs=args.max_num_seqs, max_model_len=2048,
                       max_num_batched_tokens=8192, enforce_eager=args.enforce_eager)
    workload = make_workload(args.num_requests, args.input_len, args.output_len,
                             vocab_size=engine.model_config.vocab_size, seed=0)
    profiler = cProfile.Profile()
    profiler.enable()
    run = run_engine(engine, workload, use_tqdm=False)
    profiler.disable()
    print(f"under cProfile: {run.summary.output_throughput:.0f} output tok/s, {len(run.steps)} steps")
    pstats.Stats(profiler, stream=sys.stdout).sort_stats("tottime").print_stats(25)
    print_steps(engine.step_log[-len(run.steps) - 2:], args.window)  # the 2 steps of run_engine's warm-up request
    # Same lengths, new prompt tokens: the prefix cache must not turn the second run's prefills into cache hits.
    workload = make_workload(args.num_requests, args.input_len, args.output_len,
                             vocab_size=engine.model_config.vocab_size, seed=1)
    profile_window(engine, *args.window)
    first_step = len(engine.step_log)
    run = run_engine(engine, workload, use_tqdm=False)
    print(f"under torch.profiler (window only): {run.summary.output_throughput:.0f} output tok/s")
    print_steps(engine.step_log[first_step:], args.window)


def print_steps(log, window: tuple[int, int]) -> None:
    print("the window's steps (host-timed from launch to the end of the step's bookkeeping, which includes waiting "
          "for sampled tokens: this step's, or under async scheduling the previous step's):")
    for record in log[window[0]: window[1]]:
        print(f"  step {record.step}: {record.num_prefill_tokens:5d} prefill + {record.num_decode_tokens:3d} decode "
              f"tokens, {1e3 * (record.end - record.start):7.2f} ms")


if __name__ == "__main__":
    main()
