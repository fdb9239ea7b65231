"""KV memory managers: the interface the scheduler asks, and the contiguous one (code in reference/kv/manager.py).

This module keeps the name the lab 0.2 adapters import."""

from .kv.manager import ContiguousKVManager, KVCacheManager

__all__ = ["ContiguousKVManager", "KVCacheManager"]
