"""The continuous-batching engine generates exactly what each prompt would generate alone.

Reference: transformers' greedy `generate`, one prompt at a time (tie rule of DESIGN.md §7), under chunked
prefill, every scheduling policy, and requests that arrive while others run.
Engines here run on the CPU even where a GPU is present: they are held to float32 transformers on the CPU
at float32's tolerance (tests/test_gpu.py is the GPU's version).
"""

from __future__ import annotations

import pytest
import torch

from exactness import assert_greedy_agree, hf_greedy, hf_next_token_logits
from reference import LLM, SamplingParams
from reference.engine import best_completions
from reference.outputs import CompletionOutput

NUM_PROMPTS = 24
MAX_NEW = 24


@pytest.fixture(scope="module")
def tiny(hf_twin_factory):
    """(checkpoint dir, transformers twin, 24 mixed-length prompts, their HF greedy continuations)."""
    path, hf = hf_twin_factory("qwen3", num_attention_heads=6, num_key_value_heads=2, head_dim=24)
    generator = torch.Generator().manual_seed(7)
    lengths = torch.randint(9, 70, (NUM_PROMPTS,), generator=generator).tolist()
    prompts = [torch.randint(0, 512, (n,), generator=generator).tolist() for n in lengths]
    reference = [hf_greedy(hf, p, MAX_NEW) for p in prompts]
    return path, hf, prompts, reference


def greedy(max_tokens=MAX_NEW, **kwargs) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=max_tokens, **kwargs)


def token_ids(outputs) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in outputs]


@pytest.mark.parametrize("policy, kv_cache", [("fcfs", "paged"), ("sjf", "paged"), ("priority", "paged"),
                                              ("fcfs", "contiguous"), ("priority", "contiguous")])
def test_chunked_batch_matches_each_prompt_alone(tiny, policy, kv_cache):
    path, hf, prompts, reference = tiny
    # A budget of 8 tokens is below every prompt's length (>= 9), so every prompt is chunked.
    llm = LLM(str(path), device="cpu", max_num_seqs=6, max_num_batched_tokens=8, max_model_len=128, scheduling_policy=policy,
              kv_cache=kv_cache, block_size=4)
    priority = [i % 3 for i in range(len(prompts))]
    outputs = llm.generate(prompts, greedy(), use_tqdm=False, priority=priority)
    assert [o.request_id for o in outputs] == sorted((o.request_id for o in outputs), key=lambda r: int(r.split("-")[1]))
    assert_greedy_agree(prompts, token_ids(outputs), reference, hf_next_token_logits(hf))
    steps = llm.engine.step_log
    assert max(s.num_prefill_tokens + s.num_decode_tokens for s in steps) <= 8
    assert any(s.num_prefill_tokens and s.num_decode_tokens for s in steps), "prefill chunks never mixed with decodes"


def test_turning_the_step_log_off_keeps_no_records_and_changes_no_token(tiny):
    path, _, prompts, _ = tiny
    runs = {}
    for log_steps in (True, False):
        llm = LLM(str(path), device="cpu", max_num_seqs=4, max_num_batched_tokens=32, max_model_len=128,
                  log_steps=log_steps)
        runs[log_steps] = token_ids(llm.generate(prompts[:6], greedy(max_tokens=6), use_tqdm=False))
        assert bool(llm.engine.step_log) == log_steps
    assert runs[True] == runs[False]


def test_requests_added_while_others_run(tiny):
    path, hf, prompts, reference = tiny
    llm = LLM(str(path), device="cpu", max_num_seqs=8, max_num_batched_tokens=32, max_model_len=128)
    engine = llm.engine
    finished = {}
    pending = list(enumerate(prompts))
    while pending or engine.has_unfinished_requests():
        for _ in range(3):  # three new requests every other step
            if pending:
                i, prompt = pending.pop(0)
                engine.add_request(f"r{i}", prompt, greedy())
        for out in engine.step() + engine.step():
            if out.finished:
                finished[out.request_id] = out.outputs[0].token_ids
    ours = [finished[f"r{i}"] for i in range(len(prompts))]
    assert_greedy_agree(prompts, ours, reference, hf_next_token_logits(hf))


