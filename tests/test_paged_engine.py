"""The paged KV cache end to end: same tokens as the contiguous cache and as transformers, under preemption,
prefix caching (even with colliding hashes), and copy-on-write for parallel sampling.
Engines here run on the CPU even where a GPU is present: they are held to float32 transformers on the CPU
at float32's tolerance (tests/test_gpu.py is the GPU's version)."""

from __future__ import annotations

import pytest
import torch

from exactness import assert_greedy_agree, hf_greedy, hf_next_token_logits
from reference import LLM, SamplingParams
from reference.kv import prefix_cache

MAX_NEW = 20


@pytest.fixture(scope="module")
def tiny(hf_twin_factory):
    path, hf = hf_twin_factory("llama", num_attention_heads=4, num_key_value_heads=1)
    generator = torch.Generator().manual_seed(3)
    system = torch.randint(0, 512, (37,), generator=generator).tolist()  # a shared "system prompt"
    prompts = [system + torch.randint(0, 512, (n,), generator=generator).tolist()
               for n in torch.randint(1, 30, (24,), generator=generator).tolist()]
    reference = [hf_greedy(hf, p, MAX_NEW) for p in prompts]
    return path, hf, prompts, reference


def greedy(**kwargs) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=MAX_NEW, **kwargs)


def run(llm, prompts, params):
    return [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]


def test_preemption_under_memory_pressure_loses_nothing(tiny):
    path, hf, prompts, reference = tiny
    # 24 blocks of 4 slots = 96 tokens for 8 running sequences of up to ~86 tokens each: they cannot all fit.
    llm = LLM(str(path), device="cpu", max_num_seqs=8, max_num_batched_tokens=64, max_model_len=96, block_size=4,
              num_kv_blocks=24, enable_prefix_caching=False)
    ours = run(llm, prompts, greedy())
    assert sum(s.num_preempted for s in llm.engine.step_log) > 0, "the workload should have forced preemption"
    assert_greedy_agree(prompts, ours, reference, hf_next_token_logits(hf))
    assert llm.engine.kv_manager.num_free_blocks == 24


@pytest.mark.parametrize("policy", ["fcfs", "priority"])
def test_prefix_caching_reuses_the_shared_prompt_and_changes_no_token(tiny, policy):
    path, hf, prompts, reference = tiny
    llm = LLM(str(path), device="cpu", max_num_seqs=4, max_num_batched_tokens=32, max_model_len=128, block_size=8,
              num_kv_blocks=128, scheduling_policy=policy)
    ours = run(llm, prompts, greedy())
    assert_greedy_agree(prompts, ours, reference, hf_next_token_logits(hf))
    kv = llm.engine.kv_manager
    # All but the first batch of prompts find the system prompt's 4 full blocks (32 of its 37 tokens) cached.
    assert kv.prefix_hit_tokens >= 32 * (len(prompts) - 4)
    assert 0 < kv.prefix_hit_rate < 1


def test_hash_collisions_cannot_corrupt_output(tiny, monkeypatch):
    path, hf, prompts, reference = tiny
    monkeypatch.setattr(prefix_cache, "chain_hash", lambda previous, tokens: 0)  # every block collides
    llm = LLM(str(path), device="cpu", max_num_seqs=4, max_num_batched_tokens=32, max_model_len=128, block_size=8,
              num_kv_blocks=128)
    assert_greedy_agree(prompts, run(llm, prompts, greedy()), reference, hf_next_token_logits(hf))


def test_paged_and_contiguous_give_the_same_tokens(tiny):
    path, _, prompts, _ = tiny
    sampled = SamplingParams(temperature=0.8, top_k=50, max_tokens=MAX_NEW, seed=11)
    paged = LLM(str(path), device="cpu", max_num_seqs=4, max_num_batched_tokens=24, max_model_len=128, block_size=16)
    contiguous = LLM(str(path), device="cpu", max_num_seqs=4, max_num_batched_tokens=24, max_model_len=128, kv_cache="contiguous")
    assert run(paged, prompts, sampled) == run(contiguous, prompts, sampled)


