"""How much KV memory an engine gets: the manager of the kind EngineConfig asks for, sized to the budget.

The contiguous manager needs no sizing (one max_model_len row per seat). The paged manager gets num_kv_blocks
blocks when given, else what the memory budget holds, and never more than every seat at full length needs.
On a GPU the budget is what is left of gpu_memory_utilization x its memory once the weights and the activations
of the largest step are counted (gpu_memory_for_kv); on the CPU it is EngineConfig.cpu_kv_cache_bytes.
"""

from __future__ import annotations

from typing import Callable

import torch

from ..attention import build_metadata
from ..config import ModelConfig
from ..engine_config import EngineConfig
from .block_manager import BlockManager
from .layout import blocks_for_tokens, kv_bytes_per_token
from .manager import ContiguousKVManager, KVCacheManager


def make_kv_manager(config: EngineConfig, model_config: ModelConfig, dtype: torch.dtype,
                    memory_budget: Callable[[], int]) -> KVCacheManager:
    """The KV manager for `config` (its sizes already filled in); memory_budget() -> bytes is asked only when
    num_kv_blocks is not given (on a GPU it runs a dummy forward pass)."""
    if config.kv_cache == "contiguous":
        return ContiguousKVManager(config.max_num_seqs, config.max_model_len)
    num_blocks = config.num_kv_blocks or num_blocks_for_budget(config, model_config, dtype, memory_budget())
    if num_blocks * config.block_size < config.max_model_len:
        raise ValueError(
            f"the KV cache holds {num_blocks} blocks x {config.block_size} = {num_blocks * config.block_size} "
            f"tokens, fewer than max_model_len ({config.max_model_len}); raise num_kv_blocks or lower max_model_len"
        )
    return BlockManager(num_blocks, config.block_size, config.enable_prefix_caching)


def num_blocks_for_budget(config: EngineConfig, model_config: ModelConfig, dtype: torch.dtype, budget: int) -> int:
    """Blocks that `budget` bytes hold, and no more than needed for every seat at full length."""
    block_bytes = kv_bytes_per_token(model_config, dtype) * config.block_size
    enough = blocks_for_tokens(config.max_num_seqs * config.max_model_len, config.block_size)
    num_blocks = min(enough, budget // block_bytes)
    if num_blocks < 1:
        raise ValueError(f"no memory left for the KV cache (budget {budget} bytes); lower max_num_batched_tokens "
                         f"or raise gpu_memory_utilization / cpu_kv_cache_bytes")
    return num_blocks


@torch.inference_mode()
def gpu_memory_for_kv(model: torch.nn.Module, device: torch.device, config: EngineConfig) -> int:
    """Bytes left for the KV cache on the GPU: the budget (gpu_memory_utilization x total memory) minus
    what the weights and the activations of a full-budget step (measured with a dummy pass) need."""
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    num_tokens = config.max_num_batched_tokens
    seq_len = min(config.max_model_len, num_tokens)
    query_lens = [seq_len] * (num_tokens // seq_len) + ([num_tokens % seq_len] if num_tokens % seq_len else [])
    positions, metadata = build_metadata(query_lens, None, None, None, device)
    hidden = model(torch.zeros(num_tokens, dtype=torch.int64, device=device), positions, metadata)
    model.compute_logits(hidden[-config.max_num_seqs:])
    del hidden
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device)
    _, total = torch.cuda.mem_get_info(device)
    return max(0, int(total * config.gpu_memory_utilization) - peak)
