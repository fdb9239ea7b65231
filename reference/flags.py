"""Command-line flags, declared once for generate, chat, bench and serve.

The engine flags are derived from EngineConfig: every field becomes `--field-name` with its type (a bool field
gets `--x / --no-x`), so a new engine option is a new flag everywhere. Left out, a flag keeps the engine's
default (every flag defaults to None and engine_options drops it). The model flags and the sampling flags are
the ones every command shares.
"""

from __future__ import annotations

import argparse
from dataclasses import MISSING, fields

from .engine_config import KV_CACHE_KINDS, EngineConfig
from .policies import POLICIES

MODEL_FLAGS = ("model", "device", "dtype")
HELP = {
    "model": "'smollm2' (default), 'random:<architecture>', a checkpoint directory or a hub id",
    "device": "cpu, cuda or cuda:N (default: cuda if available)",
    "dtype": "float32, float16 or bfloat16 (default: fp32 CPU, bf16 GPU)",
    "max_num_seqs": "sequences running at once (default: from the KV memory; CPU: the KV budget at a quarter of "
                    "max_model_len a seat, at most the token budget, 45 for SmolLM2)",
    "max_num_batched_tokens": "token budget per step (default 8192 GPU; CPU: ~32 GFLOP a step, 128 for SmolLM2: "
                              "lower keeps streams steadier while a long prompt is prefilled, higher gives that "
                              "prompt its first token sooner)",
    "max_model_len": "prompt + output tokens per sequence (default: the model's, at most 2048 CPU / 4096 GPU)",
    "block_size": "KV slots per block, a power of two",
    "num_kv_blocks": "KV cache capacity in blocks (default: from memory)",
    "gpu_memory_utilization": "fraction of GPU memory the engine may use (weights + activations + KV)",
    "cpu_kv_cache_bytes": "KV budget on the CPU when --num-kv-blocks is not given",
    "cpu_threads": "torch threads on the CPU (default: every core; the free ones if torch loaded before reference)",
    "kv_cache": "paged (blocks on demand) or contiguous (a max_model_len row per sequence)",
    "enable_prefix_caching": "reuse the KV of shared prompt prefixes",
    "attention_backend": "auto, torch, padded, triton, flash or flash-attn (auto: padded on the CPU, flash on a GPU; "
                         "flash-attn: FlashAttention 4, pip install -e '.[flash]', Hopper / datacenter Blackwell)",
    "enforce_eager": "no CUDA graphs (to measure what they bring)",
    "fused_kernels": "residual add + RMSNorm, RoPE and SiLU-and-multiply as fused Triton kernels (GPU)",
    "pack_projections": "q/k/v and gate/up as one matrix multiply each (default: on the CPU; off on the GPU, where "
                        "it measured no gain)",
    "async_scheduling": "plan each step while the previous one runs (default: on the GPU only)",
    "enable_chunked_prefill": "split long prompts across steps",
    "scheduling_policy": "who runs first: fcfs, sjf or priority",
    "seed": "seeds the global RNG (requests may bring their own seed)",
    "log_steps": "keep a record of every step (engine.step_log) for timelines and bench statistics",
    "tensor_parallel_size": "split the model over N processes (one per GPU, or gloo ranks on the CPU); the "
                            "heads and MLP must divide by N",
}
CHOICES = {"kv_cache": KV_CACHE_KINDS, "scheduling_policy": tuple(POLICIES)}


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_model_flags(parser: argparse.ArgumentParser, model_default: str | None = "smollm2") -> None:
    parser.add_argument("--model", default=model_default, help=HELP["model"])
    parser.add_argument("--device", default=None, help=HELP["device"])
    parser.add_argument("--dtype", default=None, help=HELP["dtype"])


def add_sampling_flags(parser: argparse.ArgumentParser, max_tokens: int) -> None:
    parser.add_argument("--max-tokens", type=int, default=max_tokens, help="most tokens to generate")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=-1, help="-1 = no limit")
    parser.add_argument("--seed", type=int, default=None, help="make sampling reproducible")


def add_engine_flags(parser: argparse.ArgumentParser, exclude: tuple[str, ...] = ()) -> None:
    """A flag per EngineConfig field (the model flags and `exclude` left out), in an "engine" group."""
    group = parser.add_argument_group("engine")
    for field in fields(EngineConfig):
        if field.name in MODEL_FLAGS or field.name in exclude:
            continue
        help_text = HELP[field.name]
        if field.default is not MISSING and field.default is not None and "default" not in help_text:
            help_text += f" (default {field.default})"
        if isinstance(field.default, bool) or "bool" in str(field.type):
            group.add_argument(flag(field.name), action=argparse.BooleanOptionalAction, default=None, help=help_text)
            continue
        kind = next((t for t in (int, float) if t.__name__ in str(field.type)), str)
        group.add_argument(flag(field.name), type=kind, default=None, choices=CHOICES.get(field.name),
                           help=help_text)


def engine_options(args: argparse.Namespace, exclude: tuple[str, ...] = ()) -> dict:
    """The EngineConfig keyword arguments the flags set (model left out; flags not given are left out too)."""
    return {f.name: getattr(args, f.name) for f in fields(EngineConfig)
            if f.name != "model" and f.name not in exclude and getattr(args, f.name, None) is not None}
