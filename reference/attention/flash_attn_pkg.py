"""attention_backend="flash-attn": FlashAttention 4 (PyPI `flash-attn-4`, imported as `flash_attn.cute`).

Why FlashAttention 4 and not 2: its wheels are pure Python (kernels written in NVIDIA's CuTe DSL and compiled on
first use), so `pip install flash-attn-4` takes seconds, while FlashAttention 2 is compiled from source for hours.
Its varlen function reads our paged cache as it is: each layer's K and V caches, [num_blocks, block_size,
kv_heads, head_dim], are its pages, and a step's block tables its page table. So ONE call per layer serves every
step kind, after the Triton store has written the new K/V: fresh prefills, chunks over a cached prefix and
decodes, because its causal mask is aligned bottom-right (a sequence's new tokens are the last of its context,
our convention). `paged_attention` below is that call; `FlashAttnPackageBackend` plugs it into the model.

Where it runs: paged KV only on Hopper (sm_90) and datacenter Blackwell (sm_100 / sm_110); FlashAttention 4's
Ampere and consumer-Blackwell (sm_120) kernels take no page table. float16 and bfloat16 only. Any block size:
a block of exactly one key tile (128 rows on Hopper at head_dim 128) is loaded by TMA, other sizes row by row.
The TMA path reads whole blocks, also rows past a sequence's end; those must hold finite numbers (0 x NaN is
NaN), which ours do: caches start zeroed and only ever receive K/V.

CUDA graphs: decode steps are captured like with our kernels. The call reads lengths, query offsets and page ids
from device memory and never syncs with the host, so a graph replays it with new values in the same buffers. (A
first try crashed at replay with an illegal memory access: the decode graphs' query offsets were a temporary
that our Triton decode kernel never reads, freed after capture; cuda_graphs.py now keeps every captured input.)
Each kernel configuration is compiled the first time it runs (seconds); the engine's warm-up and graph capture
pay that before anyone times a step.

The package is optional and absent from our CPU machines: this path runs only where it is installed
(tests/test_flash_attn_gpu.py), and its selection logic (`unusable_reason`) is tested anywhere.
"""

from __future__ import annotations

import importlib.util

import torch

from .metadata import AttentionMetadata

MODULE = "flash_attn.cute"  # FlashAttention 4; FlashAttention 2's `flash_attn` alone does not count
PAGED_ARCH_MAJORS = (9, 10, 11)  # compute capabilities whose FlashAttention 4 kernels accept a page table
DTYPES = (torch.float16, torch.bfloat16)
INSTALL_HINT = "pip install flash-attn-4, or 'flash-attn-4[cu13]' with a CUDA 13 torch"


def flash_attn_installed() -> bool:
    """True when FlashAttention 4 can be imported (found without importing it: its import loads the CuTe DSL)."""
    try:
        return importlib.util.find_spec(MODULE) is not None
    except (ImportError, ValueError):  # a `flash_attn` package that fails to import (FlashAttention 2 built badly)
        return False


def unusable_reason(device: torch.device, dtype: torch.dtype | None = None) -> str | None:
    """Why attention_backend="flash-attn" cannot run on `device` in `dtype` (None: it can), said as what to change.
    (Triton, which stores the new K/V, is checked with the other Triton backends.)"""
    if not flash_attn_installed():
        return f"needs the flash-attn-4 package: {INSTALL_HINT}"
    if device.type != "cuda":
        return "needs a CUDA GPU; use 'padded' or 'torch' on the CPU"
    major, minor = torch.cuda.get_device_capability(device)
    if major not in PAGED_ARCH_MAJORS:
        return (f"needs a Hopper or datacenter Blackwell GPU (sm_90 / sm_100 / sm_110: FlashAttention 4 reads a "
                f"paged cache only there); this one is sm_{major}{minor}: use 'flash' or 'triton'")
    if dtype is not None and dtype not in DTYPES:
        return f"needs float16 or bfloat16, not {str(dtype).removeprefix('torch.')}: pass dtype='bfloat16'"
    return None


def first_output(result):
    """flash_attn_varlen_func returns (out, lse) in the betas we know; take out either way."""
    return result[0] if isinstance(result, tuple) else result


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, page_table: torch.Tensor,
                    cu_seqlens_q: torch.Tensor, context_lens: torch.Tensor, max_query_len: int,
                    scale: float) -> torch.Tensor:
    """Causal attention of packed new tokens over each sequence's cached context, new tokens already stored.

    q: [num_tokens, heads, head_dim] packed by cu_seqlens_q (int32 [batch + 1]); caches: [num_blocks, block_size,
    kv_heads, head_dim]; page_table: int32 [batch, max_blocks], a real block id in every entry (those past a
    sequence's blocks are not used for its result, but -1 is no page); context_lens: int32 [batch] (tokens in the
    cache including this step's); max_query_len: the longest sequence's new tokens (a host int).
    Returns [num_tokens, heads, head_dim].
    """
    from flash_attn.cute import flash_attn_varlen_func

    return first_output(flash_attn_varlen_func(
        q, k_cache, v_cache, cu_seqlens_q=cu_seqlens_q, max_seqlen_q=max_query_len, seqused_k=context_lens,
        page_table=page_table, softmax_scale=scale, causal=True,
    ))


def varlen_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                     max_len: int, scale: float) -> torch.Tensor:
    """Causal attention of packed sequences over their own tokens (no cache): torch_ref.varlen_attention's twin."""
    from flash_attn.cute import flash_attn_varlen_func

    return first_output(flash_attn_varlen_func(
        q, k, v, cu_seqlens_q=cu_seqlens, cu_seqlens_k=cu_seqlens, max_seqlen_q=max_len, max_seqlen_k=max_len,
        softmax_scale=scale, causal=True,
    ))


class FlashAttnPackageBackend:
    """Store the new K/V with the Triton store, then one FlashAttention 4 call over the paged cache."""

    name = "flash-attn"
    supports_cuda_graphs = True  # reads lengths, query offsets and page ids from device memory
    accepts_stored_kv = True  # see forward's kv_stored

    def __init__(self) -> None:
        import flash_attn.cute  # noqa: F401 - import (and fail) now, not inside the first forward pass

        from .triton_ops import store_kvcache

        self._store = store_kvcache

    def forward(self, q, k, v, k_cache, v_cache, metadata: AttentionMetadata, scale: float,
                kv_stored: bool = False) -> torch.Tensor:
        """q: [tokens, heads, head_dim]; k, v: [tokens, kv_heads, head_dim]; caches: [num_blocks, block_size,
        kv_heads, head_dim] each, or None (no cache: attention over this step's tokens only). kv_stored: the
        model's fused kernel already wrote the new K/V into the cache."""
        if k_cache is None or not metadata.uses_cache:
            return varlen_attention(q, k, v, metadata.cu_seqlens_q, metadata.max_query_len, scale)
        if not kv_stored:
            self._store(k, v, k_cache, v_cache, metadata.slot_mapping)
        # Metadata built by hand (tests, labs) may lack the page table: derive it, once per layer then.
        page_table = metadata.page_table if metadata.page_table is not None else metadata.block_tables.clamp(min=0)
        return paged_attention(q, k_cache, v_cache, page_table, metadata.cu_seqlens_q, metadata.context_lens,
                               metadata.max_query_len, scale)
