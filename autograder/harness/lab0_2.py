"""Lab 0.2 (Prefill vs decode): what runs beside learner code: the preamble, the references and the drivers.

The references are thin adapters over the `reference` engine: the cost model of reference/costs.py (notebook 1),
the scheduler's plain-state step and the arrival-driven serving loop (notebook 2), the latency metrics and the
scheduling policies (notebook 3). Everything the references need from `reference` is bound at import time, so a
grader that later hides those symbols from learner code does not break the stand-ins. The cases are in
autograder/labs/lab0_2.py.
"""

from __future__ import annotations

import copy
import zlib
from typing import Any

from reference import costs
from reference.config import ModelConfig
from reference.kv import ContiguousKVManager, blocks_for_tokens
from reference.metrics import percentile
from reference.outputs import CompletionOutput, RequestMetrics, RequestOutput
from reference.policies import POLICIES
from reference.sampling import SamplingParams
from reference.scheduler import Scheduler
from reference.sequence import Sequence
from reference.step_plan import plan_step
from reference.workload import serve_arrivals

# Exercise cells may rely on these imports and nothing else from their notebook.
PREAMBLE = """\
import math
from collections import deque
import torch
from reference import SamplingParams
"""


_step_flops, _step_bytes, _flops_per_token = costs.step_flops, costs.step_bytes, costs.flops_per_token


# ============================================================================================================
# Notebook 1: the two phases
# ============================================================================================================


def _model_config(config: dict[str, Any]) -> ModelConfig:
    return ModelConfig.from_hf_dict({"model_type": "llama", **config})


def ref_flops_per_token(config: dict[str, Any], context_len: int) -> int:
    return _flops_per_token(_model_config(config), context_len)


def ref_arithmetic_intensity(config: dict[str, Any], query_lens: list[int], context_lens: list[int],
                             dtype_bytes: int) -> float:
    model_config = _model_config(config)
    return _step_flops(model_config, query_lens, context_lens) / _step_bytes(model_config, query_lens, context_lens,
                                                                            dtype_bytes)


# ============================================================================================================
# Notebook 2: batching, the scheduler's step, the engine loop
# ============================================================================================================


def ref_schedule_step(running: list[dict[str, Any]], waiting: list[dict[str, Any]], num_free_blocks: int,
                      block_size: int, max_num_seqs: int, token_budget: int,
                      chunked_prefill: bool = True) -> dict[str, Any]:
    """The engine's plan for one step: reference.step_plan.plan_step."""
    return plan_step(running, waiting, num_free_blocks, block_size, max_num_seqs, token_budget, chunked_prefill)


def _plain_plan(plan: Any) -> dict[str, Any]:
    """The learner's plan as plain lists (ints stay ints); the codec rejects anything stranger later."""
    if not isinstance(plan, dict) or set(plan) != {"scheduled", "preempted"}:
        raise ValueError(f"schedule_step must return a dict with keys 'scheduled' and 'preempted', got {type(plan).__name__}"
                         + (f" with keys {sorted(map(str, plan))}" if isinstance(plan, dict) else ""))
    return {"scheduled": [list(pair) for pair in plan["scheduled"]], "preempted": list(plan["preempted"])}


def _simulate_schedule(fn, engine: dict[str, Any], requests: list[dict[str, Any]], max_steps: int = 300) -> list[Any]:
    """Replay a workload with a fake model (every scheduled token is computed; a sequence that reaches its end gets
    one new token) on the plain state; one trace entry per step: {"state": what the function was given, "plan":
    what it returned}, or {"error": ..., "state": ...} and stop. The state lets the feedback say what the step
    looked like (it is equal on both sides up to the first step whose plan differs)."""
    block_size = engine["block_size"]
    free = engine["num_blocks"]
    seqs: dict[int, dict[str, int]] = {}
    running: list[int] = []
    waiting: list[int] = []
    trace: list[Any] = []
    for step in range(max_steps):
        for seq_id, request in enumerate(requests):
            if request["arrival_step"] == step:
                seqs[seq_id] = {"num_tokens": request["prompt_len"], "num_computed": 0,
                                "prompt_len": request["prompt_len"], "max_tokens": request["max_tokens"]}
                waiting.append(seq_id)
        if not running and not waiting and all(r["arrival_step"] < step for r in requests):
            break
        plain = lambda ids: [{"seq_id": i, "num_tokens": seqs[i]["num_tokens"],  # noqa: E731
                              "num_computed": seqs[i]["num_computed"]} for i in sorted(ids)]
        state = {"running": plain(running), "waiting": plain(waiting), "num_free_blocks": free,
                 "block_size": block_size, "max_num_seqs": engine["max_num_seqs"],
                 "token_budget": engine["token_budget"], "chunked_prefill": engine["chunked_prefill"]}
        try:
            plan = _plain_plan(fn(*copy.deepcopy(state).values()))
            free = _apply_plan(plan, seqs, running, waiting, free, engine)
        except NotImplementedError:
            raise
        except Exception as exc:
            trace.append({"error": f"{type(exc).__name__}: {exc}", "state": state})
            break
        trace.append({"state": state, "plan": plan})
    return trace


