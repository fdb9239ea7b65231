"""EngineConfig: every knob of the engine in one validated place (the keyword arguments of LLM / LLMEngine).

This module does not import torch: the CLI builds its flags from EngineConfig, and `python -m reference --help`
must answer at once (torch takes seconds to import).
"""

from __future__ import annotations

import difflib
import math
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING

from .policies import POLICIES, SchedulingPolicy

if TYPE_CHECKING:
    import torch

    from .config import ModelConfig

KV_CACHE_KINDS = ("paged", "contiguous")

# The CPU's token budget caps the work of one step. A CPU has little compute to spare beyond reading the weights
# once, so past a few dozen tokens a step's time grows with every token it runs, and a step full of a long
# prompt's chunk is a gap in every other stream. About 32 GFLOP a step (128 tokens of SmolLM2) kept other streams'
# longest gap at 0.9 s while a 2,047-token prompt was prefilled on a 2-core VM (2.8 s at 512 tokens, 10.8 s at
# 2,048), and that prompt's first token came no later: the CPU does the same work in smaller steps.
# (benchmarks/cpu_long_prompt_gap.py; RESULTS.md, "The engine on a CPU against transformers".)
CPU_STEP_FLOPS = 32e9
CPU_BUDGET_LIMITS = (16, 2048)  # the budget is at least enough for 16 decodes, at most a long prompt in one step
# The paged cache gives a sequence blocks only as it grows, so seats are counted for sequences a quarter of
# max_model_len long on average; when more grow long than that, the scheduler preempts (and later recomputes).
CPU_AVERAGE_FILL = 4


