"""The paged KV block manager of lab 0.3 (code in reference/kv/block_manager.py).

This module keeps the name the lab 0.3 notebooks import."""

from .kv.block_manager import Block, BlockManager

__all__ = ["Block", "BlockManager"]
