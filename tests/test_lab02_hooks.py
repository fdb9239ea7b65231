"""The pieces lab 0.2 adds to `reference` agree with the engine they describe.

- reference.costs: the FLOP and byte counts of a step match the model's parameters and the KV cache's size,
  and the machine measurements return sane, positive rates on CPU (and CUDA when present).
"""

from __future__ import annotations

import pytest
import torch

from reference import costs
from reference.config import ModelConfig
from reference.kv_cache import kv_bytes_per_token
from reference.models.llama import LlamaForCausalLM


def tiny_config(**fields) -> ModelConfig:
    base = dict(model_type="llama", vocab_size=50, hidden_size=24, intermediate_size=40, num_hidden_layers=3,
                num_attention_heads=6, num_key_value_heads=2, head_dim=8, tie_word_embeddings=False)
    return ModelConfig(**{**base, **fields})


def test_linear_params_are_the_model_linear_weights_including_the_lm_head():
    for tied in (False, True):
        config = tiny_config(tie_word_embeddings=tied)
        with torch.device("meta"):
            model = LlamaForCausalLM(config)
        linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
        assert costs.linear_params(config) == linear  # the tied head is one Linear sharing the embedding


def test_flops_per_token_is_two_per_weight_plus_four_per_head_dim_per_key():
    config = tiny_config()
    base = 2 * costs.linear_params(config)
    assert costs.flops_per_token(config, 1) == base + 4 * 3 * 6 * 8
    assert costs.flops_per_token(config, 10) - costs.flops_per_token(config, 9) == 4 * 3 * 6 * 8
    with pytest.raises(ValueError):
        costs.flops_per_token(config, 0)


def test_step_flops_of_a_prefill_is_the_sum_over_causal_positions_and_decodes_add_up():
    config = tiny_config()
    prefill = costs.step_flops(config, [5], [5])
    assert prefill == sum(costs.flops_per_token(config, n) for n in range(1, 6))
    chunk = costs.step_flops(config, [3], [8])  # positions 5, 6, 7 of a sequence: 6, 7, 8 keys
    assert chunk == sum(costs.flops_per_token(config, n) for n in (6, 7, 8))
    assert costs.step_flops(config, [1, 1], [4, 9]) == (costs.flops_per_token(config, 4)
                                                        + costs.flops_per_token(config, 9))
    with pytest.raises(ValueError):
        costs.step_flops(config, [4], [3])


def test_step_bytes_read_weights_once_and_kv_per_token_like_the_cache():
    config = tiny_config()
    assert costs.kv_bytes_per_token is kv_bytes_per_token  # one formula: bytes or a dtype
    assert kv_bytes_per_token(config, 4) == kv_bytes_per_token(config, torch.float32)
    assert kv_bytes_per_token(config, 2) == kv_bytes_per_token(config, torch.bfloat16)
    weights = 2 * costs.linear_params(config)
    one = costs.step_bytes(config, [1], [10], 2)
    two = costs.step_bytes(config, [1, 1], [10, 10], 2)
    assert one == weights + 11 * costs.kv_bytes_per_token(config, 2)
    assert two - one == one - weights  # a second sequence adds only its own K/V traffic


def test_decode_intensity_grows_with_batch_and_prefill_is_far_more_intense():
    config = tiny_config(hidden_size=256, intermediate_size=512, head_dim=32, num_attention_heads=8,
                         num_key_value_heads=2)
    single = costs.arithmetic_intensity(config, [1], [64], 2)
    batch = costs.arithmetic_intensity(config, [1] * 16, [64] * 16, 2)
    prefill = costs.arithmetic_intensity(config, [64], [64], 2)
    assert single < batch < prefill
    assert single == pytest.approx(costs.step_flops(config, [1], [64]) / costs.step_bytes(config, [1], [64], 2))


def measure_devices():
    return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", measure_devices())
def test_machine_measurements_are_positive_rates(device):
    flops = costs.measure_matmul_flops(device, torch.float32, size=256, repeats=2)
    bandwidth = costs.measure_memory_bandwidth(device, nbytes=1 << 24, repeats=2)
    assert 1e8 < flops < 1e16 and 1e8 < bandwidth < 1e14


# -- reference.step_plan: the scheduler's step over plain data, and the hook that runs a plan function ---------------
import random  # noqa: E402

from fakes import FakePagedKVManager, FakeRunner, schedule  # noqa: E402

from reference import LLM, LLMEngine, SamplingParams  # noqa: E402
from reference.scheduler import Scheduler  # noqa: E402
from reference.sequence import Sequence  # noqa: E402
from reference.step_plan import PlanScheduler, install_scheduler, plan_step, scheduler_state  # noqa: E402
from reference.workload import serve_arrivals  # noqa: E402


def entry(seq_id, num_tokens, num_computed=0):
    return {"seq_id": seq_id, "num_tokens": num_tokens, "num_computed": num_computed}


