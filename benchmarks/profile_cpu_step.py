"""Where a CPU engine step's time goes: torch ops by total time, and the step's host (Python) share (issue 21).

    python benchmarks/profile_cpu_step.py [--engine-option attention_backend=torch ...] [--window 30:40]

Runs issue 21's workload (48 requests, prompts 16-96 random ids, outputs 8-64, all at once, SmolLM2 float32)
through an engine with default settings twice: once under cProfile (the Python functions with the most time of
their own), once with torch.profiler around a window of steps. For the window it prints the ops by self time
and the step's host share: the part of the steps' wall time spent outside torch's ops (the engine's Python:
scheduling, building the batch, dispatching ops, sampling bookkeeping, detokenizing). Times only.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cpu_vs_transformers import parse_option  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--engine-option", type=parse_option, action="append", default=[], metavar="NAME=VALUE")
    parser.add_argument("--window", default="30:40", help="steps FIRST:LAST of the second run to trace")
    args = parser.parse_args()
    first, last = (int(x) for x in args.window.split(":"))

    import torch
    from torch.profiler import ProfilerActivity, profile

    from reference import LLMEngine
    from reference.bench import run_engine
    from reference.workload import make_workload

    engine = LLMEngine("smollm2", device="cpu", dtype="float32", **dict(args.engine_option))
    config = engine.config
    print(f"engine: max_num_seqs {config.max_num_seqs}, max_num_batched_tokens {config.max_num_batched_tokens}, "
          f"attention {engine.runner.attention_backend.name}, torch threads {torch.get_num_threads()}")

    def workload(seed):
        return make_workload(48, (16, 96), (8, 64), vocab_size=engine.model_config.vocab_size,
                             avoid_token_ids=engine.eos_token_ids, seed=seed)

    profiler = cProfile.Profile()
    profiler.enable()
    run = run_engine(engine, workload(0), use_tqdm=False)
    profiler.disable()
    print(f"under cProfile: {run.summary.output_throughput:.1f} output tok/s, {len(run.steps)} steps")
    text = io.StringIO()
    pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(15)
    print(text.getvalue())

    step, count, state = engine.step, [0], {}

    def traced_step(*a, **kw):  # steps first..last-1 of the second run (its warm-up request's 2 steps included)
        if count[0] == first:
            state["prof"] = profile(activities=[ProfilerActivity.CPU])
            state["prof"].__enter__()
            state["start"] = time.perf_counter()
        out = step(*a, **kw)
        count[0] += 1
        if count[0] == last:
            state["wall"] = time.perf_counter() - state["start"]
            state["prof"].__exit__(None, None, None)
        return out

    engine.step = traced_step
    run_engine(engine, workload(1), use_tqdm=False)  # new prompts: no prefix-cache hits from the first run
    events = state["prof"].events()
    # Time inside torch: the top-level ops of every namespace (aten::, and mkl:: for the MKL-packed GEMMs); an op
    # called from inside another op is counted in its caller.
    in_ops = sum(e.cpu_time_total for e in events if "::" in e.name and e.cpu_parent is None) / 1e6
    wall, steps = state["wall"], last - first
    print(f"steps {first}..{last - 1}: {1e3 * wall / steps:.1f} ms a step, {1e3 * in_ops / steps:.1f} ms in torch "
          f"ops; host share (outside torch ops) {1 - in_ops / wall:.0%}")
    print(state["prof"].key_averages().table(sort_by="self_cpu_time_total", row_limit=15, max_name_column_width=40))


if __name__ == "__main__":
    main()
