"""Async scheduling (plan step N+1 while step N runs) changes when tokens are read, never which tokens come out.

On the CPU every step has finished when launch returns, but the bookkeeping is the GPU's: placeholders for the
tokens of the step in flight, their values read from the device by the next step, outputs one step late, and a
sequence that stops on a token scheduled once more, its extra token dropped. These tests run that code path on
the CPU and compare it with synchronous stepping and with transformers.
"""

from __future__ import annotations

import pytest
import torch

from exactness import assert_greedy_agree, hf_greedy, hf_next_token_logits
from reference import LLM, SamplingParams
from reference.sequence import PENDING_TOKEN

MAX_NEW = 16


@pytest.fixture(scope="module")
def tiny(hf_twin_factory):
    path, hf = hf_twin_factory("qwen2", num_attention_heads=4, num_key_value_heads=2)
    generator = torch.Generator().manual_seed(5)
    system = torch.randint(0, 512, (21,), generator=generator).tolist()  # shared: prefix caching has hits
    prompts = [system + torch.randint(0, 512, (n,), generator=generator).tolist()
               for n in torch.randint(1, 40, (12,), generator=generator).tolist()]
    reference = [hf_greedy(hf, p, MAX_NEW) for p in prompts]
    return path, hf, prompts, reference


def make(path, async_scheduling, **kwargs):
    settings = dict(device="cpu", max_num_seqs=4, max_num_batched_tokens=24, max_model_len=96, block_size=4, num_kv_blocks=40)
    return LLM(str(path), async_scheduling=async_scheduling, **{**settings, **kwargs})


def completions(outputs):
    return [[(c.token_ids, c.finish_reason, c.logprobs) for c in o.outputs] for o in outputs]


def test_greedy_matches_transformers_under_preemption_and_prefix_caching(tiny):
    path, hf, prompts, reference = tiny
    llm = make(path, True)
    ours = [o.outputs[0].token_ids for o in llm.generate(prompts, SamplingParams(temperature=0, max_tokens=MAX_NEW),
                                                         use_tqdm=False)]
    engine = llm.engine
    assert sum(s.num_preempted for s in engine.step_log) > 0, "the workload should force preemption"
    assert engine.kv_manager.prefix_hit_tokens > 0, "the shared prompt should be found in the cache"
    assert_greedy_agree(prompts, ours, reference, hf_next_token_logits(hf))
    assert engine.kv_manager.num_free_blocks == engine.kv_manager.num_blocks


def test_every_sampling_feature_gives_what_synchronous_steps_give(tiny):
    path, _, prompts, reference = tiny
    # Per request: seeded sampling, n > 1 (forks), logprobs with top tokens, a stop token that really occurs
    # (taken from the greedy continuation, so the sequence stops early), one-token outputs.
    params = [
        SamplingParams(temperature=0.9, top_p=0.8, max_tokens=MAX_NEW, seed=1),
        SamplingParams(n=3, temperature=1.0, max_tokens=9, seed=2),
        SamplingParams(temperature=0, max_tokens=MAX_NEW, logprobs=3),
        SamplingParams(temperature=0, max_tokens=MAX_NEW, stop_token_ids=[reference[3][4]]),
        SamplingParams(temperature=0, max_tokens=1),
        SamplingParams(n=2, temperature=0.7, max_tokens=1, seed=3),
    ] * 2
    sync = make(path, False).generate(prompts, params, use_tqdm=False)
    llm = make(path, True)
    overlapped = llm.generate(prompts, params, use_tqdm=False)
    assert completions(overlapped) == completions(sync)
    stopped = overlapped[3].outputs[0]
    assert stopped.finish_reason == "stop" and stopped.token_ids == reference[3][:5]
    assert [len(o.outputs) for o in overlapped[:6]] == [1, 3, 1, 1, 1, 2]
    assert llm.engine.kv_manager.num_free_blocks == llm.engine.kv_manager.num_blocks


def test_outputs_arrive_one_step_late_and_the_extra_token_after_a_stop_is_dropped(tiny):
    path, _, prompts, reference = tiny
    engine = make(path, True, max_num_batched_tokens=96).engine
    stop_at = reference[0][2]  # the third greedy token
    engine.add_request("r", prompts[0], SamplingParams(temperature=0, max_tokens=MAX_NEW, stop_token_ids=[stop_at]))
    seq = engine.requests["r"].samples[0].seq
    assert engine.step() == [], "step 1 launches the prefill; its token is read during step 2"
    assert seq.token_ids[-1] == PENDING_TOKEN and seq.num_pending_tokens == 1
    assert engine.step()[0].outputs[0].token_ids == reference[0][:1]
    assert seq.num_pending_tokens == 1, "the token of step 2 is in flight"
    out = engine.step()
    assert out[0].outputs[0].token_ids == reference[0][:2] and not out[0].finished
    # Step 4 reads the stop token, and the sequence was already scheduled in step 4: that token is dropped.
    assert seq.num_pending_tokens == 1
    final = engine.step()[0]
    assert final.finished and final.outputs[0].finish_reason == "stop"
    assert final.outputs[0].token_ids == reference[0][:3]
    assert seq.token_ids == prompts[0] + reference[0][:3] and seq.num_pending_tokens == 0
    assert not engine.has_unfinished_requests()
    assert engine.kv_manager.num_free_blocks == engine.kv_manager.num_blocks


def test_abort_with_a_step_in_flight_loses_nothing_else(tiny):
    path, hf, prompts, reference = tiny
    engine = make(path, True, num_kv_blocks=80).engine
    for i in range(4):
        engine.add_request(f"r{i}", prompts[i], SamplingParams(temperature=0, max_tokens=MAX_NEW))
    for _ in range(8):
        engine.step()
    victim = engine.requests["r1"].samples[0].seq
    assert victim.num_pending_tokens == 1, "r1 should have a token in flight when it is aborted"
    engine.abort("r1")
    finals = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                finals[out.request_id] = out
    aborted = finals["r1"].outputs[0]
    assert aborted.finish_reason == "abort" and PENDING_TOKEN not in aborted.token_ids
    assert aborted.token_ids == reference[1][: len(aborted.token_ids)]
    for i in (0, 2, 3):
        assert_greedy_agree([prompts[i]], [finals[f"r{i}"].outputs[0].token_ids], [reference[i]],
                            hf_next_token_logits(hf))
    assert engine.kv_manager.num_free_blocks == engine.kv_manager.num_blocks


def test_streamed_outputs_say_finished_only_once_the_last_token_has_arrived(tiny):
    """A length limit is known when the last token is launched, a step before its value arrives: until then
    the sample must not look finished to a streaming caller (the server stops listening at a finish_reason)."""
    path, _, prompts, reference = tiny
    engine = make(path, True).engine
    for i in range(3):
        engine.add_request(f"r{i}", prompts[i], SamplingParams(temperature=0, max_tokens=5 + i))
    seen = {f"r{i}": [] for i in range(3)}
    while engine.has_unfinished_requests():
        for out in engine.step():
            seen[out.request_id].append(out)
    for i in range(3):
        updates = seen[f"r{i}"]
        assert [len(u.outputs[0].token_ids) for u in updates] == list(range(1, 6 + i))
        assert [u.outputs[0].finish_reason for u in updates] == [None] * (4 + i) + ["length"]
        assert [u.finished for u in updates] == [False] * (4 + i) + [True]
        assert updates[-1].outputs[0].token_ids == reference[i][: 5 + i]
