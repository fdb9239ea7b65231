"""Attention: per-step metadata and the backends that compute attention against the KV cache.

Backends (attention_backend=...):
- "torch": plain PyTorch (torch_ref.py), any device. The reference every other backend is tested against.
- "padded": each step's decodes, and its prefill chunks, as one padded batch through torch's SDPA (padded.py):
  a few large operations per layer instead of a Python loop over sequences. Any device; made for the CPU.
- "triton": the paged Triton kernels (triton_ops.py) for everything: store, decode, chunked prefill.
- "flash": torch's SDPA (FlashAttention kernels) for fresh prefills, the Triton kernels for the rest.
- "flash-attn": the `flash-attn` package for everything (when installed; needs block_size % 256 == 0).
- "auto": on a CUDA GPU "flash-attn" when it is installed and the block size suits it, else "flash" when
  Triton is available, else "torch"; on the CPU "padded".
triton_ops is imported only when a Triton backend is built, so `import reference` never imports triton.
"""

from __future__ import annotations

import importlib.util

import torch

from .metadata import AttentionMetadata, build_metadata
from .padded import PaddedAttentionBackend
from .sdpa import fresh_prefill_attention
from .torch_ref import TorchAttentionBackend

from .flash_attn_pkg import PAGE_MULTIPLE, flash_attn_installed

BACKENDS = ("auto", "torch", "padded", "triton", "flash", "flash-attn")


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


def resolve_backend_name(name: str, device: torch.device, block_size: int = 16) -> str:
    """The concrete backend `name` means on `device` ("auto" picks); unusable choices raise ValueError."""
    if name not in BACKENDS:
        raise ValueError(f"attention_backend={name!r} is unknown; choose one of: {', '.join(BACKENDS)}")
    if name == "auto":
        if device.type != "cuda":
            return "padded"
        if flash_attn_installed() and triton_available() and block_size % PAGE_MULTIPLE == 0:
            return "flash-attn"
        return "flash" if triton_available() else "torch"
    if name == "flash-attn":
        if not flash_attn_installed() or device.type != "cuda":
            raise ValueError("attention_backend='flash-attn' needs the flash-attn package and a CUDA GPU")
        if block_size % PAGE_MULTIPLE:
            raise ValueError(f"attention_backend='flash-attn' needs block_size to be a multiple of {PAGE_MULTIPLE}, "
                             f"got {block_size}")
    if name in ("triton", "flash") and not triton_available():
        raise ValueError(f"attention_backend={name!r} needs the triton package (Linux); use 'torch'")
    if name == "flash" and device.type != "cuda":
        raise ValueError("attention_backend='flash' needs a CUDA GPU; use 'torch' or 'triton' on the CPU")
    return name


def get_backend(name: str = "auto", device: torch.device | str = "cpu", block_size: int = 16):
    """Build the attention backend called `name` for `device` and the cache's block size."""
    name = resolve_backend_name(name, torch.device(device), block_size)
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
