"""What one engine step costs, from the model's configuration alone, and what this machine can deliver (lab 0.2).

A step runs some sequences through the model; sequence i computes query_lens[i] new tokens and afterwards holds
context_lens[i] tokens in the KV cache (its new tokens are the last of them). The cost model counts:
- FLOPs: matrix multiplies only (2 FLOPs per multiply-add). Every token goes through every weight matrix
  (q, k, v, o, gate, up, down in each layer, and the LM head): 2 x linear_params(config) FLOPs. Attention adds,
  per layer and query head, 2 x head_dim for the scores q.k and 2 x head_dim for the weighted sum of values,
  for every key the token attends to. Norms, RoPE, softmax and the embedding lookup are left out (they are
  a few FLOPs per element, not per parameter).
- Bytes moved to and from memory: the weight matrices are read once per step, however many tokens run; each
  sequence reads the K/V of its whole context once and writes the K/V of its new tokens once. Activations are
  left out (they are small beside the weights for the batch sizes of a decode step).
Arithmetic intensity = FLOPs / bytes: how many FLOPs the step does per byte it moves. A machine that does
F FLOP/s and moves B bytes/s is memory-bound on any step whose intensity is below F / B (the roofline's ridge).

The speed floor of a whole workload (what `bench` compares an engine with) follows from the same counts:
decoding is memory-bound, so however clever the engine, output token i (0-based) of a request with a p-token
prompt must read the K/V of p + i tokens, and each decode step must read the weights once (there are at least as
many steps as the longest output). Nothing moves bytes faster than a device-to-device copy, so the floor is those
bytes over the measured copy bandwidth; an engine reaches a fraction floor / wall time of it (1.0 is
unreachable: prefill compute, sampling and the rest also take time).

The two `measure_*` functions time this machine's matrix multiply and memory copy for the roofline and the floor;
they work on CPU and CUDA devices. Nothing here loads a model or touches the engine.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from .config import ModelConfig
from .kv.layout import kv_bytes_per_token  # K and V of one token in every layer


def linear_params(config: ModelConfig) -> int:
    """Weights every token multiplies by: q/k/v/o and gate/up/down in each layer, plus the LM head (biases left out).

    The LM head counts even when it is tied to the embedding: the lookup reads one row, the head reads them all.
    """
    hidden, head_dim = config.hidden_size, config.head_dim
    attention = hidden * head_dim * (2 * config.num_attention_heads + 2 * config.num_key_value_heads)
    mlp = 3 * hidden * config.intermediate_size
    return config.num_hidden_layers * (attention + mlp) + hidden * config.vocab_size


def flops_per_token(config: ModelConfig, context_len: int) -> int:
    """Matrix-multiply FLOPs of one token's forward pass when it attends to context_len keys (itself included)."""
    if context_len < 1:
        raise ValueError(f"a token attends at least to itself: context_len must be >= 1, got {context_len}")
    attention = 4 * config.num_hidden_layers * config.num_attention_heads * config.head_dim * context_len
    return 2 * linear_params(config) + attention


def _check_step(query_lens: list[int], context_lens: list[int]) -> None:
    if len(query_lens) != len(context_lens):
        raise ValueError(f"{len(query_lens)} query lengths for {len(context_lens)} context lengths")
    for query_len, context_len in zip(query_lens, context_lens):
        if not 1 <= query_len <= context_len:
            raise ValueError(f"need 1 <= query_len <= context_len, got {query_len} and {context_len}")


def step_flops(config: ModelConfig, query_lens: list[int], context_lens: list[int]) -> int:
    """FLOPs of one step: new token j (0-based) of sequence i attends to context_lens[i] - query_lens[i] + 1 + j keys."""
    _check_step(query_lens, context_lens)
    total = 0
    for query_len, context_len in zip(query_lens, context_lens):
        first = context_len - query_len + 1
        total += sum(flops_per_token(config, first + j) for j in range(query_len))
    return total


def weight_bytes(config: ModelConfig, dtype_bytes: int) -> int:
    """Bytes of the weights a step reads once, however many tokens it runs (linear_params of them)."""
    return dtype_bytes * linear_params(config)


def step_bytes(config: ModelConfig, query_lens: list[int], context_lens: list[int], dtype_bytes: int) -> int:
    """Bytes one step moves: the weights once, each sequence's context K/V read once, its new K/V written once."""
    _check_step(query_lens, context_lens)
    kv_tokens = sum(context_lens) + sum(query_lens)
    return weight_bytes(config, dtype_bytes) + kv_tokens * kv_bytes_per_token(config, dtype_bytes)


def arithmetic_intensity(config: ModelConfig, query_lens: list[int], context_lens: list[int],
                         dtype_bytes: int) -> float:
    """FLOPs per byte moved of one step (step_flops / step_bytes)."""
    return step_flops(config, query_lens, context_lens) / step_bytes(config, query_lens, context_lens, dtype_bytes)


@dataclass(frozen=True)
class Floor:
    """The speed floor of a workload: the least time any engine needs on this device, from the bytes that must move."""

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


def workload_floor(input_lens: list[int], output_lens: list[int], kv_bytes_per_token: int, weight_bytes: int,
                   bandwidth: float) -> Floor:
    """The floor of a workload: its KV reads, one weight read per decode step, at `bandwidth` bytes/s."""
    return Floor(kv_tokens_read(input_lens, output_lens) * kv_bytes_per_token,
                 weight_bytes * max(output_lens, default=0), bandwidth)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _best_time(fn, device: torch.device, repeats: int) -> float:
    fn()  # warm-up: first-call allocation and kernel selection are not what we measure
    _synchronize(device)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        _synchronize(device)
        best = min(best, time.perf_counter() - start)
    return best


def measure_matmul_flops(device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32, size: int = 1024,
                         repeats: int = 5) -> float:
    """Achieved FLOP/s of a [size, size] @ [size, size] matrix multiply (2 * size**3 FLOPs), best of `repeats`."""
    device = torch.device(device)
    a = torch.randn(size, size, device=device).to(dtype)
    b = torch.randn(size, size, device=device).to(dtype)
    out = torch.empty(size, size, device=device, dtype=dtype)
    seconds = _best_time(lambda: torch.matmul(a, b, out=out), device, repeats)
    return 2 * size**3 / seconds


def measure_memory_bandwidth(device: str | torch.device = "cpu", nbytes: int = 1 << 28, repeats: int = 5) -> float:
    """Achieved bytes/s of copying an nbytes buffer into another (nbytes read + nbytes written), best of `repeats`.

    Use a buffer much larger than the last-level cache (the default 256 MiB is), or this measures the cache.
    """
    device = torch.device(device)
    source = torch.ones(nbytes // 4, device=device, dtype=torch.float32)
    target = torch.empty_like(source)
    seconds = _best_time(lambda: target.copy_(source), device, repeats)
    return 2 * source.numel() * 4 / seconds
