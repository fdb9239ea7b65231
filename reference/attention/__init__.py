"""Attention: per-step metadata and the backends that compute attention against the KV cache.

Backends (attention_backend=...):
- "torch": plain PyTorch (torch_ref.py), any device. The reference every other backend is tested against.
- "padded": each step's decodes, and its prefill chunks, as one padded batch through torch's SDPA (padded.py):
  a few large operations per layer instead of a Python loop over sequences. Any device; made for the CPU.
- "triton": the paged Triton kernels (triton_ops.py) for everything: store, decode, chunked prefill.
- "flash": torch's SDPA (FlashAttention kernels) for fresh prefills, the Triton kernels for the rest.
- "flash-attn": FlashAttention 4 (the optional `flash-attn-4` package, flash_attn_pkg.py) for everything, over
  the paged cache; Hopper / datacenter Blackwell GPUs, float16 / bfloat16. Opt-in.
- "auto": "padded" on the CPU; on a CUDA GPU "flash" when Triton is available, else "torch".
Why "auto" does not pick "flash-attn" even where it runs: "flash" is the path every GPU test and every published
number of this project was measured on, and it needs nothing beyond torch and Triton; FlashAttention 4 is a beta
package whose kernels compile on first use. benchmarks/RESULTS.md compares the two; "auto" changes when it says so.
triton_ops is imported only when a Triton backend is built, so `import reference` never imports triton.
"""

from __future__ import annotations

import importlib.util

import torch

from .metadata import AttentionMetadata, build_metadata
from .padded import PaddedAttentionBackend
from .sdpa import fresh_prefill_attention
from .torch_ref import TorchAttentionBackend

from .flash_attn_pkg import flash_attn_installed, unusable_reason

BACKENDS = ("auto", "torch", "padded", "triton", "flash", "flash-attn")


def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


class FlashPrefillBackend:
    """Fresh prefills through FlashAttention (sdpa.fresh_prefill_attention); decodes and chunked prefills through
    `paged`. Only a step of fresh prompts alone (an engine's first step, mostly) goes to FlashAttention: cutting a
    mixed step in two, its running rows to `paged` and its trailing fresh prompts to FlashAttention, made the
    prompt-running steps slower on an H200 (benchmarks/RESULTS.md, 2026-12-02 thirteenth session)."""

    name = "flash"
    supports_cuda_graphs = True  # decode steps never reach SDPA: they run the paged kernels
    accepts_stored_kv = True  # forward(..., kv_stored=True): the model's fused kernel already stored the new K/V

    def __init__(self, paged) -> None:
        self.paged = paged

    def forward(self, q, k, v, k_cache, v_cache, metadata: AttentionMetadata, scale: float,
                kv_stored: bool = False) -> torch.Tensor:
        fresh = metadata.context_lens_host is not None and metadata.context_lens_host == metadata.query_lens
        if not metadata.uses_cache or not fresh or metadata.max_query_len <= 1:
            return self.paged.forward(q, k, v, k_cache, v_cache, metadata, scale, kv_stored=kv_stored)
        if not kv_stored:  # fresh prefills still fill the cache for later decodes
            from .triton_ops import store_kvcache

            store_kvcache(k, v, k_cache, v_cache, metadata.slot_mapping)
        return fresh_prefill_attention(q, k, v, metadata.cu_seqlens_q, metadata.query_lens, scale)


def resolve_backend_name(name: str, device: torch.device, block_size: int = 16,
                         dtype: torch.dtype | None = None) -> str:
    """The concrete backend `name` means on `device` ("auto" picks); unusable choices raise ValueError.

    block_size: the KV cache's (every backend takes any); dtype: the model's, checked where a backend needs one."""
    if name not in BACKENDS:
        raise ValueError(f"attention_backend={name!r} is unknown; choose one of: {', '.join(BACKENDS)}")
    if name == "auto":
        if device.type != "cuda":
            return "padded"
        return "flash" if triton_available() else "torch"
    if name == "flash-attn":
        reason = unusable_reason(device, dtype)
        if reason is not None:
            raise ValueError(f"attention_backend='flash-attn' {reason}")
    if name in ("triton", "flash", "flash-attn") and not triton_available():
        raise ValueError(f"attention_backend={name!r} needs the triton package (Linux); use 'torch'")
    if name == "flash" and device.type != "cuda":
        raise ValueError("attention_backend='flash' needs a CUDA GPU; use 'torch' or 'triton' on the CPU")
    return name


def get_backend(name: str = "auto", device: torch.device | str = "cpu", block_size: int = 16,
                dtype: torch.dtype | None = None):
    """Build the attention backend called `name` for `device`, the cache's block size and the model's dtype."""
    name = resolve_backend_name(name, torch.device(device), block_size, dtype)
    if name == "torch":
        return TorchAttentionBackend()
    if name == "padded":
        return PaddedAttentionBackend()
    if name == "flash-attn":
        from .flash_attn_pkg import FlashAttnPackageBackend

        return FlashAttnPackageBackend()
    from .triton_ops import TritonAttentionBackend

    return TritonAttentionBackend() if name == "triton" else FlashPrefillBackend(TritonAttentionBackend())


__all__ = ["AttentionMetadata", "build_metadata", "TorchAttentionBackend", "PaddedAttentionBackend", "get_backend",
           "resolve_backend_name"]
