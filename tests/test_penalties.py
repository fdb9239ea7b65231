"""min_tokens, logit_bias and the repetition / frequency / presence penalties: the batched adjust_logits equals
its one-token-at-a-time twin on random batches, each adjustment does what its definition says on a hand-made
case, and bad values are refused with the field named."""

from __future__ import annotations

import random

import pytest
import torch

from reference.penalties import adjust_logits, adjust_logits_slow, needs_adjusting
from reference.sampling import SamplingParams

VOCAB = 50


def random_case(rng: random.Random, rows: int):
    params, prompts, outputs, stops = [], [], [], []
    for _ in range(rows):
        kind = rng.random()
        params.append(SamplingParams(
            max_tokens=40,
            min_tokens=rng.choice([0, 0, 3, 30]),
            logit_bias={rng.randrange(VOCAB): rng.uniform(-100, 100) for _ in range(rng.randrange(3))} or None,
            repetition_penalty=rng.choice([1.0, 1.3, 0.7]) if kind < 0.8 else 1.0,
            frequency_penalty=rng.uniform(-2, 2) if kind < 0.6 else 0.0,
            presence_penalty=rng.uniform(-2, 2) if kind > 0.3 else 0.0,
        ))
        prompts.append([rng.randrange(VOCAB) for _ in range(rng.randrange(1, 12))])
        outputs.append([rng.randrange(VOCAB) for _ in range(rng.randrange(0, 20))])
        stops.append(rng.sample(range(VOCAB), rng.randrange(0, 3)))
    return params, prompts, outputs, stops


@pytest.mark.parametrize("seed", range(20))
def test_batched_adjustments_equal_the_plain_twin(seed):
    rng = random.Random(seed)
    params, prompts, outputs, stops = random_case(rng, rows=rng.randrange(1, 9))
    logits = torch.randn(len(params), VOCAB, generator=torch.Generator().manual_seed(seed)) * 5
    fast = adjust_logits(logits, params, prompts, outputs, stops)
    slow = adjust_logits_slow(logits, params, prompts, outputs, stops)
    assert torch.equal(torch.isinf(fast), torch.isinf(slow))
    finite = ~torch.isinf(slow)
    assert torch.allclose(fast[finite], slow[finite], atol=1e-4, rtol=1e-6)
    untouched = [i for i, p in enumerate(params) if not needs_adjusting(p)]
    assert torch.equal(fast[untouched], logits[untouched])


def test_a_pending_device_token_counts_as_generated():
    """Async scheduling: the last output token may still be on the device; it must count like a host one."""
    params = [SamplingParams(frequency_penalty=1.0, presence_penalty=0.5, max_tokens=8, min_tokens=3)] * 2
    logits = torch.zeros(2, VOCAB)
    with_pending = adjust_logits(logits, params, [[1], [1]], [[7], [7]], [[0], [0]], pending=torch.tensor([7, -1]))
    on_host = adjust_logits_slow(logits, params, [[1], [1]], [[7, 7], [7]], [[0], [0]])
    assert torch.allclose(with_pending, on_host)
    assert with_pending[0, 7] == -2.5 and with_pending[1, 7] == -1.5


def test_each_adjustment_by_its_definition():
    logits = torch.tensor([[2.0, -2.0, 1.0, 0.5, 3.0]])
    one = lambda **kw: adjust_logits(logits, [SamplingParams(max_tokens=9, **kw)], [[0, 1]], [[2, 2, 3]], [[4]])[0]
    assert one(repetition_penalty=2.0).tolist() == [1.0, -4.0, 0.5, 0.25, 3.0]  # seen: 0, 1 (prompt), 2, 3
    assert one(frequency_penalty=1.0).tolist() == [2.0, -2.0, -1.0, -0.5, 3.0]  # 2 twice, 3 once
    assert one(presence_penalty=1.0).tolist() == [2.0, -2.0, 0.0, -0.5, 3.0]
    assert one(logit_bias={4: -100.0, 0: 1.5}).tolist() == [3.5, -2.0, 1.0, 0.5, -97.0]
    assert one(min_tokens=4)[4] == float("-inf")  # 3 generated < 4: the stop token is out
    assert one(min_tokens=3)[4] == 3.0  # 3 generated: it may stop


@pytest.mark.parametrize("bad, field", [
    (dict(min_tokens=20), "min_tokens"), (dict(min_tokens=-1), "min_tokens"),
    (dict(presence_penalty=2.5), "presence_penalty"), (dict(frequency_penalty=-3), "frequency_penalty"),
    (dict(repetition_penalty=0.0), "repetition_penalty"), (dict(logit_bias={3: 101}), "logit_bias"),
    (dict(logit_bias={-1: 1}), "logit_bias"),
])
def test_bad_values_name_the_field(bad, field):
    with pytest.raises(ValueError, match=rf"SamplingParams\({field}="):
        SamplingParams(max_tokens=16, **bad)


# -- in the engine ------------------------------------------------------------------------------------------------
MAX_NEW = 12


