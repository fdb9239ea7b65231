"""Engine metrics: a record of every step, and a summary of a finished workload (throughput, percentiles)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from .outputs import RequestOutput


@dataclass
class StepRecord:
    """What one engine step did: enough to draw a batching timeline or a token-budget plot."""

    step: int
    start: float
    num_prefill_tokens: int
    num_decode_tokens: int
    num_running: int
    num_waiting: int
    num_preempted: int
    kv_usage: float
    scheduled: list[tuple[str, int, int]]  # (request_id, sample index, tokens run) for each scheduled sequence
    end: float = 0.0

    @classmethod
    def of(cls, step, start, batch, scheduler, kv_manager) -> "StepRecord":
        """Taken before the engine records the step as computed (so prefill and decode are told apart)."""
        return cls(
            step=step, start=start,
            num_prefill_tokens=batch.num_prefill_tokens, num_decode_tokens=batch.num_decode_tokens,
            num_running=len(scheduler.running), num_waiting=len(scheduler.waiting),
            num_preempted=len(batch.preempted), kv_usage=kv_manager.usage,
            scheduled=[(s.request_id, s.sample_index, n) for s, n in zip(batch.seqs, batch.num_tokens)],
        )


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0-100) by linear interpolation between order statistics; nan for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low, high = math.floor(rank), math.ceil(rank)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


class Throughput:
    """Tokens per second over a run's wall time (for a class with prompt_tokens, output_tokens and wall_time)."""

    @property
    def output_throughput(self) -> float:
        return self.output_tokens / self.wall_time

    @property
    def total_throughput(self) -> float:
        return (self.prompt_tokens + self.output_tokens) / self.wall_time


@dataclass
class Summary(Throughput):
    num_requests: int
    wall_time: float
    prompt_tokens: int
    output_tokens: int
    latencies: dict[str, dict[str, float]]  # metric -> {"mean", "p50", "p90", "p99"} in seconds

    def table(self) -> str:
        lines = [
            f"requests {self.num_requests}, wall time {self.wall_time:.2f} s, "
            f"prompt tokens {self.prompt_tokens}, output tokens {self.output_tokens}",
            f"throughput: {self.output_throughput:.1f} output tok/s, {self.total_throughput:.1f} total tok/s, "
            f"{self.num_requests / self.wall_time:.2f} req/s",
            f"| {'latency (ms)':<14} | {'mean':>9} | {'P50':>9} | {'P90':>9} | {'P99':>9} |",
            f"|{'-' * 16}|{'-' * 11}|{'-' * 11}|{'-' * 11}|{'-' * 11}|",
        ]
        for name, stats in self.latencies.items():
            cells = " | ".join(f"{stats[k] * 1000:>9.1f}" for k in ("mean", "p50", "p90", "p99"))
            lines.append(f"| {name:<14} | {cells} |")
        return "\n".join(lines)


def summarize(outputs: list[RequestOutput], wall_time: float) -> Summary:
    series = {"TTFT": [], "TPOT": [], "end-to-end": [], "queue": []}
    for out in outputs:
        m = out.metrics
        for name, value in (("TTFT", m.ttft), ("TPOT", m.tpot), ("end-to-end", m.e2e_latency), ("queue", m.queue_time)):
            if value is not None:
                series[name].append(value)
    latencies = {
        name: {"mean": sum(v) / len(v) if v else math.nan, **{f"p{q}": percentile(v, q) for q in (50, 90, 99)}}
        for name, v in series.items()
    }
    return Summary(
        num_requests=len(outputs), wall_time=wall_time,
        prompt_tokens=sum(len(o.prompt_token_ids) for o in outputs),
        output_tokens=sum(len(c.token_ids) for o in outputs for c in o.outputs),
        latencies=latencies,
    )
