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
    """Fresh prefills through FlashAttention (sdpa.fresh_prefill_attention); decodes and chunks over a cached
    prefix through `paged`. A step that mixes them (running sequences first, new prompts last: the scheduler's
    order) is cut in two: its leading rows go to `paged`, its trailing run of fresh prompts to FlashAttention,
    which needs no cache reads for them and is about twice as fast as our paged prefill kernel on an H200."""

    name = "flash"
    supports_cuda_graphs = True  # decode steps never reach SDPA: they run the paged kernels
    accepts_stored_kv = True  # forward(..., kv_stored=True): the model's fused kernel already stored the new K/V
    cut_mixed_steps = True

    def __init__(self, paged) -> None:
        self.paged = paged
        self._split: tuple | None = None  # (metadata, its split): every layer of a step asks for the same one

    def forward(self, q, k, v, k_cache, v_cache, metadata: AttentionMetadata, scale: float,
                kv_stored: bool = False) -> torch.Tensor:
        first = fresh_suffix_start(metadata) if metadata.uses_cache and metadata.max_query_len > 1 else None
        if first and not self.cut_mixed_steps:
            first = None
        if first is None:
            return self.paged.forward(q, k, v, k_cache, v_cache, metadata, scale, kv_stored=kv_stored)
        if not kv_stored:  # fresh prefills still fill the cache for later decodes
            from .triton_ops import store_kvcache

            store_kvcache(k, v, k_cache, v_cache, metadata.slot_mapping)
        if first == 0:
            return fresh_prefill_attention(q, k, v, metadata.cu_seqlens_q, metadata.query_lens, scale)
        head, tail_cu, tokens = self._split_of(metadata, first)
        return torch.cat([
            self.paged.forward(q[:tokens], k[:tokens], v[:tokens], k_cache, v_cache, head, scale, kv_stored=True),
            fresh_prefill_attention(q[tokens:], k[tokens:], v[tokens:], tail_cu, metadata.query_lens[first:], scale),
        ])

    def _split_of(self, metadata: AttentionMetadata, first: int) -> tuple[AttentionMetadata, torch.Tensor, int]:
        """The leading rows' metadata, the fresh rows' cu_seqlens (from 0) and the leading rows' token count."""
        if self._split is None or self._split[0] is not metadata:
            self._split = (metadata, leading_rows(metadata, first))
        return self._split[1]


def fresh_suffix_start(metadata: AttentionMetadata) -> int | None:
    """The first row of the step's trailing run of fresh prompts (rows whose whole context is their new tokens),
    or None where the last row is not one (then nothing goes to FlashAttention)."""
    contexts, first = metadata.context_lens_host, len(metadata.query_lens)
    while contexts is not None and first and contexts[first - 1] == metadata.query_lens[first - 1]:
        first -= 1
    return None if first == len(metadata.query_lens) else first


def leading_rows(metadata: AttentionMetadata, first: int) -> tuple[AttentionMetadata, torch.Tensor, int]:
    """Metadata of rows [0, first) (their tokens come first in the packed batch), the cu_seqlens of rows
    [first, batch) counted from their first token, and the leading rows' token count."""
    tokens = sum(metadata.query_lens[:first])
    head = AttentionMetadata(
        cu_seqlens_q=metadata.cu_seqlens_q[: first + 1], query_lens=metadata.query_lens[:first],
        context_lens=metadata.context_lens[:first], context_lens_host=metadata.context_lens_host[:first],
        slot_mapping=metadata.slot_mapping[:tokens], block_tables=metadata.block_tables[:first],
        page_table=None if metadata.page_table is None else metadata.page_table[:first],
    )
    return head, metadata.cu_seqlens_q[first:] - tokens, tokens


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
