"""The paged KV block manager (lab 0.3): small fixed-size blocks handed out on demand, shared when possible.

- Memory is num_blocks blocks of block_size token slots. A sequence's block table lists its blocks in order
  (layout.py has the slot formula).
- Blocks are taken from a free pool only when a sequence's tokens need them, so nothing is reserved that is
  not about to be used (waste is at most one partly filled block per sequence). The flip side: the pool can
  run dry mid-request, and the scheduler must then preempt someone.
- Prefix caching: each full block is named in the lab's PrefixCache (prefix_cache.py). A new sequence reuses
  the cached blocks of its prompt's prefix (ref_count + 1) instead of recomputing them. Freed blocks keep their
  contents and stay findable until the pool hands them out again, least recently freed first (LRU eviction).
- Copy-on-write: a forked sequence (parallel sampling, SamplingParams.n > 1) shares its parent's blocks. The
  first write into a shared, partly filled block gives the writer a private copy; the copy itself is queued
  for the model runner, which owns the cache tensors.

This module only does bookkeeping (ids and counts); it never touches tensors.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from ..sequence import Sequence
from .layout import blocks_for_tokens
from .manager import KVCacheManager
from .prefix_cache import PrefixCache


@dataclass
class Block:
    block_id: int
    ref_count: int = 0
    num_filled: int = 0  # slots holding tokens


class BlockManager(KVCacheManager):
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True) -> None:
        if num_blocks < 1:
            raise ValueError(f"num_kv_blocks must be >= 1, got {num_blocks}")
        if block_size < 1 or block_size & (block_size - 1):
            raise ValueError(f"block_size must be a power of two, got {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        # Free blocks, least recently freed first. A free block may still hold a cached prefix.
        self.free_ids: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self.prefix_cache = PrefixCache(block_size)  # full blocks by name (free or in use)
        self.tables: dict[int, list[int]] = {}  # seq_id -> block ids
        self._names: dict[int, list[int]] = {}  # seq_id -> names (chain hashes) of its table's leading full blocks
        self.pending_copies: list[tuple[int, int]] = []  # (source block, destination block) for the runner
        self.prefix_queried_tokens = 0  # prompt tokens looked up in the prefix cache...
        self.prefix_hit_tokens = 0  # ...and how many were found there
        self.num_cow_copies = 0

    # -- the KVCacheManager interface -----------------------------------------------------------------------------
    def block_table(self, seq: Sequence) -> list[int]:
        return self.tables[seq.seq_id]

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_ids)

    def num_reserved_slots(self) -> int:
        return (self.num_blocks - self.num_free_blocks) * self.block_size

    def num_used_slots(self) -> int:
        return sum(b.num_filled for b in self.blocks if b.ref_count > 0)

    @property
    def num_cached_free_blocks(self) -> int:
        """Free blocks that still hold a reusable prefix."""
        return sum(1 for i in self.free_ids if i in self.prefix_cache.hash_of)

    @property
    def prefix_hit_rate(self) -> float:
        return self.prefix_hit_tokens / self.prefix_queried_tokens if self.prefix_queried_tokens else 0.0

    def cached_prefix_len(self, seq: Sequence) -> int:
        """Tokens of a new sequence's prefix already in cached blocks (always leaves >= 1 token to compute)."""
        return len(self._match_prefix(seq)) * self.block_size

    def can_allocate(self, seq: Sequence, num_new_tokens: int) -> bool:
        return self._blocks_needed(seq, num_new_tokens) <= self.num_free_blocks

    def allocate(self, seq: Sequence, num_new_tokens: int) -> None:
        assert self._blocks_needed(seq, num_new_tokens) <= self.num_free_blocks, "allocate() without can_allocate()"
        start = self._admit(seq) if seq.seq_id not in self.tables else seq.num_computed_tokens
        table = self.tables[seq.seq_id]
        end = start + num_new_tokens
        if start % self.block_size and self.blocks[table[-1]].ref_count > 1:
            table[-1] = self._copy_on_write(table[-1])
        while len(table) * self.block_size < end:
            table.append(self.allocate_block())
        for j in range(start // self.block_size, len(table)):
            block = self.blocks[table[j]]
            block.num_filled = max(block.num_filled, min(end - j * self.block_size, self.block_size))
        if self.enable_prefix_caching:
            self._name_full_blocks(seq, table, end)

    def free(self, seq: Sequence) -> None:
        # Reversed: a sequence's last blocks are the least likely to be shared, so they are evicted first.
        self._names.pop(seq.seq_id, None)
        for block_id in reversed(self.tables.pop(seq.seq_id, [])):
            self.release_block(block_id)

    def fork(self, parent: Sequence, child: Sequence, num_tokens: int) -> None:
        """Give `child` the blocks holding the parent's first num_tokens tokens, shared (ref_count + 1)."""
        shared = self.tables[parent.seq_id][: blocks_for_tokens(num_tokens, self.block_size)]
        for block_id in shared:
            self.share_block(block_id)
        self.tables[child.seq_id] = list(shared)
        # Names of full blocks only: the last shared block may be partly filled, and a write will copy it.
        self._names[child.seq_id] = self._names.get(parent.seq_id, [])[: num_tokens // self.block_size]

    def take_pending_copies(self) -> list[tuple[int, int]]:
        copies, self.pending_copies = self.pending_copies, []
        return copies

    # -- single blocks: the pool and its reference counts (lab 0.3's allocator) -----------------------------------
    def allocate_block(self) -> int:
        """Take the least recently freed block (forgetting the prefix it cached); its ref_count becomes 1."""
        block_id, _ = self.free_ids.popitem(last=False)
        self.prefix_cache.evict(block_id)
        block = self.blocks[block_id]
        block.num_filled, block.ref_count = 0, 1
        return block_id

    def share_block(self, block_id: int) -> None:
        """One more table holds block_id (a cached prefix or a fork): ref_count + 1, out of the free pool."""
        self.free_ids.pop(block_id, None)  # a cached block that was free comes back to life
        self.blocks[block_id].ref_count += 1

    def release_block(self, block_id: int) -> None:
        """One table lets go of block_id; at ref_count 0 it returns to the free pool (its prefix still cached)."""
        block = self.blocks[block_id]
        assert block.ref_count > 0, f"block {block_id} freed twice"
        block.ref_count -= 1
        if block.ref_count == 0:
            self.free_ids[block_id] = None

    # -- internals ------------------------------------------------------------------------------------------------
    def _match_prefix(self, seq: Sequence) -> list[int]:
        """Cached blocks that hold seq's first tokens, for a sequence that holds no blocks yet."""
        if not self.enable_prefix_caching or seq.seq_id in self.tables or seq.num_computed_tokens:
            return []
        return self.prefix_cache.lookup(seq.token_ids)

    def _blocks_needed(self, seq: Sequence, num_new_tokens: int) -> int:
        """Free blocks this allocation would consume (new blocks, a copy-on-write, reused blocks now free)."""
        table = self.tables.get(seq.seq_id)
        if table is None:
            matched = self._match_prefix(seq)
            computed = len(matched) * self.block_size
            revived = sum(1 for b in matched if self.blocks[b].ref_count == 0)
            return revived + blocks_for_tokens(computed + num_new_tokens, self.block_size) - len(matched)
        end = seq.num_computed_tokens + num_new_tokens
        cow = 1 if seq.num_computed_tokens % self.block_size and self.blocks[table[-1]].ref_count > 1 else 0
        return cow + max(0, blocks_for_tokens(end, self.block_size) - len(table))

    def _admit(self, seq: Sequence) -> int:
        """Give a new sequence the cached blocks of its prefix; returns how many tokens they hold (the scheduler
        reports that number, cached_prefix_len, and the engine records it in the sequence)."""
        matched = self._match_prefix(seq)
        if self.enable_prefix_caching:
            self.prefix_queried_tokens += seq.num_prompt_tokens
            self.prefix_hit_tokens += len(matched) * self.block_size
        for block_id in matched:
            self.share_block(block_id)
        self.tables[seq.seq_id] = matched
        self._names[seq.seq_id] = [self.prefix_cache.hash_of[b] for b in matched]
        return len(matched) * self.block_size

    def _copy_on_write(self, block_id: int) -> int:
        new_id = self.allocate_block()
        self.blocks[new_id].num_filled = self.blocks[block_id].num_filled
        self.pending_copies.append((block_id, new_id))
        self.num_cow_copies += 1
        self.release_block(block_id)
        return new_id

    def _name_full_blocks(self, seq: Sequence, table: list[int], end: int) -> None:
        """Name every block that is full once this step's tokens are written, so later prompts can reuse it."""
        names = self._names.setdefault(seq.seq_id, [])
        end = min(end, seq.num_tokens - seq.num_pending_tokens)  # a token still in flight has no value to hash
        for j in range(len(names), end // self.block_size):  # most decode steps fill no block: no iteration
            tokens = tuple(seq.token_ids[j * self.block_size : (j + 1) * self.block_size])
            names.append(self.prefix_cache.insert_block(names[-1] if names else None, tokens, table[j]))
