"""Lab 0.2 (Prefill vs decode): what runs beside learner code: the preamble, the references and the drivers.

The references are thin adapters over the `reference` engine: the cost model of reference/costs.py (notebook 1),
the scheduler's plain-state step and the arrival-driven serving loop (notebook 2), the latency metrics and the
scheduling policies (notebook 3). Everything the references need from `reference` is bound at import time, so a
grader that later hides those symbols from learner code does not break the stand-ins. The cases are in
autograder/labs/lab0_2.py.
"""

from __future__ import annotations

import copy
from typing import Any

from reference import costs
from reference.config import ModelConfig
from reference.kv import BlockManager, ContiguousKVManager
from reference.metrics import percentile
from reference.outputs import RequestMetrics
from reference.policies import POLICIES
from reference.sampling import SamplingParams
from reference.scheduler import Scheduler
from reference.sequence import Sequence
from reference.step_plan import PlanScheduler, plan_step
from reference.workload import serve_arrivals

from .fake_engine import FakeEngine

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


def _replay_plans(fn, engine: dict[str, Any], requests: list[dict[str, Any]], max_steps: int = 300) -> list[Any]:
    """Replay a workload on the fake engine (fake_engine.py), each step planned by `fn` through the engine's
    PlanScheduler (which checks the plan and carries it out); one trace entry per step: {"state": what the
    function was given, "plan": what it returned}, or {"error": ..., "state": ...} and stop. The state lets the
    feedback say what the step looked like (it is equal on both sides up to the first step whose plan differs)."""
    trace: list[Any] = []

    def plan_fn(**state):
        trace.append({"state": state})
        trace[-1]["plan"] = _plain_plan(fn(*copy.deepcopy(state).values()))
        return trace[-1]["plan"]

    kv = BlockManager(engine["num_blocks"], engine["block_size"], enable_prefix_caching=False)
    # FCFS over sequences that all arrive at time 0 orders them by seq_id, as the plain state lists them.
    scheduler = PlanScheduler(plan_fn, kv, engine["max_num_seqs"], engine["token_budget"], "fcfs",
                              engine["chunked_prefill"])
    fake = FakeEngine(scheduler)
    for step in range(max_steps):
        for seq_id, request in enumerate(requests):
            if request["arrival_step"] == step:
                params = SamplingParams(max_tokens=request["max_tokens"], ignore_eos=True)
                fake.add_sequence(Sequence(str(seq_id), [0] * request["prompt_len"], params, seq_id=seq_id))
        if not fake.has_unfinished_requests() and all(r["arrival_step"] < step for r in requests):
            break
        try:
            fake.step()
        except NotImplementedError:
            raise
        except Exception as exc:
            trace[-1] = {"error": f"{type(exc).__name__}: {exc}", "state": trace[-1]["state"]}
            break
    return trace


def drive_schedule_step(fn, inputs: dict[str, Any]) -> Any:
    """One step from a given state ("state") -> {"state", "plan"}, or a whole workload replayed step by step
    ("engine", "requests") -> a list of those (see _replay_plans)."""
    if "state" in inputs:
        state = dict(inputs["state"])
        return {"state": state, "plan": _plain_plan(fn(*copy.deepcopy(state).values()))}
    return _replay_plans(fn, inputs["engine"], inputs["requests"])


def ref_run_to_completion(engine, requests: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The engine's serving loop over arrivals: reference.workload.serve_arrivals."""
    return serve_arrivals(engine, requests)


def drive_run_to_completion(fn, inputs: dict[str, Any]) -> Any:
    """The loop's results per request, and how often it called step() on an idle engine (0 expected)."""
    max_num_seqs = inputs["engine"]["max_num_seqs"]
    engine = FakeEngine(Scheduler(ContiguousKVManager(max_num_seqs, 4096), max_num_seqs,
                                  inputs["engine"]["token_budget"]))
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
