"""Lab 0.1's generation loop: a fixed batch of prompts, generated together, with or without a KV cache.

With the cache, step 0 (prefill) runs every prompt token once and stores its K/V; each later step (decode)
runs only the newest token of each sequence and reads the rest from the cache. Without the cache, every step
runs the whole sequence again: same tokens, quadratically more work, which is the point of showing it.
Batching here is static: the batch is fixed at the start; the engine (lab 0.2) does continuous batching.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from .attention import AttentionMetadata, build_metadata
from .kv import ContiguousKVCache
from .models import LlamaForCausalLM
from .sampling import SamplingParams, sample, seeded_generator


def _generators(params: SamplingParams, positions: list[int], device) -> list[torch.Generator | None]:
    if params.seed is None or params.temperature == 0:
        return [None] * len(positions)
    return [seeded_generator(params.seed, 0, pos, device) for pos in positions]


def _step_inputs(sequences: list[list[int]], live: list[int], cache: ContiguousKVCache | None, device,
                 decode: bool) -> tuple[list[list[int]], torch.Tensor, AttentionMetadata]:
    """The tokens each live sequence runs this step, with their positions and attention metadata."""
    if cache is None:  # no cache: the whole sequence, every step
        new_tokens = [sequences[i] for i in live]
        return (new_tokens, *build_metadata([len(s) for s in new_tokens], None, None, None, device))
    # With the cache, decode runs only each sequence's newest token; prefill runs every prompt token (and stores
    # its K/V for later steps).
    new_tokens = [sequences[i][-1:] if decode else sequences[i] for i in live]
    positions, metadata = build_metadata([len(s) for s in new_tokens], [len(sequences[i]) for i in live],
                                         [cache.block_table(i) for i in live], cache.block_size, device)
    return new_tokens, positions, metadata


@torch.inference_mode()
def generate_stream(
    model: LlamaForCausalLM,
    prompts: list[list[int]],
    params: SamplingParams,
    *,
    use_cache: bool = True,
    eos_token_ids: set[int] | frozenset[int] = frozenset(),
) -> Iterator[list[int | None]]:
    """Yield, after each step, the new token of every sequence (None once a sequence has finished).

    A sequence finishes at max_tokens, at an EOS token (unless params.ignore_eos) or at a stop token id.
    """
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    stop_ids = set(params.stop_token_ids or ()) | (set() if params.ignore_eos else set(eos_token_ids))
    sequences = [list(p) for p in prompts]
    finished = [False] * len(prompts)
    cache = None
    if use_cache:
        max_len = max(len(p) for p in prompts) + params.max_tokens
        cache = ContiguousKVCache(model.config, len(prompts), max_len, dtype, device)

    for step in range(params.max_tokens):
        live = [i for i, done in enumerate(finished) if not done]
        new_tokens, positions, metadata = _step_inputs(sequences, live, cache, device, decode=step > 0)
        input_ids = torch.tensor([t for s in new_tokens for t in s], dtype=torch.int64, device=device)
        hidden = model(input_ids, positions, metadata, None if cache is None else cache.layers)
        last_rows = metadata.cu_seqlens_q[1:].long() - 1  # each sequence's last token predicts the next
        logits = model.compute_logits(hidden[last_rows])
        next_positions = [len(sequences[i]) for i in live]
        tokens = sample(logits, [params] * len(live), _generators(params, next_positions, device)).tolist()

        out: list[int | None] = [None] * len(prompts)
        for i, token in zip(live, tokens):
            sequences[i].append(token)
            out[i] = token
            if token in stop_ids:
                finished[i] = True
        yield out
        if all(finished):
            return


def generate(model: LlamaForCausalLM, prompts: list[list[int]], params: SamplingParams, **options) -> list[list[int]]:
    """The generated token ids of each prompt (the prompt itself not included); options: generate_stream's."""
    outputs: list[list[int]] = [[] for _ in prompts]
    for step_tokens in generate_stream(model, prompts, params, **options):
        for out, token in zip(outputs, step_tokens):
            if token is not None:
                out.append(token)
    return outputs