def test_unchunked_prefill_gives_the_same_tokens(tiny):
    path, hf, prompts, reference = tiny
    llm = LLM(str(path), device="cpu", max_num_seqs=4, max_num_batched_tokens=128, max_model_len=128, enable_chunked_prefill=False)
    outputs = llm.generate(prompts[:8], greedy(), use_tqdm=False)
    assert_greedy_agree(prompts[:8], token_ids(outputs), reference[:8], hf_next_token_logits(hf))


def test_seeded_request_is_independent_of_the_batch(tiny):
    path, _, prompts, _ = tiny
    params = SamplingParams(temperature=1.0, top_p=0.9, max_tokens=20, seed=99)
    alone = LLM(str(path), device="cpu", max_model_len=128).generate([prompts[0]], params, use_tqdm=False)[0]
    busy = LLM(str(path), device="cpu", max_num_seqs=5, max_num_batched_tokens=7, max_model_len=128)
    others = [SamplingParams(temperature=1.0, max_tokens=15)] * 9
    outputs = busy.generate(prompts[1:10] + [prompts[0]], others + [params], use_tqdm=False)
    assert outputs[-1].outputs[0].token_ids == alone.outputs[0].token_ids
    different_seed = SamplingParams(temperature=1.0, top_p=0.9, max_tokens=20, seed=100)
    assert busy.generate([prompts[0]], different_seed, use_tqdm=False)[0].outputs[0].token_ids != alone.outputs[0].token_ids


def test_n_samples_are_distinct_and_reproducible(tiny):
    path, _, prompts, _ = tiny
    llm = LLM(str(path), device="cpu", max_model_len=128)
    params = SamplingParams(n=3, temperature=1.0, max_tokens=12, seed=5)
    first = llm.generate([prompts[0]], params, use_tqdm=False)[0]
    again = llm.generate([prompts[0]], params, use_tqdm=False)[0]
    samples = [c.token_ids for c in first.outputs]
    assert [c.index for c in first.outputs] == [0, 1, 2]
    assert samples == [c.token_ids for c in again.outputs]
    assert len({tuple(s) for s in samples}) == 3


def test_best_of_returns_the_n_samples_with_the_highest_cumulative_logprob(tiny):
    path, hf, prompts, _ = tiny
    llm = LLM(str(path), device="cpu", max_model_len=128)
    # Temperature 1.5: ranking by the sampled (scaled) distribution instead of the model's would change the sums.
    # Seed 3's four samples rank 3, 1, 2, 0: neither the first two nor the worst two.
    common = dict(temperature=1.5, max_tokens=12, seed=3)
    four = llm.generate([prompts[0]], SamplingParams(n=4, logprobs=0, **common), use_tqdm=False)[0].outputs
    sums = [sum(logprob for logprob, _ in c.logprobs) for c in four]
    for c, total in zip(four, sums):
        assert c.cumulative_logprob == pytest.approx(total, abs=1e-4)
    ranking = sorted(range(4), key=lambda i: -sums[i])
    assert ranking[:2] == [3, 1], "the seed no longer tells a right ranking from a wrong one"

    best = llm.generate([prompts[0]], SamplingParams(n=2, best_of=4, **common), use_tqdm=False)[0]
    assert [c.index for c in best.outputs] == [3, 1]
    for c in best.outputs:  # each sample is exactly what it was when all four were returned
        assert c.token_ids == four[c.index].token_ids and c.text == four[c.index].text
        assert c.finish_reason == four[c.index].finish_reason
        assert c.cumulative_logprob == pytest.approx(sums[c.index], abs=1e-4)
        assert c.logprobs is None, "logprobs were computed for ranking, not asked for"
    assert best.metrics.num_output_tokens == sum(len(c.token_ids) for c in four), "every sample's tokens count"
    winner = best.outputs[0].token_ids
    with torch.no_grad():  # ranked by the model's own distribution (before temperature), teacher-forced
        logits = hf(torch.tensor([prompts[0] + winner])).logits[0].float()
    model_logprobs = torch.log_softmax(logits, dim=-1)[len(prompts[0]) - 1 : -1]
    model_sum = model_logprobs.gather(-1, torch.tensor(winner)[:, None]).sum().item()
    assert best.outputs[0].cumulative_logprob == pytest.approx(model_sum, abs=1e-3)
    assert llm.engine.kv_manager.num_free_blocks == llm.engine.kv_manager.num_blocks

    streamed = list(llm.stream(prompts[0], SamplingParams(n=2, best_of=4, **common)))
    assert all(len(out.outputs) == 2 for out in streamed), "while it runs: the best two so far"
    assert [(c.index, c.token_ids) for c in streamed[-1].outputs] == [(c.index, c.token_ids) for c in best.outputs]

    greedy_best = llm.generate([prompts[0]], greedy(6, n=2, best_of=4), use_tqdm=False)[0]
    greedy_two = llm.generate([prompts[0]], greedy(6, n=2), use_tqdm=False)[0]
    assert [(c.index, c.token_ids) for c in greedy_best.outputs] == [(c.index, c.token_ids) for c in greedy_two.outputs]
    assert greedy_best.metrics.num_output_tokens == 12, "greedy runs n samples: the other two would repeat them"