def _apply_plan(plan, seqs, running, waiting, free, engine) -> int:
    block_size = engine["block_size"]
    for seq_id in plan["preempted"]:
        if seq_id not in running:
            raise ValueError(f"preempted {seq_id!r}, which is not running")
        free += blocks_for_tokens(seqs[seq_id]["num_computed"], block_size)
        seqs[seq_id]["num_computed"] = 0
        running.remove(seq_id)
        waiting.append(seq_id)
    total = 0
    done = set()
    for seq_id, num_tokens in plan["scheduled"]:
        if seq_id in done or seq_id in plan["preempted"] or (seq_id not in running and seq_id not in waiting):
            raise ValueError(f"scheduled {seq_id!r}: unknown, preempted or listed twice")
        seq = seqs[seq_id]
        if not 1 <= num_tokens <= seq["num_tokens"] - seq["num_computed"]:
            raise ValueError(f"scheduled {num_tokens} tokens of {seq_id}, which has "
                             f"{seq['num_tokens'] - seq['num_computed']} uncomputed")
        free -= blocks_for_tokens(seq["num_computed"] + num_tokens, block_size) - blocks_for_tokens(seq["num_computed"], block_size)
        if free < 0:
            raise ValueError(f"scheduling {seq_id} needs more KV blocks than are free")
        if seq_id in waiting:
            waiting.remove(seq_id)
            running.append(seq_id)
        done.add(seq_id)
        total += num_tokens
        seq["num_computed"] += num_tokens
    if total > engine["token_budget"] or len(running) > engine["max_num_seqs"]:
        raise ValueError(f"the plan runs {total} tokens (budget {engine['token_budget']}) with {len(running)} "
                         f"sequences running (max {engine['max_num_seqs']})")
    for seq_id in list(running):
        seq = seqs[seq_id]
        if seq["num_computed"] == seq["num_tokens"]:  # the whole sequence is computed: the model samples a token
            seq["num_tokens"] += 1
            if seq["num_tokens"] - seq["prompt_len"] >= seq["max_tokens"]:
                free += blocks_for_tokens(seq["num_computed"], block_size)
                running.remove(seq_id)
    return free


def drive_schedule_step(fn, inputs: dict[str, Any]) -> Any:
    """One step from a given state ("state") -> {"state", "plan"}, or a whole workload replayed step by step
    ("engine", "requests") -> a list of those (see _simulate_schedule)."""
    if "state" in inputs:
        state = dict(inputs["state"])
        return {"state": state, "plan": _plain_plan(fn(*copy.deepcopy(state).values()))}
    return _simulate_schedule(fn, inputs["engine"], inputs["requests"])

