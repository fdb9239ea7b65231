"""The two model runners give the same tokens: the plain, synchronous, eager ModelRunner (the one to read) and
the FastModelRunner (async scheduling, CUDA graphs on a GPU), and both equal transformers' greedy generate.
On the CPU the engine uses the plain runner unless async scheduling is asked for."""

from __future__ import annotations

import pytest
import torch

from exactness import assert_greedy_agree, hf_greedy, hf_next_token_logits
from reference import LLM, SamplingParams
from reference.fast_runner import FastModelRunner
from reference.model_runner import ModelRunner

MAX_NEW = 12


@pytest.fixture(scope="module")
def tiny(hf_twin_factory):
    path, hf = hf_twin_factory("llama", num_attention_heads=4, num_key_value_heads=2)
    generator = torch.Generator().manual_seed(11)
    shared = torch.randint(0, 512, (9,), generator=generator).tolist()  # prefix caching finds it
    prompts = [shared + torch.randint(0, 512, (n,), generator=generator).tolist()
               for n in torch.randint(1, 30, (10,), generator=generator).tolist()]
    return path, hf, prompts, [hf_greedy(hf, p, MAX_NEW) for p in prompts]


def engine_run(path, prompts, params, **kwargs):
    # A small budget and KV pool: prompts are chunked and sequences preempted.
    llm = LLM(str(path), device="cpu", max_num_seqs=4, max_num_batched_tokens=16, max_model_len=64, block_size=4,
              num_kv_blocks=24, **kwargs)
    outputs = llm.generate(prompts, params, use_tqdm=False)
    return llm.engine, [[(c.token_ids, c.logprobs, c.finish_reason) for c in o.outputs] for o in outputs]


def test_cpu_engine_uses_the_plain_runner_unless_async_scheduling_is_asked_for(tiny):
    path = tiny[0]
    assert type(LLM(str(path), device="cpu", num_kv_blocks=64).engine.runner) is ModelRunner
    assert type(LLM(str(path), device="cpu", num_kv_blocks=64, async_scheduling=True).engine.runner) is FastModelRunner


def test_plain_and_fast_runners_give_the_same_tokens_and_both_equal_transformers(tiny):
    path, hf, prompts, reference = tiny
    params = SamplingParams(temperature=0, max_tokens=MAX_NEW, logprobs=2)
    plain_engine, plain = engine_run(path, prompts, params)
    fast_engine, fast = engine_run(path, prompts, params, async_scheduling=True)
    assert type(plain_engine.runner) is ModelRunner and type(fast_engine.runner) is FastModelRunner
    assert sum(s.num_preempted for s in plain_engine.step_log) > 0, "the workload should force preemption"
    assert plain == fast
    assert_greedy_agree(prompts, [out[0][0] for out in plain], reference, hf_next_token_logits(hf))


def test_plain_and_fast_runners_sample_the_same_seeded_tokens(tiny):
    path, _, prompts, _ = tiny
    params = [SamplingParams(n=2, temperature=0.8, top_k=40, max_tokens=MAX_NEW, seed=i) for i in range(len(prompts))]
    assert engine_run(path, prompts, params)[1] == engine_run(path, prompts, params, async_scheduling=True)[1]