def test_plan_step_runs_decodes_first_and_gives_the_leftover_budget_to_a_prefill_chunk():
    plan = plan_step([entry(0, 10, 9)], [entry(1, 30)], num_free_blocks=100, block_size=4, max_num_seqs=4,
                     token_budget=16)
    assert plan == {"scheduled": [[0, 1], [1, 15]], "preempted": []}
    whole_only = plan_step([entry(0, 10, 9)], [entry(1, 30)], 100, 4, 4, 16, chunked_prefill=False)
    assert whole_only == {"scheduled": [[0, 1]], "preempted": []}


def test_plan_step_preempts_the_last_running_sequence_and_admits_nothing_that_step():
    # seq 0 holds 2 blocks of 4 for 8 computed tokens; its 9th token needs a third block and none is free.
    plan = plan_step([entry(0, 9, 8), entry(1, 5, 4)], [entry(2, 3)], 0, 4, 4, 16)
    assert plan == {"scheduled": [[0, 1]], "preempted": [1]}
    alone = plan_step([entry(0, 9, 8)], [], 0, 4, 4, 16)
    assert alone == {"scheduled": [], "preempted": [0]}


def test_plan_step_keeps_the_head_of_the_queue_and_the_seat_limit():
    blocked = plan_step([], [entry(0, 40), entry(1, 2)], num_free_blocks=5, block_size=4, max_num_seqs=4,
                        token_budget=64)
    assert blocked == {"scheduled": [], "preempted": []}  # the head needs 10 blocks; 1 may not overtake it
    seats = plan_step([entry(0, 5, 4)], [entry(1, 2), entry(2, 2)], 100, 4, 2, 64)
    assert seats == {"scheduled": [[0, 1], [1, 2]], "preempted": []}


def random_workload(rng: random.Random, count: int) -> list[tuple[int, int, int]]:
    """(arrival step, prompt length, max_tokens) per request."""
    return sorted((rng.randint(0, 12), rng.randint(1, 30), rng.randint(1, 12)) for _ in range(count))


def replay(scheduler: Scheduler, workload) -> list:
    runner = FakeRunner(scheduler)
    seqs = [Sequence(f"r{i}", [i + 1] * prompt_len, SamplingParams(max_tokens=max_tokens), arrival_time=float(i))
            for i, (_, prompt_len, max_tokens) in enumerate(workload)]
    trace, step = [], 0
    while step < 500 and (scheduler.has_unfinished() or any(a >= step for a, _, _ in workload)):
        for seq, (arrival, _, _) in zip(seqs, workload):
            if arrival == step:
                scheduler.add(seq)
        batch = schedule(scheduler)
        trace.append(([(s.request_id, n) for s, n in zip(batch.seqs, batch.num_tokens)],
                      [s.request_id for s in batch.preempted]))
        runner.step(batch)
        step += 1
    assert not scheduler.has_unfinished()
    return trace


def test_a_plan_scheduler_running_plan_step_makes_the_schedulers_decisions():
    runs_with_preemption = 0
    for seed in range(12):
        rng = random.Random(seed)
        workload = random_workload(rng, 10)
        options = dict(max_num_seqs=rng.choice([2, 4, 8]), max_num_batched_tokens=rng.choice([8, 16, 40]),
                       enable_chunked_prefill=rng.choice([True, True, False]))
        if not options["enable_chunked_prefill"]:
            options["max_num_batched_tokens"] = 48  # every prompt (and its regrown output) fits one step whole
        blocks = rng.choice([12, 20, 200])
        expected = replay(Scheduler(FakePagedKVManager(blocks, 4), **options), workload)
        got = replay(PlanScheduler(plan_step, FakePagedKVManager(blocks, 4), **options), workload)
        assert got == expected, seed
        runs_with_preemption += any(preempted for _, preempted in expected)
    assert runs_with_preemption >= 2


def test_plan_scheduler_rejects_plans_that_break_the_rules():
    kv = FakePagedKVManager(4, 4)
    for bad in ({"scheduled": [[99, 1]], "preempted": []}, {"scheduled": [[0, 3]], "preempted": []},
                {"scheduled": [[0, 2], [1, 2]], "preempted": []}, {"scheduled": []}):
        scheduler = PlanScheduler(lambda **state: bad, kv, 4, 3)
        scheduler.add(Sequence("a", [1, 2], SamplingParams(), seq_id=0))
        scheduler.add(Sequence("b", [1, 2], SamplingParams(), seq_id=1))
        with pytest.raises(ValueError):
            scheduler.schedule()
        assert kv.num_free_blocks == 4  # nothing was carried out


@pytest.fixture(scope="module")
def tiny_checkpoint(checkpoint_factory):
    return checkpoint_factory("qwen3", num_attention_heads=4, num_key_value_heads=2, head_dim=16)


def test_an_engine_driven_by_plan_step_generates_the_same_tokens_and_steps_under_preemption(tiny_checkpoint):
    options = dict(max_num_seqs=4, max_model_len=64, num_kv_blocks=10, block_size=8, max_num_batched_tokens=24,
                   enable_prefix_caching=False)
    generator = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, 500, (int(n),), generator=generator).tolist() for n in (20, 9, 14, 30, 5)]
    params = SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True)
    plain = LLM(str(tiny_checkpoint), **options)
    expected = plain.generate(prompts, params, use_tqdm=False)
    planned = LLM(str(tiny_checkpoint), **options)
    engine = planned.engine
    install_scheduler(engine, PlanScheduler(plan_step, engine.kv_manager, 4, 24))
    got = planned.generate(prompts, params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in got] == [o.outputs[0].token_ids for o in expected]
    assert [r.scheduled for r in engine.step_log] == [r.scheduled for r in plain.engine.step_log]
    assert sum(r.num_preempted for r in engine.step_log) > 0


