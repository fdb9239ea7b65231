"""Packed vs unpacked projections (models/packing.py) in one engine, one process, on the CPU (issue 21).

    python benchmarks/packed_projections_ab.py [--pairs 4] [--threads N]

Each pair runs issue 21's workload (48 requests, prompts of 16-96 random ids, 8-64 output tokens, ignore EOS,
all at once, greedy, SmolLM2-135M float32, the engine's default sizes) twice on the same engine: once with q/k/v
and gate/up packed, once as separate nn.Linear layers, in alternating order, with the same prompts (prefix
caching off, so the second run does the same work as the first). The ratio is taken within a pair, a minute
apart, so a machine whose speed drifts (other programs) moves both runs of a pair together. Times only.
"""

from __future__ import annotations

import argparse
import statistics


def run_once(engine, workload, packed: bool) -> tuple[float, float]:
    """(output tok/s, median step ms) of one run with packing on or off."""
    from reference.bench import run_engine

    engine.model.pack_projections(packed)
    run = run_engine(engine, workload, use_tqdm=False)
    return run.summary.output_throughput, 1e3 * statistics.median(s.end - s.start for s in run.steps)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=4)
    parser.add_argument("--threads", type=int, default=None, help="cpu_threads (default: the engine's policy)")
    args = parser.parse_args()
    from reference import LLMEngine
    from reference.workload import make_workload

    engine = LLMEngine("smollm2", device="cpu", dtype="float32", enable_prefix_caching=False,
                       cpu_threads=args.threads)
    ratios = []
    for pair in range(args.pairs):
        workload = make_workload(48, (16, 96), (8, 64), vocab_size=engine.model_config.vocab_size,
                                 avoid_token_ids=engine.eos_token_ids, seed=pair)
        order = (True, False) if pair % 2 else (False, True)
        result = {packed: run_once(engine, workload, packed) for packed in order}
        ratios.append(result[True][0] / result[False][0])
        print(f"pair {pair + 1} (first {'packed' if order[0] else 'unpacked'}): packed {result[True][0]:.1f} tok/s "
              f"(step {result[True][1]:.0f} ms), unpacked {result[False][0]:.1f} tok/s (step {result[False][1]:.0f} "
              f"ms), packed/unpacked {ratios[-1]:.3f}", flush=True)
    print(f"median packed/unpacked over {args.pairs} pairs: {statistics.median(ratios):.3f} "
          f"(range {min(ratios):.3f}-{max(ratios):.3f})")


if __name__ == "__main__":
    main()