# Samples share the KV of all prompt tokens but the last: 34 tokens end mid-block (copy-on-write), 32 end on a
# block boundary (nothing shared is written), and a 1-token prompt shares nothing.
@pytest.mark.parametrize("prompt_len", [35, 33, 1])
def test_parallel_samples_fork_with_copy_on_write(tiny, prompt_len):
    path, _, prompts, _ = tiny
    prompt = prompts[0][:prompt_len]
    params = SamplingParams(n=3, temperature=1.0, max_tokens=12, seed=21)
    paged = LLM(str(path), device="cpu", max_num_seqs=4, max_model_len=128, block_size=8, num_kv_blocks=64)
    forked = paged.generate([prompt], params, use_tqdm=False)[0]
    # Without forking each sample would prefill the prompt itself; the seeds make the samples comparable.
    contiguous = LLM(str(path), device="cpu", max_num_seqs=4, max_model_len=128, kv_cache="contiguous")
    copied = contiguous.generate([prompt], params, use_tqdm=False)[0]
    assert [c.token_ids for c in forked.outputs] == [c.token_ids for c in copied.outputs]
    assert len({tuple(c.token_ids) for c in forked.outputs}) == 3
    assert paged.engine.kv_manager.num_free_blocks == 64
    # Three owners of a shared partial block: the first two to write copy it, the last writes in place.
    assert paged.engine.kv_manager.num_cow_copies == (2 if (prompt_len - 1) % 8 else 0)


def test_forked_samples_hold_the_prompt_blocks_once(tiny):
    path, _, prompts, _ = tiny
    prompt = prompts[0][:35]  # 4 full blocks of 8, then 3 tokens
    llm = LLM(str(path), device="cpu", max_num_seqs=4, max_model_len=128, block_size=8, num_kv_blocks=64)
    engine = llm.engine
    engine.add_request("r", prompt, SamplingParams(n=3, temperature=1.0, max_tokens=8, seed=1))
    engine.step()  # prefill; the other two samples are forked from sample 0
    engine.step()  # every sample writes its first new token (copy-on-write of the partial block)
    tables = [engine.kv_manager.block_table(s.seq) for s in engine.requests["r"].samples]
    full = [t[:4] for t in tables]
    assert full[0] == full[1] == full[2], "the 4 full prompt blocks are shared"
    assert len({t[4] for t in tables}) == 3, "each sample has its own copy of the partial block"
    assert engine.kv_manager.num_blocks - engine.kv_manager.num_free_blocks == 4 + 3  # not 3 x 5


def test_too_small_cache_is_a_clear_error(tiny):
    path, _, _, _ = tiny
    with pytest.raises(ValueError, match="fewer than max_model_len"):
        LLM(str(path), device="cpu", max_model_len=128, block_size=8, num_kv_blocks=4)


@pytest.mark.skipif(torch.cuda.is_available(), reason="Triton's interpreter is chosen only where there is no GPU; "
                    "tests/test_gpu.py runs the Triton backend on the GPU")
def test_triton_backend_gives_the_same_tokens_in_the_interpreter(tiny):
    pytest.importorskip("triton")
    path, hf, prompts, reference = tiny
    short = SamplingParams(temperature=0, max_tokens=6)
    llm = LLM(str(path), device="cpu", max_num_seqs=3, max_num_batched_tokens=24, max_model_len=96, block_size=8,
              num_kv_blocks=64, attention_backend="triton")
    assert llm.engine.runner.attention_backend.name == "triton"
    ours = run(llm, prompts[:4], short)
    assert_greedy_agree(prompts[:4], ours, [r[:6] for r in reference[:4]], hf_next_token_logits(hf))


def test_backend_choice_is_reported_and_checked(monkeypatch):
    from reference import attention
    from reference.attention import resolve_backend_name

    assert resolve_backend_name("auto", torch.device("cpu")) == "padded"  # the batched CPU path (attention/padded.py)
    monkeypatch.setattr(attention, "triton_available", lambda: True)
    assert resolve_backend_name("auto", torch.device("cuda")) == "flash"
    monkeypatch.setattr(attention, "triton_available", lambda: False)
    assert resolve_backend_name("auto", torch.device("cuda")) == "torch"
    with pytest.raises(ValueError, match="needs the triton package"):
        resolve_backend_name("triton", torch.device("cuda"))
    monkeypatch.undo()
    with pytest.raises(ValueError, match="needs a CUDA GPU"):
        resolve_backend_name("flash", torch.device("cpu"))
    with pytest.raises(ValueError, match="unknown"):
        resolve_backend_name("xformers", torch.device("cpu"))