@pytest.fixture(scope="module")
def twin(hf_twin_factory):
    path, hf = hf_twin_factory("llama", num_attention_heads=4, num_key_value_heads=2)
    generator = torch.Generator().manual_seed(5)
    prompts = [torch.randint(0, 512, (n,), generator=generator).tolist() for n in (5, 11, 17, 8)]
    return str(path), hf, prompts


def engine_tokens(path, prompts, params, **options) -> list[list[int]]:
    from reference import LLM

    llm = LLM(path, device="cpu", max_num_seqs=4, max_num_batched_tokens=16, max_model_len=64, block_size=4,
              num_kv_blocks=40, **options)
    return [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]


def hf_tokens(hf, prompt, eos_token_id=None, **generate_options) -> list[int]:
    """transformers' greedy generate with its own logits processors (repetition_penalty, min_new_tokens)."""
    input_ids = torch.tensor([prompt])
    with torch.no_grad():
        out = hf.generate(input_ids, attention_mask=torch.ones_like(input_ids), do_sample=False,
                          max_new_tokens=MAX_NEW, eos_token_id=eos_token_id, pad_token_id=0, temperature=None,
                          top_p=None, top_k=None, **generate_options)
    new = out[0, len(prompt):].tolist()
    return new[: new.index(eos_token_id) + 1] if eos_token_id in new else new  # generate pads after EOS


def test_repetition_penalty_equals_transformers_generate(twin):
    path, hf, prompts = twin
    ours = engine_tokens(path, prompts, SamplingParams(temperature=0, max_tokens=MAX_NEW, repetition_penalty=1.8))
    assert ours == [hf_tokens(hf, p, repetition_penalty=1.8) for p in prompts]
    assert ours != engine_tokens(path, prompts, SamplingParams(temperature=0, max_tokens=MAX_NEW))  # it matters


def test_min_tokens_keeps_the_stop_token_out_as_transformers_min_new_tokens_does(twin):
    path, hf, prompts = twin
    plain = engine_tokens(path, prompts, SamplingParams(temperature=0, max_tokens=MAX_NEW))
    stop = plain[0][1]  # greedy would stop at the second token of the first prompt
    early = engine_tokens(path, prompts, SamplingParams(temperature=0, max_tokens=MAX_NEW, stop_token_ids=[stop]))
    held = engine_tokens(path, prompts, SamplingParams(temperature=0, max_tokens=MAX_NEW, stop_token_ids=[stop],
                                                       min_tokens=6))
    assert early[0] == plain[0][:2]
    assert held == [hf_tokens(hf, p, eos_token_id=stop, min_new_tokens=6) for p in prompts]
    assert all(len(tokens) >= 6 for tokens in held) and stop not in held[0][:6]


def test_logit_bias_of_100_makes_greedy_pick_that_token(twin):
    path, _, prompts = twin
    tokens = engine_tokens(path, prompts, SamplingParams(temperature=0, max_tokens=6, logit_bias={123: 100}))
    assert tokens == [[123] * 6] * len(prompts)


def test_penalties_give_the_same_tokens_with_async_scheduling(twin):
    """The fast runner counts the token still on the device (the step in flight) like one on the host."""
    path, _, prompts = twin
    params = [SamplingParams(temperature=0, max_tokens=MAX_NEW, frequency_penalty=1.5, presence_penalty=0.5,
                             repetition_penalty=1.1, min_tokens=3),
              SamplingParams(temperature=0.7, seed=3, max_tokens=MAX_NEW, presence_penalty=2.0)] * 2
    plain = engine_tokens(path, prompts, params)
    assert plain == engine_tokens(path, prompts, params, async_scheduling=True)
    assert plain[0] != engine_tokens(path, prompts[:1], SamplingParams(temperature=0, max_tokens=MAX_NEW))[0]


def test_logit_bias_outside_the_vocabulary_is_refused_at_add_request(twin):
    from reference import LLM

    llm = LLM(twin[0], device="cpu", num_kv_blocks=16, max_model_len=64)
    with pytest.raises(ValueError, match=r"logit_bias names token 512, outside the vocabulary \[0, 512\)"):
        llm.generate([[1, 2, 3]], SamplingParams(logit_bias={512: 1.0}), use_tqdm=False)
    assert llm.engine.kv_manager.num_free_blocks == llm.engine.kv_manager.num_blocks


@pytest.mark.gpu
def test_penalties_on_the_gpu_with_cuda_graphs_and_async_scheduling(twin):
    """On the GPU the pending token comes from a CUDA-graph replay: same tokens as synchronous eager steps."""
    from reference import LLM

    path, _, prompts = twin
    params = SamplingParams(temperature=0, max_tokens=MAX_NEW, frequency_penalty=1.5, presence_penalty=0.5,
                            repetition_penalty=1.1, min_tokens=3, logit_bias={7: 2.0})
    runs = []
    for options in (dict(async_scheduling=True), dict(async_scheduling=False, enforce_eager=True)):
        llm = LLM(path, device="cuda", dtype="float32", max_num_seqs=4, max_model_len=64, num_kv_blocks=64,
                  **options)
        runs.append([o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)])
    assert runs[0] == runs[1] == engine_tokens(path, prompts, params)
