"""The speed floor of a workload: the least time any engine needs on this device, from the bytes that must move.

Decoding is memory-bound: each output token is computed from the K and V of its whole context, and each decode
step reads every weight once. So however clever the engine, it must at least
- read the KV cache of every output token's context once: output token i (0-based) of a request with a
  p-token prompt attends over p + i tokens, so a request with o outputs reads o*p + o*(o-1)/2 tokens' worth;
- read the weights once per decode step, and there are at least as many steps as the longest output;
and nothing moves bytes faster than a device-to-device copy. The floor is those bytes over the measured copy
bandwidth; an engine's achieved fraction is floor / its wall time (1.0 would be perfect, and is unreachable:
prefill compute, sampling and the rest also take time).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Floor:
    kv_bytes: int  # KV cache reads that output tokens need
    weight_bytes: int  # weight reads of the decode steps
    bandwidth: float  # measured copy bandwidth, bytes/s (read + write)

    @property
    def total_bytes(self) -> int:
        return self.kv_bytes + self.weight_bytes

    @property
    def seconds(self) -> float:
        return self.total_bytes / self.bandwidth

    def fraction(self, wall_time: float) -> float:
        """Achieved fraction of the floor for a run that took wall_time seconds."""
        return self.seconds / wall_time

    def describe(self, wall_time: float | None = None) -> str:
        text = (f"floor: {self.kv_bytes / 1e9:.1f} GB of KV + {self.weight_bytes / 1e9:.1f} GB of weights must be "
                f"read; at the measured copy bandwidth of {self.bandwidth / 1e9:.0f} GB/s that takes "
                f"{self.seconds:.2f} s")
        if wall_time is not None:
            text += f"; this run reached {self.fraction(wall_time):.2f} of it"
        return text


def kv_tokens_read(input_lens: list[int], output_lens: list[int]) -> int:
    """Context tokens whose K and V the output tokens must read, summed over requests."""
    return sum(o * p + o * (o - 1) // 2 for p, o in zip(input_lens, output_lens))


def workload_floor(
    input_lens: list[int], output_lens: list[int], kv_bytes_per_token: int, weight_bytes: int, bandwidth: float,
) -> Floor:
    return Floor(kv_tokens_read(input_lens, output_lens) * kv_bytes_per_token,
                 weight_bytes * max(output_lens, default=0), bandwidth)


def parameter_bytes(model: torch.nn.Module) -> int:
    """Bytes of the model's parameters, a tied matrix counted once (parameters() yields it once)."""
    return sum(p.numel() * p.element_size() for p in model.parameters())


def copy_bandwidth(device: torch.device | str, size_bytes: int = 1 << 30, repeats: int = 10) -> float:
    """Bytes/s of copying one big buffer into another on `device`, counting the read and the write."""
    device = torch.device(device)
    if device.type == "cpu":
        size_bytes = min(size_bytes, 256 << 20)  # enough to leave the caches; keeps this quick on a laptop
    source = torch.empty(size_bytes, dtype=torch.uint8, device=device)
    target = torch.empty_like(source)
    target.copy_(source)  # warm-up: first-touch page faults, lazy CUDA initialisation
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(repeats):
            target.copy_(source)
        end.record()
        end.synchronize()
        seconds = start.elapsed_time(end) / 1e3
    else:
        started = time.perf_counter()
        for _ in range(repeats):
            target.copy_(source)
        seconds = time.perf_counter() - started
    return 2 * size_bytes * repeats / seconds
