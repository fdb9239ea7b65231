"""Lab 0.2 (Prefill vs decode): its exercises and their test cases."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..codec import describe
from ..compare import Close, Comparison, Exact, Outcome, Trace
from ..harness import lab0_2 as harness
from ..spec import Case, Exercise, Lab
from . import LAB_MEMORY_MB
from .draw import choice, integer

NOTEBOOK_1 = "01_two_phases.ipynb"
NOTEBOOK_2 = "02_batching.ipynb"
NOTEBOOK_3 = "03_chunked_prefill_and_policies.ipynb"


# ============================================================================================================
# Notebook 1: the two phases
# ============================================================================================================


SMOLLM2 = {"vocab_size": 49152, "hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30,
           "num_attention_heads": 9, "num_key_value_heads": 3, "head_dim": 64}
QWEN3_06B = {"vocab_size": 151936, "hidden_size": 1024, "intermediate_size": 3072, "num_hidden_layers": 28,
             "num_attention_heads": 16, "num_key_value_heads": 8, "head_dim": 128}
LLAMA2_7B = {"vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
             "num_attention_heads": 32}  # no head_dim, no num_key_value_heads: the defaults apply


def _random_config(generator: torch.Generator) -> dict[str, Any]:
    heads = choice(generator, [4, 8, 12, 16])
    config = {"vocab_size": choice(generator, [1000, 32000, 50257]),
              "num_hidden_layers": choice(generator, [2, 12, 24]),
              "num_attention_heads": heads, "hidden_size": heads * choice(generator, [32, 64]),
              "intermediate_size": choice(generator, [512, 1536, 2816])}
    if choice(generator, [True, False]):
        config["num_key_value_heads"] = choice(generator, [h for h in (1, 2, 4) if heads % h == 0])
    if choice(generator, [True, False]):
        config["head_dim"] = choice(generator, [32, 64, 128])
    return config


def _random_step(generator: torch.Generator, num_seqs: int) -> tuple[list[int], list[int]]:
    query_lens, context_lens = [], []
    for _ in range(num_seqs):
        query_len = choice(generator, [1, 1, 1, 7, 33])
        query_lens.append(query_len)
        context_lens.append(query_len + integer(generator, 0, 300))
    return query_lens, context_lens


FLOPS_PER_TOKEN = Exercise(
    name="flops_per_token", symbol="flops_per_token", notebook=NOTEBOOK_1,
    signature="flops_per_token(config: dict, context_len: int) -> int",
    reference=harness.ref_flops_per_token,
    hides=("reference.costs.flops_per_token", "reference.costs.linear_params", "reference.costs.step_flops"),
    cases=(
        Case("smollm2_first_token", lambda g: {"config": SMOLLM2, "context_len": 1}, Exact(),
             "SmolLM2-135M, a token that attends only to itself: 2 FLOPs per linear weight (LM head included) plus "
             "4 x layers x heads x head_dim for one key"),
        Case("smollm2_long_context", lambda g: {"config": SMOLLM2, "context_len": 2048}, Exact(),
             "SmolLM2-135M at 2048 keys: the attention term grows linearly with the context, 4 x head_dim FLOPs "
             "per key for each of the 9 QUERY heads (not the 3 KV heads) in each layer"),
        Case("qwen3_explicit_head_dim", lambda g: {"config": QWEN3_06B, "context_len": 100}, Exact(),
             "Qwen3-0.6B: head_dim 128 is given, and heads x head_dim (2048) differs from hidden_size (1024)"),
        Case("defaults_multi_head", lambda g: {"config": LLAMA2_7B, "context_len": 4096}, Exact(),
             "Llama-2-7B's config has no head_dim and no num_key_value_heads: head_dim = hidden // heads, "
             "KV heads = heads"),
        Case("random_configs", lambda g: {"config": _random_config(g),
                                          "context_len": integer(g, 1, 5000)},
             Exact(), "a random Llama-style config and context", visible=False, seed=1),
        Case("none_means_default", lambda g: {"config": {**LLAMA2_7B, "num_key_value_heads": None, "head_dim": None},
                                              "context_len": 300},
             Exact(), "num_key_value_heads and head_dim given as None count as absent", visible=False),
    ),
)

ARITHMETIC_INTENSITY = Exercise(
    name="arithmetic_intensity", symbol="arithmetic_intensity", notebook=NOTEBOOK_1,
    signature="arithmetic_intensity(config: dict, query_lens: list[int], context_lens: list[int], dtype_bytes: int) "
              "-> float",
    reference=harness.ref_arithmetic_intensity, uses=("flops_per_token",),
    hides=("reference.costs.arithmetic_intensity", "reference.costs.step_bytes", "reference.kv.layout.kv_bytes_per_token"),
    cases=(
        Case("one_decode_float32", lambda g: {"config": SMOLLM2, "query_lens": [1], "context_lens": [100],
                                              "dtype_bytes": 4},
             Close(0.0, 1e-9), "SmolLM2, one sequence decoding its 100th token in float32: the weights are read for "
                               "a single token, so the intensity is about 2 FLOPs / 4 bytes; bytes = every linear "
                               "weight once (LM head included) + K/V of 100 tokens read + 1 token written"),
        Case("prefill_bfloat16", lambda g: {"config": SMOLLM2, "query_lens": [256], "context_lens": [256],
                                            "dtype_bytes": 2},
             Close(0.0, 1e-9), "a 256-token prefill in bfloat16: token j attends to j + 1 keys, and all 256 tokens "
                               "share one read of the weights"),
        Case("decode_batch", lambda g: {"config": QWEN3_06B, "query_lens": [1] * 8,
                                        "context_lens": [40, 90, 200, 500, 1000, 1000, 3000, 4000],
                                        "dtype_bytes": 2},
             Close(0.0, 1e-9), "Qwen3-0.6B, a decode step of 8 sequences with different contexts: each reads its "
                               "own K/V"),
        Case("mixed_chunk_and_decodes", lambda g: {"config": SMOLLM2, "query_lens": [64, 1, 1],
                                                   "context_lens": [192, 30, 31], "dtype_bytes": 4},
             Close(0.0, 1e-9), "a chunked-prefill step: 64 tokens of a prompt whose first 128 are cached already "
                               "(its keys 129..192), beside two decodes"),
        Case("random_steps", lambda g: {"config": _random_config(g), "query_lens": (step := _random_step(g, 6))[0],
                                        "context_lens": step[1], "dtype_bytes": choice(g, [1, 2, 4])},
             Close(0.0, 1e-9), "random configs and steps", visible=False, seed=2),
        Case("none_means_default", lambda g: {"config": {**LLAMA2_7B, "num_key_value_heads": None, "head_dim": None},
                                              "query_lens": [1, 1], "context_lens": [100, 900], "dtype_bytes": 2},
             Close(0.0, 1e-9), "num_key_value_heads and head_dim given as None count as absent", visible=False),
    ),
)


# ============================================================================================================
# Notebook 2: batching, the scheduler's step, the engine loop
# ============================================================================================================


def _describe_state(state: dict[str, Any]) -> str:
    def seqs(entries):
        return "[" + ", ".join(f"seq {e['seq_id']}: {e['num_computed']} of {e['num_tokens']} tokens computed"
                               for e in entries) + "]"
    return (f"running {seqs(state['running'])}, waiting {seqs(state['waiting'])}, {state['num_free_blocks']} free "
            f"blocks of {state['block_size']} tokens, max_num_seqs {state['max_num_seqs']}, budget "
            f"{state['token_budget']} tokens, chunked prefill {'on' if state['chunked_prefill'] else 'off'}")


def _explain_plan(state: dict[str, Any], want: dict[str, Any], have: dict[str, Any]) -> str:
    """Why the expected plan differs from the learner's, in the words of schedule_step's rules (best effort)."""
    try:
        want_n = {seq_id: n for seq_id, n in want["scheduled"]}
        have_n = {seq_id: n for seq_id, n in have["scheduled"]}
        have_preempted = list(have["preempted"])
    except (TypeError, ValueError, KeyError):
        return "a plan is {'scheduled': [[seq_id, num_tokens], ...], 'preempted': [seq_id, ...]}"
    running = [e["seq_id"] for e in state["running"]]
    waiting = [e["seq_id"] for e in state["waiting"]]
    uncomputed = {e["seq_id"]: e["num_tokens"] - e["num_computed"] for e in state["running"] + state["waiting"]}
    left, budget_left = state["token_budget"], {}
    for seq_id, n in want["scheduled"]:
        budget_left[seq_id] = left
        left -= n
    reasons = []
    if want["preempted"] != have_preempted:
        if not have_preempted:
            reasons.append(f"sequence {want['preempted'][0]} must be preempted: a running sequence needs more KV "
                           f"blocks than are free, and the victim is the LAST running sequence the loop has not "
                           f"reached yet (the sequence itself when none is left)")
        elif not want["preempted"]:
            reasons.append(f"nothing needs preempting in this step, yet you preempted {have_preempted}")
        else:
            reasons.append(f"the sequences to preempt are {want['preempted']} in that order, not {have_preempted}: "
                           f"each victim is the LAST running sequence the loop has not reached yet (the sequence "
                           f"itself only when none is left)")
    admitted = [seq_id for seq_id in have_n if seq_id in waiting]
    if admitted and want["preempted"]:
        reasons.append(f"sequence {admitted[0]} was admitted, but nothing is admitted in a step that preempted")
    want_admitted = [seq_id for seq_id in want_n if seq_id in waiting]
    for seq_id in admitted:
        if seq_id in want_n or want["preempted"]:
            continue
        seats = len(running) + len(want_admitted)
        if seats >= state["max_num_seqs"]:
            reasons.append(f"sequence {seq_id} was admitted, but the seats are full: the {len(running)} running "
                           f"sequences each hold one, scheduled in this step or not"
                           + (f", and {len(want_admitted)} admitted ones" if want_admitted else "")
                           + f" (max_num_seqs {state['max_num_seqs']})")
        elif any(w not in want_n for w in waiting[: waiting.index(seq_id)]):
            blocked = next(w for w in waiting[: waiting.index(seq_id)] if w not in want_n)
            reasons.append(f"sequence {seq_id} was admitted ahead of sequence {blocked}, which waits before it and "
                           f"cannot be admitted now: admission stops there (no overtaking)")
        else:
            reasons.append(f"sequence {seq_id} must not be admitted in this step")
    for seq_id, n in want_n.items():
        if seq_id not in have_n:
            reasons.append(f"sequence {seq_id} must run {n} token(s) ({uncomputed.get(seq_id)} uncomputed, "
                           f"{budget_left[seq_id]} of the budget left when it is reached)")
        elif have_n[seq_id] != n:
            reasons.append(f"sequence {seq_id} runs {n} token(s), not {have_n[seq_id]}: it has "
                           f"{uncomputed.get(seq_id)} uncomputed and {budget_left[seq_id]} of the budget is left "
                           f"when it is reached")
    for seq_id in have_n:
        if seq_id in running and seq_id not in want_n and seq_id not in want["preempted"]:
            reasons.append(f"sequence {seq_id} must not run in this step"
                           + (f" (its {uncomputed[seq_id]} uncomputed tokens do not fit the budget left and chunked "
                              f"prefill is off: skip it)" if not state["chunked_prefill"] else ""))
    if not reasons and sorted(want["scheduled"]) == sorted(map(list, have["scheduled"])):
        reasons.append("the same sequences and counts in another order: running sequences in their order, then "
                       "admitted ones in theirs")
    return "; ".join(reasons)


@dataclass(frozen=True)
class Plans(Comparison):
    """schedule_step's results: one {"state", "plan"} (a single step) or a list of them (a replayed workload),
    plans compared exactly. A failure names the step, the state the function was given, both plans and the rule
    that decides; for hidden cases only the step number."""

    def describe(self) -> str:
        return "the plan of every step: exact match"

    def compare(self, got: Any, expected: Any) -> Outcome:
        single = isinstance(expected, dict)
        wants = [expected] if single else expected
        haves = [got] if single else got
        if not isinstance(haves, list):
            return Outcome(False, "wrong type", f"expected a trace (list of steps), got {describe(got)}")
        for i, want in enumerate(wants):
            where = "the plan" if single else f"step {i} (your function's call {i}, 0-based)"
            if i >= len(haves):
                return Outcome(False, "trace too short", f"{where}: your trace stopped after {len(haves)} steps")
            have = haves[i]
            state = want["state"]
            if isinstance(have, dict) and "error" in have:
                return Outcome(False, f"{where}: raised",
                               f"{where}, given {_describe_state(state)}: {str(have['error'])[:300]}")
            if not isinstance(have, dict) or "plan" not in have:
                return Outcome(False, "wrong type", f"{where}: expected a plan, got {describe(have)}")
            outcome = Exact().compare(have["plan"], want["plan"])
            if not outcome.passed:
                try:
                    why = _explain_plan(state, want["plan"], have["plan"])
                except Exception:  # a learner's plan of an unexpected shape: the plans alone must do
                    why = ""
                return Outcome(False, f"{where}: wrong plan",
                               f"{where}, given {_describe_state(state)}: expected {_short_plan(want['plan'])}, "
                               f"yours {_short_plan(have['plan'])}" + (f". {why}" if why else ""))
        if len(haves) > len(wants):
            return Outcome(False, "trace too long", f"expected {len(wants)} steps, got {len(haves)}: the workload "
                                                    f"should have finished")
        return Outcome.ok()


def _short_plan(plan: Any) -> str:
    text = repr(plan)
    return text if len(text) <= 300 else text[:297] + "..."


def _state(running, waiting, num_free_blocks, block_size=4, max_num_seqs=4, token_budget=16, chunked_prefill=True):
    as_entries = lambda seqs: [{"seq_id": i, "num_tokens": t, "num_computed": c} for i, t, c in seqs]  # noqa: E731
    return {"state": {"running": as_entries(running), "waiting": as_entries(waiting),
                      "num_free_blocks": num_free_blocks, "block_size": block_size, "max_num_seqs": max_num_seqs,
                      "token_budget": token_budget, "chunked_prefill": chunked_prefill}}


def _workload(generator, count, num_blocks, max_num_seqs, token_budget, chunked_prefill=True, block_size=4):
    requests = []
    for _ in range(count):
        requests.append({"arrival_step": integer(generator, 0, 8),
                         "prompt_len": integer(generator, 1, 24),
                         "max_tokens": integer(generator, 1, 10)})
    requests.sort(key=lambda r: r["arrival_step"])
    return {"engine": {"num_blocks": num_blocks, "block_size": block_size, "max_num_seqs": max_num_seqs,
                       "token_budget": token_budget, "chunked_prefill": chunked_prefill}, "requests": requests}


def _requests(*specs):
    return [{"arrival_step": a, "prompt_len": p, "max_tokens": m} for a, p, m in specs]


SCHEDULE_STEP = Exercise(
    name="schedule_step", symbol="schedule_step", notebook=NOTEBOOK_2,
    signature="schedule_step(running: list[dict], waiting: list[dict], num_free_blocks: int, block_size: int, "
              "max_num_seqs: int, token_budget: int, chunked_prefill: bool) -> dict  "
              "# {'scheduled': [[seq_id, num_tokens], ...], 'preempted': [seq_id, ...]}",
    reference=harness.ref_schedule_step, driver=harness.drive_schedule_step, hides=("reference.step_plan.plan_step",),
    cases=(
        Case("decode_first_then_a_chunk", lambda g: _state([(0, 10, 9)], [(1, 30, 0)], 100), Plans(),
             "one sequence decoding, one 30-token prompt waiting, budget 16: the decode runs first (1 token), "
             "the prompt gets the other 15 as a chunk"),
        Case("whole_prompts_without_chunking", lambda g: _state([(0, 10, 9)], [(1, 30, 0), (2, 5, 0)], 100,
                                                                chunked_prefill=False), Plans(),
             "without chunked prefill the 30-token prompt does not fit the 15 tokens left, so it waits, and the "
             "5-token prompt behind it may not overtake it"),
        Case("skip_what_does_not_fit_whole", lambda g: _state([(0, 10, 9), (1, 30, 10), (2, 8, 7)], [], 100,
                                                              chunked_prefill=False), Plans(),
             "without chunked prefill a running sequence whose 20 remaining prompt tokens exceed the 15 left is "
             "skipped this step, and the decode after it still runs"),
        Case("preempt_the_last_running", lambda g: _state([(0, 9, 8), (1, 6, 5), (2, 5, 4)], [(3, 3, 0)], 0),
             Plans(), "no free block and sequence 0 needs a third block for its 9th token: the last running "
                      "sequence (2) is preempted to make room; nothing is admitted in a step that preempted"),
        Case("preempt_itself", lambda g: _state([(0, 9, 8)], [(1, 2, 0)], 0), Plans(),
             "the only running sequence needs a block and there is no one else to evict: it preempts itself "
             "(and runs nothing)"),
        Case("seats_and_budget_run_out", lambda g: _state([(0, 5, 4), (1, 7, 6)], [(2, 3, 0), (3, 20, 0), (4, 2, 0)],
                                                          100, max_num_seqs=3, token_budget=8), Plans(),
             "two decodes, then admission in order until the seats (3) are full: only sequence 2 joins"),
        Case("skipped_sequence_keeps_its_seat", lambda g: _state([(0, 10, 9), (1, 40, 10)], [(2, 3, 0)], 100,
                                                                 max_num_seqs=2, chunked_prefill=False), Plans(),
             "without chunked prefill sequence 1's 30 prompt tokens do not fit the 15 left, so it is skipped; it "
             "stays running and keeps its seat, so with max_num_seqs 2 the seats are full and sequence 2 is not "
             "admitted (count len(running), not the sequences scheduled)"),
        Case("a_workload_step_by_step", lambda g: {"engine": {"num_blocks": 64, "block_size": 4, "max_num_seqs": 3,
                                                              "token_budget": 12, "chunked_prefill": True},
                                                   "requests": _requests((0, 20, 3), (0, 5, 6), (1, 9, 4), (2, 3, 5),
                                                                         (6, 14, 2))},
             Plans(), "five requests arriving over 6 steps, plenty of KV blocks: chunked prefills beside "
                             "decodes, sequences leaving and joining between steps (step k is your function's k-th "
                             "call, 0-based; a failure shows the state that step was given)"),
        Case("a_workload_under_memory_pressure", lambda g: {"engine": {"num_blocks": 7, "block_size": 4,
                                                                       "max_num_seqs": 4, "token_budget": 16,
                                                                       "chunked_prefill": True},
                                                            "requests": _requests((0, 6, 8), (0, 7, 8), (0, 5, 8),
                                                                                  (1, 3, 4))},
             Plans(), "four requests in 7 blocks of 4 tokens: sequences grow until someone must be "
                             "preempted, later recomputed (step k is your function's k-th call, 0-based; a "
                             "failure shows the state that step was given)"),
        Case("random_workload", lambda g: _workload(g, 10, 200, 4, 16), Plans(),
             "ten random requests, plenty of memory", visible=False, seed=20),
        Case("random_workload_tight", lambda g: _workload(g, 10, 12, 6, 24), Plans(),
             "ten random requests in 12 blocks: preemption", visible=False, seed=21),
        Case("random_workload_whole_prompts", lambda g: _workload(g, 8, 30, 3, 40, chunked_prefill=False),
             Plans(), "eight random requests without chunked prefill", visible=False, seed=22),
        Case("random_workload_few_seats", lambda g: _workload(g, 10, 60, 2, 24, chunked_prefill=False),
             Plans(), "ten random requests without chunked prefill, two seats", visible=False, seed=23),
    ),
)


def _serving(max_num_seqs, token_budget, *specs):
    requests = [{"request_id": f"r{i}", "prompt": [7 + i] * prompt_len, "max_tokens": max_tokens, "arrival_step": arrival}
                for i, (arrival, prompt_len, max_tokens) in enumerate(specs)]
    return {"engine": {"max_num_seqs": max_num_seqs, "token_budget": token_budget}, "requests": requests}


def _random_serving(generator, count):
    specs = sorted((integer(generator, 0, 30), integer(generator, 1, 40),
                    integer(generator, 1, 12)) for _ in range(count))
    return _serving(3, 24, *specs)


RUN_TO_COMPLETION = Exercise(
    name="run_to_completion", symbol="run_to_completion", notebook=NOTEBOOK_2,
    signature="run_to_completion(engine, requests: list[dict]) -> dict[str, dict]  "
              "# request_id -> {'token_ids': list[int], 'first_token_step': int, 'finish_step': int}",
    reference=harness.ref_run_to_completion, driver=harness.drive_run_to_completion,
    hides=("reference.workload.serve_arrivals",),
    cases=(
        Case("all_at_step_zero", lambda g: _serving(4, 64, (0, 5, 3), (0, 8, 1), (0, 3, 4)), Exact(),
             "three requests at step 0 that all fit: one step prefills them all, then they decode and leave "
             "one by one; step() is not called again once all have finished (a token_ids of the wrong length: "
             "out.outputs[0].token_ids is cumulative, keep the latest list rather than appending it)"),
        Case("staggered_arrivals", lambda g: _serving(2, 64, (0, 4, 4), (2, 6, 3), (3, 2, 2), (4, 9, 2)), Exact(),
             "requests arriving at steps 0, 2, 3, 4 with 2 seats: each is added before the step of its arrival, "
             "and some wait for a seat"),
        Case("idle_gap", lambda g: _serving(2, 64, (0, 3, 2), (20, 4, 2)), Exact(),
             "the second request arrives at step 20, long after the first finished: the clock jumps to 20 instead "
             "of stepping an idle engine (result['idle_steps'] counts the step() calls your loop made while the "
             "engine had nothing to run; result['requests'] is what your function returned)"),
        Case("chunked_prompt", lambda g: _serving(2, 8, (0, 20, 2), (1, 2, 3)), Exact(),
             "a 20-token prompt with an 8-token budget takes 3 steps before its first token; the request that "
             "arrives at step 1 is prefilled beside its chunks"),
        Case("random_workload", lambda g: _random_serving(g, 12), Exact(), "twelve random requests", visible=False,
             seed=30),
    ),
)


# ============================================================================================================
# Notebook 3: chunked prefill, latency metrics, policies
# ============================================================================================================


def _request_metrics(generator, count, max_tokens_high=40):
    metrics = []
    for _ in range(count):
        arrival = float(torch.rand(1, generator=generator)) * 10
        first = arrival + float(torch.rand(1, generator=generator)) * 3
        tokens = integer(generator, 1, max_tokens_high)
        finish = first + (tokens - 1) * float(torch.rand(1, generator=generator)) * 0.2
        metrics.append({"arrival_time": arrival, "first_token_time": first, "finish_time": finish,
                        "num_output_tokens": tokens})
    return {"metrics": metrics}


def _metric(arrival, first, finish, tokens):
    return {"arrival_time": arrival, "first_token_time": first, "finish_time": finish, "num_output_tokens": tokens}


LATENCY_SUMMARY = Exercise(
    name="latency_summary", symbol="latency_summary", notebook=NOTEBOOK_3,
    signature="latency_summary(metrics: list[dict]) -> dict[str, float]  "
              "# keys ttft_mean, ttft_p50, ttft_p90, tpot_mean, tpot_p50, tpot_p90",
    reference=harness.ref_latency_summary, hides=("reference.metrics.percentile", "reference.metrics.summarize"),
    cases=(
        Case("two_requests", lambda g: {"metrics": [_metric(0.0, 0.5, 2.5, 5), _metric(1.0, 1.25, 1.75, 3)]},
             Close(1e-9, 1e-9), "TTFT 0.5 and 0.25 s; TPOT (2.5 - 0.5) / 4 = 0.5 and 0.5 / 2 = 0.25 s; the p50 of "
                                "two values is their midpoint, the p90 is 90% of the way from the smaller"),
        Case("one_token_has_no_tpot", lambda g: {"metrics": [_metric(0.0, 1.0, 1.0, 1), _metric(0.0, 2.0, 3.0, 2)]},
             Close(1e-9, 1e-9), "a request with a single output token has a TTFT but no TPOT (no gap between "
                                "tokens): the TPOT statistics use only the other request"),
        Case("no_tpot_at_all", lambda g: {"metrics": [_metric(3.0, 4.0, 4.0, 1)]}, Close(1e-9, 1e-9),
             "when no request has two tokens, every TPOT statistic is float('nan') (not 0 or None)"),
        Case("interpolated_percentiles", lambda g: _request_metrics(g, 7), Close(1e-9, 1e-9),
             "seven random requests: percentiles interpolate linearly between sorted values (rank (n-1) q / 100)",
             seed=40),
        Case("many_requests", lambda g: _request_metrics(g, 200), Close(1e-9, 1e-9), "200 random requests",
             visible=False, seed=41),
    ),
)


def _seq(seq_id, arrival_time, num_uncomputed, priority=0, waiting_since_step=0):
    return {"seq_id": seq_id, "arrival_time": arrival_time, "priority": priority, "num_uncomputed": num_uncomputed,
            "waiting_since_step": waiting_since_step}


def _calls(policy, seqs, step, aging_steps=32):
    return {"calls": [{"policy": policy, "seq": seq, "step": step, "aging_steps": aging_steps} for seq in seqs]}


_MIXED = [_seq(0, 0.0, 300, 2), _seq(1, 0.5, 12, 1, 4), _seq(2, 0.5, 40, 0, 9), _seq(3, 1.0, 12, 1, 0),
          _seq(4, 2.0, 1, 3, 2)]


def _random_order(generator, policy):
    seqs = [_seq(i, float(integer(generator, 0, 5)), integer(generator, 1, 60),
                 integer(generator, 0, 4), integer(generator, 0, 80))
            for i in range(12)]
    return {"order": {"policy": policy, "seqs": seqs, "step": 100, "aging_steps": 16}}


POLICY_SORT_KEY = Exercise(
    name="policy_sort_key", symbol="policy_sort_key", notebook=NOTEBOOK_3,
    signature="policy_sort_key(policy: str, seq: dict, step: int, aging_steps: int) -> tuple",
    reference=harness.ref_policy_sort_key, driver=harness.drive_policy_sort_key,
    hides=("reference.policies.FCFS", "reference.policies.ShortestJobFirst", "reference.policies.PriorityWithAging"),
    cases=(
        Case("fcfs", lambda g: _calls("fcfs", _MIXED, 10), Exact(),
             "fcfs keys are (arrival_time, seq_id): arrival order, ties broken by seq_id"),
        Case("sjf", lambda g: _calls("sjf", _MIXED, 10), Exact(),
             "sjf keys are (num_uncomputed, arrival_time, seq_id): the fewest tokens left to compute first"),
        Case("priority_with_aging", lambda g: _calls("priority", _MIXED + [_seq(5, 2.5, 7, 1, 45)], 40, aging_steps=8),
             Exact(), "priority keys are (priority * aging_steps - steps waited, arrival_time, seq_id), steps waited "
                      "= max(0, step - waiting_since_step), never negative (sequence 5's waiting_since_step 45 is "
                      "later than step 40: it has waited 0 steps)"),
        Case("aging_orders", lambda g: {"order": {"policy": "priority", "seqs": [_seq(0, 3.0, 5, 0, 40),
                                                                                 _seq(1, 0.0, 5, 1, 0),
                                                                                 _seq(2, 1.0, 5, 0, 43)],
                                                  "step": 44, "aging_steps": 32}}, Exact(),
             "at step 44, priority-1 sequence 1 waiting since step 0 goes first, 1 * 32 - 44 = -12, before "
             "priority-0 sequences 0 (waiting since step 40: 0 * 32 - 4 = -4) and 2 (since step 43: -1): "
             "32 steps of waiting = one level"),
        Case("unknown_policy", lambda g: {"calls": _calls("fcfs", _MIXED[:1], 0)["calls"]
                                          + _calls("lifo", _MIXED[:1], 0)["calls"]}, Exact(),
             "a known policy returns its key; an unknown policy name raises ValueError. A raised exception is "
             "recorded as {'error': its type name}, so 'expected a dict, got list' means your function returned a "
             "key instead of raising"),
        Case("random_fcfs_order", lambda g: _random_order(g, "fcfs"), Exact(), "fcfs order of 12 random sequences",
             visible=False, seed=50),
        Case("random_sjf_order", lambda g: _random_order(g, "sjf"), Exact(), "sjf order of 12 random sequences",
             visible=False, seed=51),
        Case("random_priority_order", lambda g: _random_order(g, "priority"), Exact(),
             "priority order of 12 random sequences", visible=False, seed=52),
    ),
)


LAB = Lab(name="lab0.2", preamble=harness.PREAMBLE, memory_mb=LAB_MEMORY_MB, exercises=(
    FLOPS_PER_TOKEN, ARITHMETIC_INTENSITY, RUN_TO_COMPLETION, SCHEDULE_STEP, LATENCY_SUMMARY, POLICY_SORT_KEY,
))
