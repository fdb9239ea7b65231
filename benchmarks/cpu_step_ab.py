"""One change to the CPU engine, off and on, in one engine and one process (issue 21's workload).

    python benchmarks/cpu_step_ab.py --change column-major [--pairs 4] [--threads N] [--load N]

Each pair runs issue 21's workload (48 requests, prompts of 16-96 random ids, 8-64 output tokens, ignore EOS, all
at once, greedy, SmolLM2-135M float32, the engine's default sizes) twice on the same engine, once with the change
off and once on, in alternating order, on the same prompts (prefix caching off, so both runs do the same work).
The ratio is taken within a pair, a minute apart, so a machine whose speed drifts moves both runs together.
Changes (each switched by a function below):
- column-major: packed weights stored column-major on the CPU (models/packing.py) vs row-major.
- gather-buffers: the padded backend gathers K/V into buffers it keeps vs a new tensor per layer.
- mkl-packed: the projections and the LM head multiply by MKL-packed weights (models/mkl_packed.py) vs F.linear.
- budget-256, budget-512: a token budget of 256 / 512 vs the default (the scheduler's, switched between runs).
- every-core: the thread policy for sleeping idle threads (every core) vs the one for spinning threads (the cores
  other programs leave free); run it with --load 2, where the two differ.
--load N keeps N busy-loop processes running through every pair (as cpu_vs_transformers.py makes load).
Times only.
"""

from __future__ import annotations

import argparse
import multiprocessing
import statistics
import time


def column_major(engine, on: bool) -> None:
    from reference.models import packing

    engine.model.pack_projections(False)  # back to row-major, unpacked
    packing.COLUMN_MAJOR_ON_CPU = on
    engine.model.pack_projections(True)


def gather_buffers(engine, on: bool) -> None:
    from reference.attention.padded import GatherBuffers

    class FreshEachTime(GatherBuffers):  # what the backend did before: new tensors for every gather
        def take(self, cache, num_blocks):
            self.k = None
            return super().take(cache, num_blocks)

    engine.runner.attention_backend.buffers = GatherBuffers() if on else FreshEachTime()


def mkl_packed(engine, on: bool) -> None:
    from reference.models import mkl_packed

    engine.model.pack_projections(False)
    mkl_packed.MKL_PACKED_ON_CPU = on
    engine.model.pack_projections(True)


def budget(tokens: int):
    def switch(engine, on: bool) -> None:
        engine.scheduler.max_num_batched_tokens = tokens if on else engine.config.max_num_batched_tokens
    return switch


def every_core(engine, on: bool) -> None:
    import torch

    threads = engine.cpu_threads
    threads.sleeping = on  # runtime.CpuThreads: True uses every core, False follows the free ones
    threads.threads = threads.cores
    torch.set_num_threads(threads.cores)
    threads.last = (time.monotonic() - threads.RECHECK_S, *threads.last[1:])  # off: look at the load at once


CHANGES = {"column-major": column_major, "gather-buffers": gather_buffers, "mkl-packed": mkl_packed,
           "budget-256": budget(256), "budget-512": budget(512), "every-core": every_core}


def busy_loop() -> None:
    while True:
        pass


def run_once(engine, workload) -> tuple[float, float, float, float]:
    """(output tok/s, median step ms, seconds in steps with prompt tokens, seconds in decode-only steps) of one run."""
    from reference.bench import run_engine

    run = run_engine(engine, workload, use_tqdm=False)
    prefill = sum(s.end - s.start for s in run.steps if s.num_prefill_tokens)
    decode = sum(s.end - s.start for s in run.steps if not s.num_prefill_tokens)
    return run.summary.output_throughput, 1e3 * statistics.median(s.end - s.start for s in run.steps), prefill, decode


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--change", choices=CHANGES, required=True)
    parser.add_argument("--pairs", type=int, default=4)
    parser.add_argument("--threads", type=int, default=None, help="cpu_threads (default: the engine's policy)")
    parser.add_argument("--load", type=int, default=0, help="busy-loop processes running through every pair")
    args = parser.parse_args()
    from reference import LLMEngine  # first: OpenMP's idle threads sleep (OMP_WAIT_POLICY=PASSIVE)
    from reference.workload import make_workload

    import torch

    engine = LLMEngine("smollm2", device="cpu", dtype="float32", enable_prefix_caching=False,
                       cpu_threads=args.threads)
    switch, ratios, prefill_ratios, decode_ratios = CHANGES[args.change], [], [], []
    workers = [multiprocessing.Process(target=busy_loop, daemon=True) for _ in range(args.load)]
    for worker in workers:
        worker.start()
    for pair in range(args.pairs):
        workload = make_workload(48, (16, 96), (8, 64), vocab_size=engine.model_config.vocab_size,
                                 avoid_token_ids=engine.eos_token_ids, seed=pair)
        result = {}
        for on in ((True, False) if pair % 2 else (False, True)):
            switch(engine, on)
            result[on] = (*run_once(engine, workload), torch.get_num_threads())
        ratios.append(result[True][0] / result[False][0])
        # Time in each kind of step, off / on: > 1 when the change made those steps shorter.
        prefill_ratios.append(result[False][2] / result[True][2])
        decode_ratios.append(result[False][3] / result[True][3])
        print(f"pair {pair + 1} (first {'on' if pair % 2 else 'off'}): on {result[True][0]:.1f} tok/s (step "
              f"{result[True][1]:.0f} ms), off {result[False][0]:.1f} tok/s (step {result[False][1]:.0f} ms), "
              f"on/off {ratios[-1]:.3f}; steps with prompt tokens {result[False][2]:.2f} s off / "
              f"{result[True][2]:.2f} s on = {prefill_ratios[-1]:.3f}, decode-only steps {result[False][3]:.2f} / "
              f"{result[True][3]:.2f} s = {decode_ratios[-1]:.3f}; threads at the end on {result[True][4]}, "
              f"off {result[False][4]}", flush=True)
    for worker in workers:
        worker.terminate()
    print(f"{args.change}: median on/off over {args.pairs} pairs: {statistics.median(ratios):.3f} "
          f"(range {min(ratios):.3f}-{max(ratios):.3f}); time off/on, steps with prompt tokens "
          f"{statistics.median(prefill_ratios):.3f}, decode-only steps {statistics.median(decode_ratios):.3f}")


if __name__ == "__main__":
    main()