@dataclass
class EngineConfig:
    model: str = "smollm2"
    device: str | torch.device | None = None  # None: cuda if available, else cpu
    dtype: str | torch.dtype | None = None  # None: float32 on CPU, bfloat16 on CUDA
    max_num_seqs: int | None = None  # sequences running at once (None: from memory, see cpu_sizes / kv.gpu_sizing)
    max_num_batched_tokens: int | None = None  # token budget per step (None: from the model's size on CPU, 8192 GPU)
    max_model_len: int | None = None  # prompt + output tokens per sequence (None: min(model's, 2048 CPU / 4096 GPU))
    block_size: int = 16  # KV slots per block (paged cache only; a power of two)
    num_kv_blocks: int | None = None  # KV capacity in blocks (paged only; None: from memory, see fill_defaults)
    gpu_memory_utilization: float = 0.9  # fraction of GPU memory the engine may use (weights + activations + KV)
    cpu_kv_cache_bytes: int = 1 << 30  # KV budget on CPU when num_kv_blocks is not given
    cpu_threads: int | None = None  # torch threads on the CPU (None: runtime.CpuThreads decides)
    kv_cache: str = "paged"
    enable_prefix_caching: bool = True
    attention_backend: str = "auto"
    enforce_eager: bool = False
    fused_kernels: bool = True  # on the GPU: add + RMSNorm, RMSNorm, RoPE, SiLU-and-multiply as Triton kernels
    pack_projections: bool | None = None  # q/k/v and gate/up as one matrix multiply each (None: on)
    async_scheduling: bool | None = None  # plan step N+1 while step N runs (None: on the GPU only)
    enable_chunked_prefill: bool = True
    scheduling_policy: str | SchedulingPolicy = "fcfs"
    seed: int | None = None  # seeds torch's global RNG (requests without their own seed draw from it)
    log_steps: bool = True  # keep a StepRecord of every step in engine.step_log (a server running for days: off)
    tensor_parallel_size: int = 1  # processes (ranks) that split the model: one per GPU, or gloo ranks on the CPU

    @classmethod
    def from_kwargs(cls, model: str, **kwargs) -> "EngineConfig":
        valid = [f.name for f in fields(cls)]
        for name in kwargs:
            if name not in valid:
                close = difflib.get_close_matches(name, valid, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise ValueError(f"unknown engine option {name!r}{hint}; valid options: {', '.join(valid)}")
        return cls(model=str(model), **kwargs)

    def __post_init__(self) -> None:
        for name in ("max_num_seqs", "max_num_batched_tokens", "max_model_len", "block_size", "num_kv_blocks",
                     "cpu_kv_cache_bytes", "cpu_threads"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise ValueError(f"{name} must be a positive integer or None, got {value!r}")
        if self.kv_cache not in KV_CACHE_KINDS:
            raise ValueError(f"kv_cache={self.kv_cache!r} is not available; choose one of: {', '.join(KV_CACHE_KINDS)}")
        if not isinstance(self.scheduling_policy, SchedulingPolicy) and self.scheduling_policy not in POLICIES:
            raise ValueError(
                f"scheduling_policy={self.scheduling_policy!r} is unknown; choose one of: {', '.join(POLICIES)}"
            )
        if self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size must be a power of two, got {self.block_size}")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")
        size = self.tensor_parallel_size
        if not isinstance(size, int) or isinstance(size, bool) or size < 1:
            raise ValueError(f"tensor_parallel_size must be a positive integer (1: one process), got {size!r}")
        if size > 1 and self.async_scheduling:
            raise ValueError("async_scheduling is not available with tensor_parallel_size > 1 (the ranks run the "
                             "plain synchronous runner); leave async_scheduling unset or False")

    def fill_defaults(self, device: torch.device, model_config: ModelConfig, dtype_bytes: int) -> None:
        """Resolve the None sizes for this device and model, then check they fit together (on a GPU the seats are
        left to kv.gpu_sizing, which measures free memory)."""
        gpu = device.type == "cuda"
        model_max_len = model_config.max_position_embeddings
        budget_given = self.max_num_batched_tokens is not None
        if self.async_scheduling is None:
            self.async_scheduling = gpu and self.tensor_parallel_size == 1
        if self.max_model_len is None:
            self.max_model_len = min(model_max_len, 4096 if gpu else 2048)
        if not gpu:
            seats, budget = cpu_sizes(model_config, dtype_bytes, self.cpu_kv_cache_bytes, self.max_model_len,
                                      self.kv_cache)
            self.max_num_seqs = self.max_num_seqs or min(seats, self.max_num_batched_tokens or seats)
            self.max_num_batched_tokens = self.max_num_batched_tokens or budget
        if self.max_num_batched_tokens is None:
            self.max_num_batched_tokens = 8192
        if not self.enable_chunked_prefill and not budget_given:  # whole prompts must fit one step
            self.max_num_batched_tokens = max(self.max_num_batched_tokens, self.max_model_len)
        if self.max_model_len > model_max_len:
            raise ValueError(f"max_model_len={self.max_model_len} exceeds the model's context length ({model_max_len})")
        if not self.enable_chunked_prefill and self.max_num_batched_tokens < self.max_model_len:
            raise ValueError(
                f"without chunked prefill a whole prompt must fit one step: max_num_batched_tokens "
                f"({self.max_num_batched_tokens}) must be >= max_model_len ({self.max_model_len})"
            )


def cpu_sizes(model_config: ModelConfig, dtype_bytes: int, kv_budget_bytes: int, max_model_len: int,
              kv_cache: str = "paged") -> tuple[int, int]:
    """The CPU's default (max_num_seqs, max_num_batched_tokens), from the model's size and the KV budget.

    Token budget: the power of two nearest to CPU_STEP_FLOPS / (2 x the weights a token multiplies by), within
    CPU_BUDGET_LIMITS: a step's latency stays bounded whatever the model (128 tokens for SmolLM2-135M, 16 for a
    1.5B model). Seats: the sequences the KV budget holds at 1/CPU_AVERAGE_FILL of max_model_len each (a whole
    max_model_len with the contiguous cache, which reserves it), but no more than the budget, so that every
    running sequence can decode in every step. At least one seat.
    """
    from .costs import linear_params  # imports torch (through kv.layout): only when an engine is built
    from .kv.layout import kv_bytes_per_token

    token_flops = 2 * linear_params(model_config)
    budget = 2 ** round(math.log2(CPU_STEP_FLOPS / token_flops))
    budget = min(max(budget, CPU_BUDGET_LIMITS[0]), CPU_BUDGET_LIMITS[1])
    kv_tokens = kv_budget_bytes // kv_bytes_per_token(model_config, dtype_bytes)
    tokens_per_seat = max_model_len if kv_cache == "contiguous" else max(1, max_model_len // CPU_AVERAGE_FILL)
    seats = max(1, min(budget, kv_tokens // tokens_per_seat))
    return seats, budget
