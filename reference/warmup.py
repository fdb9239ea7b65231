"""Warm-up: throwaway requests that make an engine pay its one-off costs before anyone times it.

On a GPU the first step of each kind compiles Triton kernels (and SDPA picks its kernels): without a warm-up the
first `generate` of an H200 run measured 17,100 tok/s against 20,600 for the second. So the engine warms itself
up at start on a GPU (LLMEngine.warm_up_seconds says how long that took), and bench calls the same function.
The requests run every kind of step a workload will: short prompts that go on to decode (greedy, and sampled with
and without a top-k / top-p cut, so the sampler compiles too) beside long prompts that fill the rest of the token
budget (fresh prefill) and one whose next chunk runs over its cached first one, next to decode steps (a mixed
step). Decode steps' CUDA graphs are captured before this, when the runner is built. On the CPU nothing
is compiled, and one tiny request is enough.

Kind of step is not all: Triton compiles a kernel again for each class of its integer arguments (an int that is 1,
one divisible by 16, any other), and a variant first met inside a timed `generate` costs it up to a second. The
arguments that change from step to step, read from the launches (benchmarks/triton_compiles.py lists what a
workload still compiles after the warm-up):
- the paged prefill kernel's block-table row stride, the blocks of the longest sequence in a prefill or mixed
  step: the mixed steps of `_warm_up_block_table_widths` make it 1, 3 and 16 blocks, one step each;
- token counts: RoPE and the sampler do not specialise on them (do_not_specialize), SiLU-and-multiply's element
  count is a multiple of 16 (the intermediate sizes of the models we run are), and decode batches run in CUDA graphs,
  captured for every batch size at start. Everything else (head counts, strides of the hidden states, the
  vocabulary, the cache's block size) is fixed for a model.
Each width class costs one compilation of the paged prefill kernel on a cold Triton cache (none once cached), the
price of a first `generate` as fast as the second; benchmarks/triton_compiles.py prints the warm-up's seconds.

Pinned host memory is the third one-off cost. Every step stages its inputs in pinned memory (so that their copies
to the GPU do not wait, see fast_runner._upload), through torch's pinned-memory cache: blocks of power-of-two
sizes, each created once with cudaHostAlloc and then reused. A page-locked allocation is slow, and the CUDA
programming guide lists it among the operations that synchronise the device implicitly ("Implicit
Synchronization"), so a block size first met inside a timed call (a step's block tables grow with its contexts)
can cost the host its lead over the GPU (benchmarks/first_call.py counts such blocks). grow_pinned_pool creates, at start, PINNED_POOL_DEPTH blocks of every
size class a step can ask for.
"""

from __future__ import annotations

import time

import torch

from .sampling import SamplingParams

WARM_UP_PREFIX = "warmup"
GREEDY = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
PINNED_POOL_DEPTH = 12  # blocks a size class: up to 4 uploads of one class a step (ids, positions, slots, pending
# rows), times the steps whose copies may not have run yet, with room to spare


def largest_pinned_block(config) -> int:
    """Bytes of the largest host buffer a step stages: int64 per token (ids, positions, slots), int32 block tables
    (a row of blocks per sequence, at the longest context), or 64 bytes per sequence (the decode graph's inputs
    and the sampler's per-row inputs)."""
    widest_table = -(-config.max_model_len // config.block_size)
    return max(8 * config.max_num_batched_tokens, 4 * config.max_num_seqs * widest_table, 64 * config.max_num_seqs)


def grow_pinned_pool(largest: int, depth: int | None = None) -> int:
    """Create `depth` pinned blocks of every power-of-two size from 1 byte (a batch of one stages 4- and 8-byte
    buffers) to the one holding `largest` bytes in torch's pinned-memory cache, all at once, and hand them back to
    it; returns the bytes it now holds for them. Does nothing without CUDA. depth None: PINNED_POOL_DEPTH."""
    depth = PINNED_POOL_DEPTH if depth is None else depth
    if not torch.cuda.is_available() or depth <= 0:
        return 0
    size, total = 1, 0
    while size < 2 * largest:
        blocks = [torch.empty(size, dtype=torch.uint8, pin_memory=True) for _ in range(depth)]
        total += size * len(blocks)
        del blocks
        size *= 2
    return total


def warm_up(engine, every_step_kind: bool | None = None) -> float:
    """Run the warm-up requests to completion on `engine`, an LLMEngine (not imported: the engine imports this
    module); returns the seconds it took. every_step_kind: None = on a GPU.

    The requests' ids start with WARM_UP_PREFIX; what they leave in the prefix cache is harmless (random ids)."""
    start = time.perf_counter()
    if every_step_kind is None:
        every_step_kind = engine.device.type == "cuda"
    if every_step_kind:
        grow_pinned_pool(largest_pinned_block(engine.config))
        _warm_up_step_kinds(engine)
        _warm_up_block_table_widths(engine)
    else:
        engine.add_request(WARM_UP_PREFIX, [0] * 8, GREEDY)
        _finish(engine)
    return time.perf_counter() - start


def _warm_up_step_kinds(engine) -> None:
    """Decode (greedy and sampled), a full-budget fresh prefill, a chunk over cached context, a mixed step."""
    config, vocab = engine.config, engine.model_config.vocab_size
    shorts = [GREEDY, SamplingParams(temperature=0.6, max_tokens=4, ignore_eos=True, seed=0),
              SamplingParams(temperature=0.8, top_k=50, top_p=0.9, max_tokens=4, ignore_eos=True)]
    for i, params in enumerate(shorts):
        engine.add_request(f"{WARM_UP_PREFIX}-short-{i}", [(i + 1) % vocab] * 8, params)
    # Long prompts of 1.5 budgets in all (several when max_model_len is short), so that one is cut at the
    # budget's end and its next chunk runs over the cached part: the paged prefill kernel's step kind.
    budget = config.max_num_batched_tokens
    length = min(config.max_model_len - GREEDY.max_tokens, budget + budget // 2)
    for i in range(-(-(budget + budget // 2) // length)):
        name = f"{WARM_UP_PREFIX}-long" + (f"-{i}" if i else "")
        engine.add_request(name, [(7 * j + 3 + i) % vocab for j in range(length)], GREEDY)
    _finish(engine)


def _warm_up_block_table_widths(engine) -> None:
    """Mixed steps (a decoding sequence beside a new prompt: the paged prefill kernel) whose block tables are 1
    block wide, 3 (neither 1 nor a multiple of 16) and 16: one compiled variant each of that kernel's row stride.
    A step schedules the requests added before it, so each prompt joins the anchor's decode in its own step."""
    config, vocab = engine.config, engine.model_config.vocab_size
    block = config.block_size
    # The anchor's context stays within one block while the three prompts join (3 tokens + one per step).
    anchor = SamplingParams(temperature=0, max_tokens=5, ignore_eos=True)
    engine.add_request(f"{WARM_UP_PREFIX}-anchor", [5 % vocab, 6 % vocab], anchor)
    engine.step()
    one_token = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)
    for blocks, length in ((1, 2), (3, 2 * block + 1), (16, 16 * block)):
        if length + one_token.max_tokens > config.max_model_len or length > config.max_num_batched_tokens:
            continue  # a short max_model_len: the long prompts above reach this width class, or none does
        engine.add_request(f"{WARM_UP_PREFIX}-width-{blocks}", [(11 * j + blocks) % vocab for j in range(length)],
                           one_token)
        engine.step()
    _finish(engine)


def _finish(engine) -> None:
    while engine.has_unfinished_requests():
        engine.step()