def test_best_completions_are_the_highest_cumulative_logprobs_lower_index_first_on_ties():
    cumulative = [-5.0, -2.0, -7.0, -2.0, -1.0]
    completions = [CompletionOutput(i, "", [i], "length", cumulative_logprob=c) for i, c in enumerate(cumulative)]
    assert [c.index for c in best_completions(completions, 3)] == [4, 1, 3]
    assert [c.index for c in best_completions(completions, 1)] == [4]


def test_best_of_seats_and_abort_free_every_sample(tiny):
    path, _, prompts, _ = tiny
    small = LLM(str(path), device="cpu", max_num_seqs=3, max_model_len=128)
    with pytest.raises(ValueError, match="best_of=4 samples need 4 sequence seats but max_num_seqs is 3"):
        small.generate([prompts[0]], SamplingParams(n=1, best_of=4), use_tqdm=False)
    assert not small.engine.requests
    engine = small.engine
    engine.add_request("r", prompts[0], SamplingParams(n=1, best_of=3, temperature=1.0, max_tokens=40, seed=1))
    while not all(s.seq.num_output_tokens >= 3 for s in engine.requests["r"].samples):
        engine.step()
    kv = engine.kv_manager
    assert kv.num_free_blocks < kv.num_blocks and len(engine.scheduler.running) == 3
    engine.abort("r")
    assert kv.num_free_blocks == kv.num_blocks, "the blocks of all three samples are back"
    final = engine.step()[0]
    assert final.finished and len(final.outputs) == 1 and final.outputs[0].finish_reason == "abort"


@pytest.mark.parametrize("kv_cache", ["paged", "contiguous"])
def test_abort_frees_memory_and_leaves_others_untouched(tiny, kv_cache):
    path, hf, prompts, reference = tiny
    llm = LLM(str(path), device="cpu", max_num_seqs=4, max_num_batched_tokens=16, max_model_len=128, kv_cache=kv_cache)
    engine = llm.engine
    for i in range(4):
        engine.add_request(f"r{i}", prompts[i], greedy())
    for _ in range(12):
        engine.step()
    free_before = engine.kv_manager.num_free_blocks
    held = len(engine.kv_manager.block_table(engine.requests["r1"].samples[0].seq))
    engine.abort("r1")
    assert held > 0 and engine.kv_manager.num_free_blocks == free_before + held, "aborted blocks must be freed at once"
    finals = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                finals[out.request_id] = out
    assert finals["r1"].outputs[0].finish_reason == "abort"
    assert 0 < len(finals["r1"].outputs[0].token_ids) < MAX_NEW
    for i in (0, 2, 3):
        assert finals[f"r{i}"].outputs[0].finish_reason == "length"
        assert_greedy_agree([prompts[i]], [finals[f"r{i}"].outputs[0].token_ids], [reference[i]],
                            hf_next_token_logits(hf))
    assert engine.kv_manager.num_free_blocks == engine.kv_manager.num_blocks