def test_install_scheduler_and_scheduler_state_refuse_what_they_cannot_handle(tiny_checkpoint):
    engine = LLMEngine(str(tiny_checkpoint), max_num_seqs=2, max_model_len=64, num_kv_blocks=16, block_size=8)
    with pytest.raises(ValueError):
        install_scheduler(engine, Scheduler(FakePagedKVManager(4, 4), 2, 8))
    with pytest.raises(ValueError):
        install_scheduler(engine, Scheduler(engine.kv_manager, 3, 8))
    with pytest.raises(ValueError):
        scheduler_state(engine.scheduler)  # prefix caching is on by default
    engine.add_request("a", [1, 2, 3], SamplingParams(max_tokens=2))
    with pytest.raises(ValueError):
        install_scheduler(engine, Scheduler(engine.kv_manager, 2, 8))


def test_serve_arrivals_adds_requests_at_their_step_and_skips_idle_gaps(tiny_checkpoint):
    llm = LLM(str(tiny_checkpoint), max_num_seqs=2, max_model_len=64, enable_prefix_caching=False)
    requests = [{"request_id": "a", "prompt": [5, 6, 7], "max_tokens": 3, "arrival_step": 0},
                {"request_id": "b", "prompt": [8, 9], "max_tokens": 2, "arrival_step": 1},
                {"request_id": "c", "prompt": [4] * 6, "max_tokens": 2, "arrival_step": 10}]
    results = serve_arrivals(llm.engine, requests)
    assert results["a"]["first_token_step"] == 0 and results["a"]["finish_step"] == 2
    assert results["b"]["first_token_step"] == 1 and results["b"]["finish_step"] == 2
    assert results["c"]["first_token_step"] == 10 and results["c"]["finish_step"] == 11  # the clock jumped to 10
    params = SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True)
    alone = llm.generate([[5, 6, 7]], params, use_tqdm=False)[0].outputs[0].token_ids
    assert results["a"]["token_ids"] == alone


# -- reference.policies.KeyFunctionPolicy: a policy as a function of plain data -----------------------------------
from reference.policies import POLICIES, KeyFunctionPolicy, sequence_fields  # noqa: E402


def test_sequence_fields_are_what_the_named_policies_read():
    seq = Sequence("r", [1, 2, 3, 4], SamplingParams(), priority=2, arrival_time=5.0, seq_id=77)
    seq.num_computed_tokens, seq.waiting_since_step = 1, 3
    assert sequence_fields(seq) == {"seq_id": 77, "arrival_time": 5.0, "priority": 2, "num_uncomputed": 3,
                                    "waiting_since_step": 3}


def test_a_key_function_policy_rebuilt_from_plain_fields_orders_like_each_named_policy():
    rng = random.Random(0)
    rebuilt = {
        "fcfs": lambda s, step: (s["arrival_time"], s["seq_id"]),
        "sjf": lambda s, step: (s["num_uncomputed"], s["arrival_time"], s["seq_id"]),
        "priority": lambda s, step: (s["priority"] * 32 - max(0, step - s["waiting_since_step"]), s["arrival_time"],
                                     s["seq_id"]),
    }
    for _ in range(50):
        seqs = []
        for i in range(8):
            seq = Sequence("r", [0] * rng.randint(1, 50), SamplingParams(), priority=rng.randint(0, 3),
                           arrival_time=float(rng.randint(0, 5)))
            seq.waiting_since_step = rng.randint(0, 100)
            seqs.append(seq)
        step = rng.randint(0, 150)
        for name, key_fn in rebuilt.items():
            policy = KeyFunctionPolicy(key_fn)
            assert (sorted(seqs, key=lambda s: policy.sort_key(s, step))
                    == sorted(seqs, key=lambda s: POLICIES[name]().sort_key(s, step)))


def test_an_engine_with_a_key_function_policy_schedules_like_the_named_policy(tiny_checkpoint):
    options = dict(max_num_seqs=2, max_model_len=64, max_num_batched_tokens=16, enable_prefix_caching=False)
    prompts = [[3] * n for n in (30, 4, 12, 7, 20)]
    params = SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True)
    named = LLM(str(tiny_checkpoint), scheduling_policy="sjf", **options)
    named.generate(prompts, params, use_tqdm=False)
    keyed = LLM(str(tiny_checkpoint), scheduling_policy=KeyFunctionPolicy(
        lambda s, step: (s["num_uncomputed"], s["arrival_time"], s["seq_id"])), **options)
    keyed.generate(prompts, params, use_tqdm=False)
    assert [r.scheduled for r in keyed.engine.step_log] == [r.scheduled for r in named.engine.step_log]
