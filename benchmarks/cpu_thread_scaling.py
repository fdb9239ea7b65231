"""How much a second torch thread speeds up the engine and transformers on issue 21's workload (CPU, same process).

    python benchmarks/cpu_thread_scaling.py [--pairs 2]

Why: where OpenMP's idle threads spin, on a machine whose cores are all busy elsewhere, the engine runs one
thread (runtime.CpuThreads), which the kernel gives about cores / (runnable threads) of a core: 2/3 of one with
two busy loops on two cores. Its speed under load, as a share of its quiet two-thread speed, is then about
(2/3) / S, where S is its quiet two-thread over one-thread speed-up: a program that scales well on two threads
keeps a smaller share. This measures S for both, alternating 1 and 2 threads on the same prompts (prefix caching
off). Times only.
"""

from __future__ import annotations

import argparse
import statistics


def speeds(engine, hf_model, workload, threads: int) -> tuple[float, float]:
    """(engine, transformers static batch of 48) output tok/s with `threads` torch threads."""
    import torch

    from reference.bench import run_engine, run_hf_baseline

    torch.set_num_threads(threads)  # the engine was built with cpu_threads set, so its policy leaves this alone
    engine_speed = run_engine(engine, workload, use_tqdm=False).summary.output_throughput
    return engine_speed, run_hf_baseline(hf_model, workload, 48).output_throughput


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=2)
    args = parser.parse_args()
    from reference import LLMEngine

    import torch
    from transformers import AutoModelForCausalLM

    from reference.models import resolve_model_dir
    from reference.workload import make_workload

    engine = LLMEngine("smollm2", device="cpu", dtype="float32", enable_prefix_caching=False, cpu_threads=2)
    hf_model = AutoModelForCausalLM.from_pretrained(str(resolve_model_dir("smollm2")), dtype=torch.float32).eval()
    scaling = {"engine": [], "transformers": []}
    for pair in range(args.pairs):
        workload = make_workload(48, (16, 96), (8, 64), vocab_size=engine.model_config.vocab_size,
                                 avoid_token_ids=engine.eos_token_ids, seed=pair)
        order = (2, 1) if pair % 2 else (1, 2)
        result = {threads: speeds(engine, hf_model, workload, threads) for threads in order}
        for i, name in enumerate(scaling):
            scaling[name].append(result[2][i] / result[1][i])
        print(f"pair {pair + 1}: 1 thread engine {result[1][0]:.1f}, transformers {result[1][1]:.1f} tok/s; "
              f"2 threads engine {result[2][0]:.1f}, transformers {result[2][1]:.1f} tok/s", flush=True)
    for name, values in scaling.items():
        s = statistics.median(values)
        print(f"{name}: 2 threads / 1 thread = {s:.2f} (median of {len(values)}); one thread at 2/3 of a core "
              f"would keep {2 / 3 / s:.2f}x of the quiet two-thread speed")


if __name__ == "__main__":
    main()
