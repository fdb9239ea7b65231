"""The GPU's defaults from its memory, as vLLM sizes them: how many sequences run at once, and the KV capacity.

Fixed numbers fit one card: 64 seats left most of an H200 idle (9,665 tok/s on the nano-vllm workload against
20,664 with 256), and 256 would not fit a small card's KV cache. So on a GPU, what the user left None is sized
from what is left after a profiling forward pass at the full token budget (gpu_memory_for_kv in sizing.py):
- max_num_seqs: as many seats as that KV memory keeps busy, each seat holding half of max_model_len on average
  (MAX_GPU_SEATS at most; CUDA graphs are captured for every 16 seats, so it is rounded down to a multiple of 16);
  with the contiguous cache, a seat reserves a whole max_model_len.
- num_kv_blocks (paged): what that memory holds, and no more than every seat at full length needs.
"""

from __future__ import annotations

import torch

from ..config import ModelConfig
from ..engine_config import EngineConfig
from .layout import kv_bytes_per_token
from .sizing import gpu_memory_for_kv, num_blocks_for_budget

# vLLM's default on large cards is 1024 (256 on smaller ones); past a few hundred sequences a decode step is
# already bound by KV reads, and every 16 seats more is one more CUDA graph to capture at start.
MAX_GPU_SEATS = 512


def fill_gpu_sizes(config: EngineConfig, model: torch.nn.Module, device: torch.device, model_config: ModelConfig,
                   dtype: torch.dtype, kv_blocks: bool = True) -> None:
    """Set config.max_num_seqs and (paged, kv_blocks) config.num_kv_blocks where they are None, from the GPU's
    free memory. kv_blocks=False leaves the KV capacity to the caller (tensor parallelism: the smallest rank's).

    Runs after EngineConfig.fill_defaults (which leaves max_num_seqs None on a GPU) and before the KV manager is
    built; the profiling pass samples MAX_GPU_SEATS rows when the seats are not given, the most a step could."""
    paged = config.kv_cache == "paged" and kv_blocks
    if config.max_num_seqs is not None and (config.num_kv_blocks is not None or not paged):
        return
    seats = config.max_num_seqs
    config.max_num_seqs = seats or MAX_GPU_SEATS
    budget = gpu_memory_for_kv(model, device, config)
    kv_tokens = budget // kv_bytes_per_token(model_config, dtype)
    if seats is None:
        seats = min(MAX_GPU_SEATS, kv_tokens // (config.max_model_len // 2 if paged else config.max_model_len))
        if seats < 1:
            raise ValueError(f"the GPU has {budget / 2**30:.2f} GiB left for the KV cache, not enough for one "
                             f"sequence of max_model_len={config.max_model_len}; lower max_model_len or "
                             f"max_num_batched_tokens, or raise gpu_memory_utilization")
        seats = seats // 16 * 16 or seats
    config.max_num_seqs = seats
    if paged and config.num_kv_blocks is None:
        config.num_kv_blocks = num_blocks_for_budget(config, model_config, dtype, budget)
