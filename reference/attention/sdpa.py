"""Attention through torch's scaled_dot_product_attention, which runs FlashAttention-style kernels on GPUs.

SDPA knows nothing about block tables, so it only serves the case where a sequence's whole context is in this
step: a fresh prefill (no cached prefix). Its causal mask is aligned top-left, which is right exactly then.

The cuDNN backend is left out: it builds an execution plan per new shape (tens of milliseconds on the host), and
every prompt length is a new shape. Measured on an H200, the first 8192-token prefill step took 0.5 s with it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

WITHOUT_CUDNN = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def fresh_prefill_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor, query_lens: list[int], scale: float
) -> torch.Tensor:
    """Causal attention of each packed sequence over its own tokens.

    q: [num_tokens, heads, head_dim]; k, v: [num_tokens, kv_heads, head_dim]; query_lens: host copy of the
    per-sequence lengths (cu_seqlens on the host), so no device sync is needed to slice.
    """
    out = torch.empty_like(q)
    start = 0
    with sdpa_kernel(WITHOUT_CUDNN):
        for length in query_lens:
            end = start + length
            # SDPA wants [batch, heads, seq, head_dim].
            qs, ks, vs = (t[start:end].transpose(0, 1).unsqueeze(0) for t in (q, k, v))
            attended = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, scale=scale, enable_gqa=True)
            out[start:end] = attended.squeeze(0).transpose(0, 1)
            start = end
    return out
