"""Attention: per-step metadata and the backends that compute attention against the KV cache.

Backends (attention_backend=...):
- "torch": plain PyTorch (torch_ref.py), any device. The reference every other backend is tested against.
- "triton": the paged Triton kernels (triton_ops.py) for everything: store, decode, chunked prefill.
- "flash": torch's SDPA (FlashAttention kernels) for fresh prefills, the Triton kernels for the rest.
- "auto": "flash" on a CUDA GPU with Triton available, "torch" otherwise.
triton_ops is imported only when a Triton backend is built, so `import reference` never imports triton.
"""

from __future__ import annotations

import importlib.util

import torch

from .metadata import AttentionMetadata, build_metadata
from .sdpa import fresh_prefill_attention
from .torch_ref import TorchAttentionBackend

BACKENDS = ("auto", "torch", "triton", "flash")


def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


class FlashPrefillBackend:
    """Fresh prefills through SDPA's FlashAttention kernels; decodes and chunked prefills through `paged`."""

    name = "flash"

    def __init__(self, paged) -> None:
        self.paged = paged

    def forward(self, q, k, v, k_cache, v_cache, metadata: AttentionMetadata, scale: float) -> torch.Tensor:
        fresh = metadata.context_lens_host is not None and metadata.context_lens_host == metadata.query_lens
        if not metadata.uses_cache or not fresh or metadata.max_query_len <= 1:
            return self.paged.forward(q, k, v, k_cache, v_cache, metadata, scale)
        from .triton_ops import store_kvcache  # fresh prefills still fill the cache for later decodes

        store_kvcache(k, v, k_cache, v_cache, metadata.slot_mapping)
        return fresh_prefill_attention(q, k, v, metadata.cu_seqlens_q, metadata.query_lens, scale)


def resolve_backend_name(name: str, device: torch.device) -> str:
    """The concrete backend `name` means on `device` ("auto" picks); unusable choices raise ValueError."""
    if name not in BACKENDS:
        raise ValueError(f"attention_backend={name!r} is unknown; choose one of: {', '.join(BACKENDS)}")
    if name == "auto":
        return "flash" if device.type == "cuda" and triton_available() else "torch"
    if name in ("triton", "flash") and not triton_available():
        raise ValueError(f"attention_backend={name!r} needs the triton package (Linux); use 'torch'")
    if name == "flash" and device.type != "cuda":
        raise ValueError("attention_backend='flash' needs a CUDA GPU; use 'torch' or 'triton' on the CPU")
    return name


def get_backend(name: str = "auto", device: torch.device | str = "cpu"):
    """Build the attention backend called `name` for `device`."""
    name = resolve_backend_name(name, torch.device(device))
    if name == "torch":
        return TorchAttentionBackend()
    from .triton_ops import TritonAttentionBackend

    return TritonAttentionBackend() if name == "triton" else FlashPrefillBackend(TritonAttentionBackend())


__all__ = ["AttentionMetadata", "build_metadata", "TorchAttentionBackend", "get_backend", "resolve_backend_name"]
