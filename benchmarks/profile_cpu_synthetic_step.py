"""One synthetic CPU step, timed and profiled op by op: where a decode or mixed step's time goes (issue 21).

    python benchmarks/profile_cpu_synthetic_step.py [decode45 mixed128 decode8]

Builds the engine with default settings (SmolLM2 float32) and runs runner.forward on hand-made step inputs, so
every repeat is the same step: decode45 (45 sequences decoding, contexts 40-160), decode8 (8 of them) and mixed128
(30 of them plus two prompt chunks of 40 and 58 tokens). Block tables point at consecutive cache blocks; what the
cache holds does not matter for time. Prints the unprofiled median wall time of 5 runs, then torch.profiler's
top-level ops over 3 more (ms a step, calls a step). Times only.
"""

from __future__ import annotations

import random
import statistics
import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile

from reference import LLMEngine
from reference.model_runner import StepInputs


def step_inputs(engine, query_lens: list[int], context_lens: list[int], rng: random.Random) -> StepInputs:
    block_size, tables, next_block = engine.kv_manager.block_size, [], 0
    for context in context_lens:
        blocks = -(-context // block_size)
        tables.append(list(range(next_block, next_block + blocks)))
        next_block += blocks
    assert next_block <= engine.kv_manager.num_blocks
    token_ids = [rng.randrange(1000, 40000) for _ in range(sum(query_lens))]
    return StepInputs(token_ids, query_lens, context_lens, tables, list(range(len(query_lens))))


def steps(engine) -> dict[str, StepInputs]:
    rng = random.Random(0)
    contexts = [rng.randint(40, 160) for _ in range(45)]
    return {"decode45": step_inputs(engine, [1] * 45, contexts, rng),
            "mixed128": step_inputs(engine, [1] * 30 + [40, 58], contexts[:30] + [40, 90], rng),
            "decode8": step_inputs(engine, [1] * 8, contexts[:8], rng)}


def main() -> None:
    engine = LLMEngine("smollm2", device="cpu", dtype="float32", enable_prefix_caching=False)
    made = steps(engine)
    for name in sys.argv[1:] or list(made):
        inputs = made[name]
        for _ in range(3):
            engine.runner.forward(inputs)
        walls = []
        for _ in range(5):
            start = time.perf_counter()
            engine.runner.forward(inputs)
            walls.append(time.perf_counter() - start)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(3):
                engine.runner.forward(inputs)
        top = [e for e in prof.events() if e.cpu_parent is None and e.name.split("::")[0] in ("aten", "mkl")]
        print(f"{name}: {1e3 * statistics.median(walls):.1f} ms a step unprofiled, "
              f"{sum(e.cpu_time_total for e in top) / 3e3:.1f} ms in {len(top) // 3} top-level ops (profiled)")
        per_op: dict[str, list] = {}
        for event in top:
            entry = per_op.setdefault(event.name, [0, 0.0])
            entry[0] += 1
            entry[1] += event.cpu_time_total / 3e3
        for op, (calls, ms) in sorted(per_op.items(), key=lambda item: -item[1][1])[:12]:
            print(f"   {op:45s} {calls // 3:5d} calls {ms:8.2f} ms")


if __name__ == "__main__":
    main()
