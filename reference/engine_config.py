"""EngineConfig: every knob of the engine in one validated place (the keyword arguments of LLM / LLMEngine)."""

from __future__ import annotations

import difflib
from dataclasses import dataclass, fields

import torch

from .policies import POLICIES, SchedulingPolicy

KV_CACHE_KINDS = ("paged", "contiguous")


@dataclass
class EngineConfig:
    model: str = "smollm2"
    device: str | torch.device | None = None  # None: cuda if available, else cpu
    dtype: str | torch.dtype | None = None  # None: float32 on CPU, bfloat16 on CUDA
    max_num_seqs: int | None = None  # sequences running at once (None: 8 on CPU, from memory on GPU)
    max_num_batched_tokens: int | None = None  # token budget per step (None: 512 on CPU, 8192 on GPU)
    max_model_len: int | None = None  # prompt + output tokens per sequence (None: min(model's, 2048 CPU / 4096 GPU))
    block_size: int = 16  # KV slots per block (paged cache only; a power of two)
    num_kv_blocks: int | None = None  # KV capacity in blocks (paged only; None: from memory, see fill_defaults)
    gpu_memory_utilization: float = 0.9  # fraction of GPU memory the engine may use (weights + activations + KV)
    cpu_kv_cache_bytes: int = 1 << 30  # KV budget on CPU when num_kv_blocks is not given
    kv_cache: str = "paged"
    enable_prefix_caching: bool = True
    attention_backend: str = "auto"
    enforce_eager: bool = False
    fused_kernels: bool = True  # on the GPU: RMSNorm, RoPE, SiLU-and-multiply as fused Triton kernels
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
                     "cpu_kv_cache_bytes"):
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

    def fill_defaults(self, device: torch.device, model_max_len: int) -> None:
        """Resolve the None sizes for this device and model, then check they fit together."""
        gpu = device.type == "cuda"
        if self.async_scheduling is None:
            self.async_scheduling = gpu and self.tensor_parallel_size == 1
        if self.max_num_seqs is None and not gpu:  # on a GPU: from its free memory (kv/gpu_sizing.py)
            self.max_num_seqs = 8
        if self.max_model_len is None:
            self.max_model_len = min(model_max_len, 4096 if gpu else 2048)
        if self.max_num_batched_tokens is None:
            self.max_num_batched_tokens = 8192 if gpu else 512
            if not self.enable_chunked_prefill:
                self.max_num_batched_tokens = max(self.max_num_batched_tokens, self.max_model_len)
        if self.max_model_len > model_max_len:
            raise ValueError(f"max_model_len={self.max_model_len} exceeds the model's context length ({model_max_len})")
        if not self.enable_chunked_prefill and self.max_num_batched_tokens < self.max_model_len:
            raise ValueError(
                f"without chunked prefill a whole prompt must fit one step: max_num_batched_tokens "
                f"({self.max_num_batched_tokens}) must be >= max_model_len ({self.max_model_len})"
            )
