"""The serving loop with arrivals: requests join a running engine at given steps, as they would on a server (lab 0.2).

LLM.generate adds every prompt up front; a server adds requests while others are running, and that is where
continuous batching pays. serve_arrivals replays such a workload on a logical clock of engine steps, so that a run
is reproducible (the same steps, whatever the machine's speed) and timelines can be drawn in steps:

    clock = 0; before each step, add (in list order) every request whose arrival_step <= clock;
    if the engine then has nothing to do, jump the clock to the next arrival instead of stepping;
    otherwise call engine.step(), note what it returned at this clock value, and advance the clock by one.

It works with any object that has LLMEngine's add_request / step / has_unfinished_requests.
"""

from __future__ import annotations

from typing import Any

from .sampling import SamplingParams


def serve_arrivals(engine, requests: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Serve `requests` on `engine`, each arriving at its step, until all have finished.

    requests: [{"request_id": str, "prompt": list[int], "max_tokens": int, "arrival_step": int}, ...] sorted by
        arrival_step; each is generated greedily (temperature 0) for exactly max_tokens tokens (ignore_eos).
    Returns {request_id: {"token_ids": the output token ids, "first_token_step": the clock of the step that gave
        its first output token, "finish_step": the clock of the step that finished it}}.
    """
    results: dict[str, dict[str, Any]] = {}
    pending = list(requests)
    clock = 0
    while pending or engine.has_unfinished_requests():
        if not engine.has_unfinished_requests() and pending[0]["arrival_step"] > clock:
            clock = pending[0]["arrival_step"]  # nothing to run until the next arrival
        while pending and pending[0]["arrival_step"] <= clock:
            request = pending.pop(0)
            params = SamplingParams(temperature=0.0, max_tokens=request["max_tokens"], ignore_eos=True)
            engine.add_request(request["request_id"], list(request["prompt"]), params)
        for output in engine.step():
            entry = results.setdefault(output.request_id, {"token_ids": [], "first_token_step": None,
                                                           "finish_step": None})
            entry["token_ids"] = list(output.outputs[0].token_ids)
            if entry["first_token_step"] is None and entry["token_ids"]:
                entry["first_token_step"] = clock
            if output.finished:
                entry["finish_step"] = clock
        clock += 1
    return results
