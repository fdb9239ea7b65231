"""Warm-up: throwaway requests that make an engine pay its one-off costs before anyone times it.

On a GPU the first step of each kind compiles Triton kernels (and SDPA picks its kernels): without a warm-up the
first `generate` of an H200 run measured 17,100 tok/s against 20,600 for the second. So the engine warms itself
up at start on a GPU (LLMEngine.warm_up_seconds says how long that took), and bench calls the same function.
The requests run every kind of step a workload will: short prompts that go on to decode (greedy, and sampled with
and without a top-k / top-p cut, so the sampler compiles too) beside long prompts that fill the rest of the token
budget (fresh prefill) and one whose next chunk runs over its cached first one, next to decode steps (a mixed
step). Decode steps' CUDA graphs are captured before this, when the runner is built. On the CPU nothing
is compiled, and one tiny request is enough.
"""

from __future__ import annotations

import time

from .sampling import SamplingParams

WARM_UP_PREFIX = "warmup"


def warm_up(engine, every_step_kind: bool | None = None) -> float:
    """Run the warm-up requests to completion on `engine`, an LLMEngine (not imported: the engine imports this
    module); returns the seconds it took. every_step_kind: None = on a GPU.

    The requests' ids start with WARM_UP_PREFIX; what they leave in the prefix cache is harmless (random ids)."""
    start = time.perf_counter()
    if every_step_kind is None:
        every_step_kind = engine.device.type == "cuda"
    config = engine.config
    vocab = engine.model_config.vocab_size
    greedy = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    if every_step_kind:
        shorts = [greedy, SamplingParams(temperature=0.6, max_tokens=4, ignore_eos=True, seed=0),
                  SamplingParams(temperature=0.8, top_k=50, top_p=0.9, max_tokens=4, ignore_eos=True)]
        for i, params in enumerate(shorts):
            engine.add_request(f"{WARM_UP_PREFIX}-short-{i}", [(i + 1) % vocab] * 8, params)
        # Long prompts of 1.5 budgets in all (several when max_model_len is short), so that one is cut at the
        # budget's end and its next chunk runs over the cached part: the paged prefill kernel's step kind.
        budget = config.max_num_batched_tokens
        length = min(config.max_model_len - greedy.max_tokens, budget + budget // 2)
        for i in range(-(-(budget + budget // 2) // length)):
            name = f"{WARM_UP_PREFIX}-long" + (f"-{i}" if i else "")
            engine.add_request(name, [(7 * j + 3 + i) % vocab for j in range(length)], greedy)
    else:
        engine.add_request(WARM_UP_PREFIX, [0] * 8, greedy)
    while engine.has_unfinished_requests():
        engine.step()
    return time.perf_counter() - start
