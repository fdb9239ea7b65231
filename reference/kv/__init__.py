"""KV memory, in one place: where each token's keys and values live, who owns them, and how much there is.

- layout.py: the cache's layout written once: blocks for a length, the slot formula (slot_mapping), bytes per
  token, and the allocation of the cache tensors [num_blocks, block_size, kv_heads, head_dim] per layer.
- contiguous.py: lab 0.1's contiguous cache (one max_len row per sequence) for the fixed-batch generate loop.
- manager.py: the KVCacheManager interface the scheduler asks, and its contiguous implementation.
- prefix_cache.py: lab 0.3's prefix index (chained block hashes, checked by tokens).
- block_manager.py: the paged BlockManager (lab 0.3), built on that PrefixCache.
- sizing.py: the manager EngineConfig asks for, sized to the memory budget.

Managers only keep books (ids and counts); the tensors are allocated once by the model runner via layout.py.
"""

from .block_manager import Block, BlockManager
from .contiguous import ContiguousKVCache
from .layout import (KVCaches, allocate_kv_caches, batched_slot_mapping, blocks_for_tokens, kv_bytes_per_token,
                     kv_caches_bytes, slot_mapping)
from .manager import ContiguousKVManager, KVCacheManager
from .prefix_cache import PrefixCache, block_hashes, chain_hash

__all__ = [
    "Block", "BlockManager", "ContiguousKVCache", "ContiguousKVManager", "KVCacheManager", "KVCaches", "PrefixCache",
    "allocate_kv_caches", "batched_slot_mapping", "block_hashes", "blocks_for_tokens", "chain_hash",
    "kv_bytes_per_token", "kv_caches_bytes", "slot_mapping",
]
