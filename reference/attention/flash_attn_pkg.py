"""Attention through the `flash-attn` package (FlashAttention 2), used when it is installed.

Its varlen function reads a paged cache directly (block_table=...), but only with pages of a multiple of 256
tokens, so the engine picks it only for such block sizes. The package is optional and not installed on our
test machines: this path is exercised only where it is installed, and its selection logic is tested anywhere.
"""

from __future__ import annotations

import importlib.util

import torch

from . import torch_ref
from .metadata import AttentionMetadata

PAGE_MULTIPLE = 256  # flash-attn's paged kernels need block_size % 256 == 0


def flash_attn_installed() -> bool:
    return importlib.util.find_spec("flash_attn") is not None


class FlashAttnPackageBackend:
    name = "flash-attn"

    def __init__(self) -> None:
        from flash_attn import flash_attn_varlen_func

        from .triton_ops import store_kvcache

        self._varlen = flash_attn_varlen_func
        self._store = store_kvcache

    def forward(self, q, k, v, k_cache, v_cache, metadata: AttentionMetadata, scale: float) -> torch.Tensor:
        if k_cache is None or not metadata.uses_cache:
            return torch_ref.varlen_attention(q, k, v, metadata.cu_seqlens_q, scale)
        self._store(k, v, k_cache, v_cache, metadata.slot_mapping)
        cu_seqlens_k = torch.zeros_like(metadata.cu_seqlens_q)
        cu_seqlens_k[1:] = torch.cumsum(metadata.context_lens, 0)
        # Causal masking in flash-attn 2 is aligned bottom-right: the new tokens are the last of each context.
        return self._varlen(
            q, k_cache, v_cache, metadata.cu_seqlens_q, cu_seqlens_k, metadata.max_query_len,
            max(metadata.context_lens_host), softmax_scale=scale, causal=True, block_table=metadata.block_tables,
        )
