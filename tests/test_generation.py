"""Greedy generation equals transformers' `generate` token for token (tie rule of DESIGN.md §7),
with the KV cache and without it."""

from __future__ import annotations

import pytest
import torch

from exactness import assert_greedy_agree, hf_greedy, hf_next_token_logits
from reference.generate import generate
from reference.models import load_model
from reference.sampling import SamplingParams

MAX_NEW = 64
QUESTIONS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain what a KV cache is in one sentence.",
    "List three prime numbers.",
    "Who wrote Romeo and Juliet?",
    "Translate 'good morning' into Spanish.",
    "What is 12 times 7?",
    "Give me a tip for learning to code.",
    "Name a planet with rings.",
]


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3"])
@pytest.mark.parametrize("use_cache", [True, False], ids=["cache", "no-cache"])
def test_random_model_greedy_matches_transformers(hf_twin_factory, family, use_cache):
    path, hf = hf_twin_factory(family)
    model, _ = load_model(path)
    generator = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 512, (n,), generator=generator).tolist() for n in (1, 3, 8, 13, 21, 34, 5, 55)]
    ours = generate(model, prompts, SamplingParams(temperature=0, max_tokens=MAX_NEW), use_cache=use_cache)
    reference = [hf_greedy(hf, p, MAX_NEW) for p in prompts]
    assert all(len(o) == MAX_NEW for o in ours)
    assert_greedy_agree(prompts, ours, reference, hf_next_token_logits(hf))


@pytest.mark.slow
@pytest.mark.parametrize("use_cache", [True, False], ids=["cache", "no-cache"])
def test_smollm2_greedy_matches_transformers(smollm2, smollm2_hf, use_cache):
    from reference.tokenizer import Tokenizer

    model, model_dir = smollm2
    tokenizer = Tokenizer(model_dir)
    eos = tokenizer.eos_token_ids | set(model.config.eos_token_ids)
    assert len(eos) == 1
    (eos_id,) = eos
    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": q}]) for q in QUESTIONS]
    ours = generate(model, prompts, SamplingParams(temperature=0, max_tokens=MAX_NEW), use_cache=use_cache,
                    eos_token_ids=eos)
    reference = [hf_greedy(smollm2_hf, p, MAX_NEW, eos_token_id=eos_id) for p in prompts]
    assert_greedy_agree(prompts, ours, reference, hf_next_token_logits(smollm2_hf))
    assert "Paris" in tokenizer.decode(ours[0])


def test_stop_token_ids_end_a_sequence_early(checkpoint_factory):
    model, _ = load_model(checkpoint_factory("llama"))
    prompt = [5, 6, 7]
    free_run = generate(model, [prompt], SamplingParams(temperature=0, max_tokens=12))[0]
    stop_at = free_run[4]
    stopped = generate(model, [prompt], SamplingParams(temperature=0, max_tokens=12, stop_token_ids=[stop_at]))[0]
    assert stopped == free_run[: free_run.index(stop_at) + 1]


def test_seeded_sampling_reproduces_and_ignores_batch(checkpoint_factory):
    model, _ = load_model(checkpoint_factory("qwen3"))
    params = SamplingParams(temperature=1.0, max_tokens=16, seed=1234)
    alone = generate(model, [[1, 2, 3]], params)[0]
    again = generate(model, [[1, 2, 3]], params)[0]
    in_batch = generate(model, [[9, 9, 9, 9], [1, 2, 3]], params)[1]
    other_seed = generate(model, [[1, 2, 3]], SamplingParams(temperature=1.0, max_tokens=16, seed=4321))[0]
    assert alone == again == in_batch
    assert alone != other_seed


def test_empty_prompt_raises(checkpoint_factory):
    model, _ = load_model(checkpoint_factory("llama"))
    with pytest.raises(ValueError, match="at least one token"):
        generate(model, [[]], SamplingParams(max_tokens=2))
