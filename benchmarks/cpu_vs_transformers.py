"""The engine on a CPU against transformers in the same process: continuous batching vs static batching (issue 21).

    python benchmarks/cpu_vs_transformers.py [--repeats 3] [--load 0,2] [--engine-option max_num_seqs=8 ...]

Workload (issue 21): 48 requests, prompts of 16-96 random token ids, 8-64 output tokens each, ignore EOS, all at
once, greedy, SmolLM2-135M float32. Each repeat runs, one after another in this process:
- the engine with its DEFAULT settings (plus any --engine-option) through reference.bench.run_engine;
- transformers `generate` in padded static batches of each --hf-batch-sizes (its best is "static");
- transformers one request at a time on the first --per-request requests ("per request"; compared per token).
With --load 0,2 every repeat runs each condition: quiet, then with 2 busy-loop processes (as
benchmarks/notebook_times_under_load.py makes load). The ratios are taken within a repeat, then the median over
repeats is printed, because the machine's speed drifts between minutes while a repeat's runs see the same machine.
Times only: nothing here is a test.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import platform
import statistics
import time


def busy_loop() -> None:
    while True:
        pass


def parse_option(text: str) -> tuple[str, object]:
    name, _, value = text.partition("=")
    for convert in (int, float):
        try:
            return name, convert(value)
        except ValueError:
            pass
    return name, {"true": True, "false": False}.get(value.lower(), value)


def run_round(engine, hf_model, workload, args) -> dict[str, float]:
    """One engine run and the transformers runs beside it; output tok/s of each (requested tokens only)."""
    from reference.bench import run_engine, run_hf_baseline

    engine_run = run_engine(engine, workload)
    steps = engine_run.steps
    row = {"engine": engine_run.summary.output_throughput, "engine_steps": len(steps),
           "engine_step_ms": 1e3 * statistics.median(s.end - s.start for s in steps)}
    for size in args.hf_batch_sizes:
        row[f"hf_static_{size}"] = run_hf_baseline(hf_model, workload, size).output_throughput
    row["hf_static"] = max(row[f"hf_static_{size}"] for size in args.hf_batch_sizes)
    row["hf_per_request"] = run_hf_baseline(hf_model, workload.head(args.per_request), 1).output_throughput
    row["vs_static"] = row["engine"] / row["hf_static"]
    row["vs_per_request"] = row["engine"] / row["hf_per_request"]
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--load", default="0", help="busy-loop processes per condition, comma-separated (e.g. 0,2)")
    parser.add_argument("--num-requests", type=int, default=48)
    parser.add_argument("--hf-batch-sizes", type=lambda s: [int(x) for x in s.split(",")], default=[8, 16, 48])
    parser.add_argument("--per-request", type=int, default=12, help="requests run one at a time through transformers")
    parser.add_argument("--engine-option", type=parse_option, action="append", default=[], metavar="NAME=VALUE")
    parser.add_argument("--torch-first", action="store_true",
                        help="import torch before reference, leaving OpenMP's default wait policy (idle threads spin)")
    args = parser.parse_args()

    if args.torch_first:
        import torch  # noqa: F401  (before reference: OpenMP's idle threads spin, the engine follows free cores)
    from reference import LLMEngine  # first, as the CLI and the notebooks do: OpenMP's idle threads sleep

    import torch
    import transformers
    from transformers import AutoModelForCausalLM

    from reference.models import resolve_model_dir
    from reference.workload import make_workload

    transformers.logging.set_verbosity_error()
    loads = [int(x) for x in args.load.split(",")]
    engine = LLMEngine("smollm2", device="cpu", dtype="float32", **dict(args.engine_option))
    config = engine.config
    # A new workload (seed) every round: the same prompts again would be prefix-cache hits for the engine.
    workloads = [make_workload(args.num_requests, (16, 96), (8, 64), vocab_size=engine.model_config.vocab_size,
                               avoid_token_ids=engine.eos_token_ids, seed=seed) for seed in range(len(loads) * args.repeats)]
    hf_model = AutoModelForCausalLM.from_pretrained(str(resolve_model_dir("smollm2")), dtype=torch.float32).eval()
    print(f"{os.cpu_count()} CPUs ({platform.processor() or platform.machine()}), torch {torch.__version__}, "
          f"transformers {transformers.__version__}, OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}")
    print(f"workload (seed 0; each round draws new prompts and lengths): {workloads[0].describe()}")
    print(f"engine: max_num_seqs {config.max_num_seqs}, max_num_batched_tokens {config.max_num_batched_tokens}, "
          f"max_model_len {config.max_model_len}, KV blocks {engine.kv_manager.num_blocks}, "
          f"attention {engine.runner.attention_backend.name}, options {dict(args.engine_option)}")
    rows: dict[int, list[dict[str, float]]] = {load: [] for load in loads}
    for repeat in range(args.repeats):
        for load in loads:
            workers = [multiprocessing.Process(target=busy_loop, daemon=True) for _ in range(load)]
            for worker in workers:
                worker.start()
            try:
                started = time.perf_counter()
                row = run_round(engine, hf_model, workloads.pop(0), args)
            finally:
                for worker in workers:
                    worker.terminate()
            row["threads"] = torch.get_num_threads()
            rows[load].append(row)
            print(f"repeat {repeat + 1}, load {load}: " + ", ".join(f"{k} {v:.2f}" for k, v in row.items())
                  + f" ({time.perf_counter() - started:.0f} s)", flush=True)
    print_table(rows, args)


def print_table(rows: dict[int, list[dict[str, float]]], args) -> None:
    keys = ["engine", *[f"hf_static_{s}" for s in args.hf_batch_sizes], "hf_per_request", "vs_static",
            "vs_per_request", "engine_step_ms", "threads"]
    print(f"\nmedians over {args.repeats} repeats (output tok/s of requested tokens; ratios taken per repeat)")
    print("| busy loops | " + " | ".join(keys) + " |")
    print("|---" * (len(keys) + 1) + "|")
    for load, load_rows in rows.items():
        print(f"| {load} | " + " | ".join(f"{statistics.median(r[k] for r in load_rows):.2f}" for k in keys) + " |")
    if 0 in rows and len(rows) > 1:
        quiet = statistics.median(r["engine"] for r in rows[0])
        for load in rows:
            if load:
                busy = statistics.median(r["engine"] for r in rows[load])
                share = os.cpu_count() / (os.cpu_count() + load)  # the CPU a fair scheduler leaves us
                print(f"engine with {load} busy loops: {busy / quiet:.2f}x its quiet speed "
                      f"(proportional share of the CPU: {share:.2f}x)")


if __name__ == "__main__":
    main()
