"""What the engine hands back: RequestOutput (one per request) holding a CompletionOutput per sample
(with SamplingParams.best_of: the n samples of best_of with the highest cumulative logprob)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class RequestMetrics:
    """Timestamps in time.monotonic() seconds; derived latencies in seconds (None until known)."""

    arrival_time: float
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    finish_time: float | None = None
    num_prompt_tokens: int = 0
    num_output_tokens: int = 0
    num_preemptions: int = 0

    @property
    def queue_time(self) -> float | None:
        return None if self.first_scheduled_time is None else self.first_scheduled_time - self.arrival_time

    @property
    def ttft(self) -> float | None:
        """Time to first token: arrival to the first output token."""
        return None if self.first_token_time is None else self.first_token_time - self.arrival_time

    @property
    def e2e_latency(self) -> float | None:
        return None if self.finish_time is None else self.finish_time - self.arrival_time

    @property
    def tpot(self) -> float | None:
        """Time per output token after the first (mean inter-token latency)."""
        if self.finish_time is None or self.first_token_time is None or self.num_output_tokens < 2:
            return None
        return (self.finish_time - self.first_token_time) / (self.num_output_tokens - 1)


@dataclass
class CompletionOutput:
    index: int  # which of the request's samples (with best_of: of its best_of samples, so it may exceed n - 1)
    text: str
    token_ids: list[int]
    finish_reason: str | None = None  # "stop", "length", "abort", or None while running
    # Per output token: (logprob of the chosen token, {token_id: logprob} of the top tokens); None if not asked.
    logprobs: list[tuple[float, dict[int, float]]] | None = None
    # The sum of the chosen tokens' logprobs (what best_of ranks by); None when no logprobs were computed.
    cumulative_logprob: float | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    metrics: RequestMetrics
