"""Attention through torch's scaled_dot_product_attention, which runs FlashAttention-style kernels on GPUs.

SDPA knows nothing about block tables, so it only serves the case where a sequence's whole context is in this
step: a fresh prefill (no cached prefix). Its causal mask is aligned top-left, which is right exactly then.
On a GPU the same kernels take all of a step's fresh prompts in one variable-length launch (fresh_prefill_attention).

The cuDNN backend is left out: it builds an execution plan per new shape (tens of milliseconds on the host), and
every prompt length is a new shape. Measured on an H200, the first 8192-token prefill step took 0.5 s with it.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

WITHOUT_CUDNN = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def fresh_prefill_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor, query_lens: list[int], scale: float
) -> torch.Tensor:
    """Causal attention of each packed sequence over its own tokens.

    q: [num_tokens, heads, head_dim]; k, v: [num_tokens, kv_heads, head_dim]; cu_seqlens: int32 [batch + 1] on
    q's device; query_lens: its host copy, so no device sync is needed to slice.
    On a CUDA GPU in float16 / bfloat16 all sequences go to FlashAttention's variable-length kernel in one launch
    (the kernel SDPA calls per sequence); elsewhere, one SDPA call per sequence.
    """
    if flash_varlen_usable(q):
        # The private op behind SDPA's flash backend (and torch.nn.attention.varlen, whose keyword arguments
        # changed between torch releases); these ten positional arguments have not changed since torch 2.2.
        # Grouped-query heads need no copies: the kernel maps each query head to its KV head.
        longest = max(query_lens)
        return torch.ops.aten._flash_attention_forward(
            q, k, v, cu_seqlens, cu_seqlens, longest, longest, 0.0, True, False, scale=scale)[0]
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


def flash_varlen_usable(q: torch.Tensor) -> bool:
    """FlashAttention's kernels (built into CUDA torch) need an Ampere or newer GPU, float16 / bfloat16 and a head
    dim up to 256, a multiple of 8."""
    return (q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and q.shape[-1] <= 256
            and q.shape[-1] % 8 == 0 and torch.backends.cuda.flash_sdp_enabled() and _ampere_or_newer(q.device))


@functools.lru_cache(maxsize=None)
def _ampere_or_newer(device: torch.device) -> bool:
    return torch.cuda.get_device_capability(device) >= (8, 0)