@pytest.mark.parametrize("prompt, message", [
    ([], "empty"),
    ("", "empty"),
    ([1, 2, 512], "outside the vocabulary"),
    ([-1, 3], "outside the vocabulary"),
    (list(range(100)) * 2, "max_model_len"),
    (42, "string or a list of token ids"),
    ([1.5, 2], "string or a list of token ids"),
    ("text needs a tokenizer", "token ids"),
])
def test_bad_prompt_raises_and_the_engine_carries_on(tiny, prompt, message):
    path, hf, prompts, reference = tiny
    llm = LLM(str(path), device="cpu", max_num_seqs=4, max_num_batched_tokens=16, max_model_len=128)
    engine = llm.engine
    engine.add_request("good", prompts[0], greedy())
    engine.step()
    with pytest.raises(ValueError, match=message):
        engine.add_request("bad", prompt, greedy())
    assert "bad" not in engine.requests
    final = None
    while engine.has_unfinished_requests():
        final = next((o for o in engine.step() if o.finished), final)
    assert_greedy_agree([prompts[0]], [final.outputs[0].token_ids], [reference[0]], hf_next_token_logits(hf))
    assert engine.kv_manager.num_free_blocks == engine.kv_manager.num_blocks


def test_other_bad_requests_raise(tiny):
    path, _, prompts, _ = tiny
    llm = LLM(str(path), device="cpu", max_model_len=128)
    engine = llm.engine
    engine.add_request("a", prompts[0], greedy())
    with pytest.raises(ValueError, match="already in use"):
        engine.add_request("a", prompts[1], greedy())
    with pytest.raises(ValueError, match="SamplingParams"):
        engine.add_request("b", prompts[1], {"temperature": 0})
    with pytest.raises(ValueError, match="priority"):
        engine.add_request("c", prompts[1], greedy(), priority="high")
    with pytest.raises(ValueError, match="one per prompt"):
        llm.generate(prompts[:2], [greedy()] * 3, use_tqdm=False)
    with pytest.raises(ValueError, match="unknown engine option"):
        LLM(str(path), device="cpu", max_num_seq=4)
    with pytest.raises(ValueError, match="scheduling_policy"):
        LLM(str(path), device="cpu", scheduling_policy="random")
    small = LLM(str(path), device="cpu", max_num_seqs=2, max_model_len=128)
    with pytest.raises(ValueError, match="max_num_seqs is 2"):
        small.generate([prompts[0]], SamplingParams(n=3, max_tokens=2), use_tqdm=False)
    assert not small.engine.requests, "the rejected request left nothing behind"


def test_generate_is_all_or_nothing_on_a_bad_prompt(tiny):
    path, _, prompts, _ = tiny
    llm = LLM(str(path), device="cpu", max_model_len=128)
    with pytest.raises(ValueError):
        llm.generate([prompts[0], prompts[1], []], greedy(), use_tqdm=False)
    assert not llm.engine.requests
    assert llm.engine.kv_manager.num_free_blocks == llm.engine.kv_manager.num_blocks
    assert token_ids(llm.generate([prompts[0]], greedy(4), use_tqdm=False))[0] == token_ids(
        llm.generate([prompts[0]], greedy(4), use_tqdm=False))[0]


def test_length_finish_at_max_model_len(tiny):
    path, _, _, _ = tiny
    llm = LLM(str(path), device="cpu", max_model_len=32)
    out = llm.generate([list(range(1, 29))], greedy(max_tokens=50), use_tqdm=False)[0]
    assert out.outputs[0].finish_reason == "length"
    assert len(out.prompt_token_ids) + len(out.outputs[0].token_ids) == 32