def ref_run_to_completion(engine, requests: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The engine's serving loop over arrivals: reference.workload.serve_arrivals."""
    return serve_arrivals(engine, requests)


class ToyEngine:
    """An engine-shaped test double: the engine's Scheduler over a contiguous KV manager, a hash for a model.

    It keeps LLMEngine's contract for add_request / step / has_unfinished_requests: step() returns a cumulative
    RequestOutput for each request that got a token (in batch order), finished=True on the step that ends it.
    """

    def __init__(self, max_num_seqs: int, token_budget: int) -> None:
        self.scheduler = Scheduler(ContiguousKVManager(max_num_seqs, 4096), max_num_seqs, token_budget)
        self.live: dict[str, Sequence] = {}
        self.num_steps = 0
        self.idle_steps = 0  # step() calls with nothing to run: a serving loop should not make them

    def add_request(self, request_id: str, prompt: list[int], params: SamplingParams | None = None,
                    priority: int = 0) -> None:
        if not isinstance(params, SamplingParams) or request_id in self.live or not prompt:
            raise ValueError("add_request(request_id, prompt token ids, SamplingParams): bad or duplicate request")
        seq = Sequence(request_id, [int(t) for t in prompt], params, arrival_time=float(self.num_steps))
        self.live[request_id] = seq
        self.scheduler.add(seq)

    def has_unfinished_requests(self) -> bool:
        return bool(self.live)

    def step(self) -> list[RequestOutput]:
        self.idle_steps += not self.live
        batch = self.scheduler.schedule()
        self.num_steps += 1
        outputs = []
        for seq, num_tokens in zip(batch.seqs, batch.num_tokens):
            seq.num_computed_tokens += num_tokens
            if seq.num_computed_tokens < seq.num_tokens:
                continue
            seq.token_ids.append(zlib.crc32(str(seq.token_ids).encode()) % 1000)
            finished = seq.num_output_tokens >= seq.params.max_tokens
            if finished:
                self.scheduler.finish(seq, "length")
                del self.live[seq.request_id]
            completion = CompletionOutput(0, "", seq.output_token_ids, "length" if finished else None)
            outputs.append(RequestOutput(seq.request_id, None, seq.prompt_token_ids, [completion], finished,
                                         RequestMetrics(arrival_time=0.0)))
        return outputs


def drive_run_to_completion(fn, inputs: dict[str, Any]) -> Any:
    """The loop's results per request, and how often it called step() on an idle engine (0 expected)."""
    engine = ToyEngine(inputs["engine"]["max_num_seqs"], inputs["engine"]["token_budget"])
    results = fn(engine, [dict(r) for r in inputs["requests"]])
    if not isinstance(results, dict):
        raise ValueError(f"run_to_completion must return a dict, got {type(results).__name__}")
    requests = {request_id: {"token_ids": list(entry["token_ids"]), "first_token_step": entry["first_token_step"],
                             "finish_step": entry["finish_step"]} for request_id, entry in results.items()}
    return {"requests": requests, "idle_steps": engine.idle_steps}


# ============================================================================================================
# Notebook 3: chunked prefill, latency metrics, policies
# ============================================================================================================

_percentile, _policies = percentile, dict(POLICIES)


def ref_latency_summary(metrics: list[dict[str, Any]]) -> dict[str, float]:
    series: dict[str, list[float]] = {"ttft": [], "tpot": []}
    for entry in metrics:
        request = RequestMetrics(arrival_time=entry["arrival_time"], first_token_time=entry["first_token_time"],
                                 finish_time=entry["finish_time"], num_output_tokens=entry["num_output_tokens"])
        series["ttft"].append(request.ttft)
        if request.tpot is not None:
            series["tpot"].append(request.tpot)
    summary = {}
    for name, values in series.items():
        summary[f"{name}_mean"] = sum(values) / len(values) if values else float("nan")
        for q in (50, 90):
            summary[f"{name}_p{q}"] = _percentile(values, q)
    return summary


def ref_policy_sort_key(policy: str, seq: dict[str, Any], step: int, aging_steps: int) -> tuple:
    if policy not in _policies:
        raise ValueError(f"unknown policy {policy!r}")
    chosen = _policies[policy](aging_steps) if policy == "priority" else _policies[policy]()
    sequence = Sequence("r", [0] * seq["num_uncomputed"], SamplingParams(), priority=seq["priority"],
                        arrival_time=seq["arrival_time"], seq_id=seq["seq_id"])
    sequence.waiting_since_step = seq["waiting_since_step"]
    return chosen.sort_key(sequence, step)


def drive_policy_sort_key(fn, inputs: dict[str, Any]) -> Any:
    """Either a list of calls (each key as a list, or {"error": exception type}), or the order a key sorts into."""
    if "order" in inputs:
        order = inputs["order"]
        keyed = [(tuple(fn(order["policy"], seq, order["step"], order["aging_steps"])), seq["seq_id"])
                 for seq in order["seqs"]]
        return [seq_id for _, seq_id in sorted(keyed, key=lambda pair: pair[0])]
    results = []
    for call in inputs["calls"]:
        try:
            results.append(list(fn(call["policy"], call["seq"], call["step"], call["aging_steps"])))
        except NotImplementedError:
            raise
        except Exception as exc:
            results.append({"error": type(exc).__name__})
    return results