def test_logprobs_equal_log_softmax_of_the_model(tiny):
    path, hf, prompts, _ = tiny
    llm = LLM(str(path), device="cpu", max_model_len=128)
    out = llm.generate([prompts[0]], greedy(max_tokens=5, logprobs=3), use_tqdm=False)[0].outputs[0]
    sequence = prompts[0] + out.token_ids
    with torch.no_grad():
        logits = hf(torch.tensor([sequence])).logits[0].float()
    expected = torch.log_softmax(logits, dim=-1)
    for i, (token, (logprob, top)) in enumerate(zip(out.token_ids, out.logprobs)):
        row = expected[len(prompts[0]) - 1 + i]
        assert abs(logprob - row[token].item()) < 1e-4
        assert list(top) == torch.topk(row, 3).indices.tolist()
        assert token == next(iter(top)), "greedy picks the top token"


def test_metrics_are_ordered(tiny):
    path, _, prompts, _ = tiny
    out = LLM(str(path), device="cpu", max_model_len=128).generate([prompts[0]], greedy(), use_tqdm=False)[0]
    m = out.metrics
    assert m.arrival_time <= m.first_scheduled_time <= m.first_token_time <= m.finish_time
    assert m.num_prompt_tokens == len(prompts[0]) and m.num_output_tokens == MAX_NEW
    assert m.ttft > 0 and m.tpot > 0 and m.e2e_latency >= m.ttft


# -- SmolLM2: real text, stop strings, EOS, streaming --------------------------------------------------------------

@pytest.fixture(scope="module")
def smol_llm(smollm2):
    return LLM("smollm2", device="cpu", max_num_seqs=4, max_model_len=512)


@pytest.mark.slow
def test_smollm2_greedy_batch_matches_transformers(smol_llm, smollm2_hf):
    questions = ["What is the capital of France?", "Write a haiku about the sea.", "List three prime numbers.",
                 "Who wrote Romeo and Juliet?", "What is 12 times 7?", "Name a planet with rings."]
    outputs = smol_llm.chat([[{"role": "user", "content": q}] for q in questions], greedy(max_tokens=48),
                            use_tqdm=False)
    prompts = [o.prompt_token_ids for o in outputs]
    (eos,) = smol_llm.engine.eos_token_ids
    reference = [hf_greedy(smollm2_hf, p, 48, eos_token_id=eos) for p in prompts]
    assert_greedy_agree(prompts, token_ids(outputs), reference, hf_next_token_logits(smollm2_hf))
    assert "Paris" in outputs[0].outputs[0].text
    assert outputs[0].outputs[0].finish_reason == "stop"  # ended with the end-of-turn token
    assert outputs[0].outputs[0].text == smol_llm.tokenizer.decode(outputs[0].outputs[0].token_ids)


@pytest.mark.slow
def test_stop_string_cuts_the_text_exactly(smol_llm):
    conversation = [{"role": "user", "content": "Write a haiku about the sea."}]
    full = smol_llm.chat(conversation, greedy(max_tokens=40), use_tqdm=False)[0].outputs[0].text
    words = full.split()
    assert len(words) > 4
    stop = " " + words[3]
    cut = smol_llm.chat(conversation, greedy(max_tokens=40, stop=[stop, "never-there"]), use_tqdm=False)[0].outputs[0]
    assert cut.text == full[: full.index(stop)]
    assert cut.finish_reason == "stop"


@pytest.mark.slow
def test_stream_deltas_add_up_to_the_final_text(smol_llm):
    prompt = "Write the word café and an emoji: "
    pieces, last = [], ""
    outputs = list(smol_llm.stream(prompt, greedy(max_tokens=20)))
    for out in outputs:
        text = out.outputs[0].text
        assert text.startswith(last), "outputs are cumulative"
        pieces.append(text[len(last):])
        last = text
    assert outputs[-1].finished and not any(o.finished for o in outputs[:-1])
    assert "".join(pieces) == outputs[-1].outputs[0].text
    assert "\ufffd" not in outputs[-1].outputs[0].text
