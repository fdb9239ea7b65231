"""The paged KV block manager (lab 0.3): small fixed-size blocks handed out on demand, shared when possible.

- Memory is num_blocks blocks of block_size token slots. A sequence's block table lists its blocks in order;
  the token at position p lives in slot table[p // block_size] * block_size + p % block_size.
- Blocks are taken from a free pool only when a sequence's tokens need them, so nothing is reserved that is
  not about to be used (waste is at most one partly filled block per sequence). The flip side: the pool can
  run dry mid-request, and the scheduler must then preempt someone.
- Prefix caching: a full block is named by a chained hash of its tokens and the previous block's hash, so equal
  hashes mean equal prefixes. A new sequence reuses the cached blocks of its prompt's prefix (ref_count + 1)
  instead of recomputing them; we compare the tokens too, so a hash collision can never corrupt output.
  Freed blocks keep their contents and stay findable until the pool hands them out again, least recently
  freed first (LRU eviction).
- Copy-on-write: a forked sequence (parallel sampling, SamplingParams.n > 1) shares its parent's blocks. The
  first write into a shared, partly filled block gives the writer a private copy; the copy itself is queued
  for the model runner, which owns the cache tensors.

This module only does bookkeeping (ids and counts); it never touches tensors.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from .kv_manager import KVCacheManager
from .sequence import Sequence


@dataclass
class Block:
    block_id: int
    ref_count: int = 0
    hash: int | None = None  # set once the block is full and its tokens are final
    token_ids: tuple[int, ...] = ()  # the tokens of a hashed block, to verify cache hits
    num_filled: int = 0  # slots holding tokens


def chain_hash(previous: int | None, token_ids: tuple[int, ...]) -> int:
    """Name of a full block: depends on its tokens AND on every token before it (through `previous`)."""
    return hash((previous, token_ids))


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
        # Free blocks, least recently freed first. A free block may still hold a cached prefix (hash set).
        self.free_ids: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self.cached: dict[int, int] = {}  # chain hash -> block id, for full blocks (free or in use)
        self.tables: dict[int, list[int]] = {}  # seq_id -> block ids
        self._num_hashed: dict[int, int] = {}  # seq_id -> leading blocks of its table that are named (hashed)
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
        return sum(1 for i in self.free_ids if self.blocks[i].hash is not None)

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
        if seq.seq_id not in self.tables:
            self._admit(seq)
        table = self.tables[seq.seq_id]
        start, end = seq.num_computed_tokens, seq.num_computed_tokens + num_new_tokens
        if start % self.block_size and self.blocks[table[-1]].ref_count > 1:
            table[-1] = self._copy_on_write(table[-1])
        while len(table) * self.block_size < end:
            table.append(self._take_free_block())
        for j in range(start // self.block_size, len(table)):
            block = self.blocks[table[j]]
            block.num_filled = max(block.num_filled, min(end - j * self.block_size, self.block_size))
        if self.enable_prefix_caching:
            self._register_full_blocks(seq, table, end)

    def free(self, seq: Sequence) -> None:
        # Reversed: a sequence's last blocks are the least likely to be shared, so they are evicted first.
        self._num_hashed.pop(seq.seq_id, None)
        for block_id in reversed(self.tables.pop(seq.seq_id, [])):
            self._release(block_id)

    def fork(self, parent: Sequence, child: Sequence, num_tokens: int) -> None:
        """Give `child` the blocks holding the parent's first num_tokens tokens, shared (ref_count + 1)."""
        shared = self.tables[parent.seq_id][: -(-num_tokens // self.block_size)]
        for block_id in shared:
            self.blocks[block_id].ref_count += 1
        self.tables[child.seq_id] = list(shared)
        self._num_hashed[child.seq_id] = sum(1 for b in shared if self.blocks[b].hash is not None)

    def take_pending_copies(self) -> list[tuple[int, int]]:
        copies, self.pending_copies = self.pending_copies, []
        return copies

    # -- internals ------------------------------------------------------------------------------------------------
    def _match_prefix(self, seq: Sequence) -> list[int]:
        """Cached blocks that hold seq's first tokens, for a sequence that holds no blocks yet."""
        if not self.enable_prefix_caching or seq.seq_id in self.tables or seq.num_computed_tokens:
            return []
        matched, previous = [], None
        # Leave the last token out: it must be computed to produce the logits of the next one.
        for j in range((seq.num_tokens - 1) // self.block_size):
            tokens = tuple(seq.token_ids[j * self.block_size : (j + 1) * self.block_size])
            previous = chain_hash(previous, tokens)
            block_id = self.cached.get(previous)
            if block_id is None or self.blocks[block_id].token_ids != tokens:
                break
            matched.append(block_id)
        return matched

    def _blocks_needed(self, seq: Sequence, num_new_tokens: int) -> int:
        """Free blocks this allocation would consume (new blocks, a copy-on-write, reused blocks now free)."""
        table = self.tables.get(seq.seq_id)
        if table is None:
            matched = self._match_prefix(seq)
            computed = len(matched) * self.block_size
            revived = sum(1 for b in matched if self.blocks[b].ref_count == 0)
            return revived + -(-(computed + num_new_tokens) // self.block_size) - len(matched)
        end = seq.num_computed_tokens + num_new_tokens
        cow = 1 if seq.num_computed_tokens % self.block_size and self.blocks[table[-1]].ref_count > 1 else 0
        return cow + max(0, -(-end // self.block_size) - len(table))

    def _admit(self, seq: Sequence) -> None:
        matched = self._match_prefix(seq)
        if self.enable_prefix_caching:
            self.prefix_queried_tokens += seq.num_prompt_tokens
            self.prefix_hit_tokens += len(matched) * self.block_size
        for block_id in matched:
            self.free_ids.pop(block_id, None)  # a cached block that was free comes back to life
            self.blocks[block_id].ref_count += 1
        self.tables[seq.seq_id] = matched
        self._num_hashed[seq.seq_id] = len(matched)
        seq.num_computed_tokens = len(matched) * self.block_size

    def _take_free_block(self) -> int:
        block_id, _ = self.free_ids.popitem(last=False)  # least recently freed
        block = self.blocks[block_id]
        if block.hash is not None and self.cached.get(block.hash) == block_id:
            del self.cached[block.hash]  # evict its cached prefix
        block.hash, block.token_ids, block.num_filled, block.ref_count = None, (), 0, 1
        return block_id

    def _release(self, block_id: int) -> None:
        block = self.blocks[block_id]
        assert block.ref_count > 0, f"block {block_id} freed twice"
        block.ref_count -= 1
        if block.ref_count == 0:
            self.free_ids[block_id] = None

    def _copy_on_write(self, block_id: int) -> int:
        new_id = self._take_free_block()
        self.blocks[new_id].num_filled = self.blocks[block_id].num_filled
        self.pending_copies.append((block_id, new_id))
        self.num_cow_copies += 1
        self._release(block_id)
        return new_id

    def _register_full_blocks(self, seq: Sequence, table: list[int], end: int) -> None:
        """Name every block that is full once this step's tokens are written, so later prompts can reuse it."""
        first = self._num_hashed.get(seq.seq_id, 0)  # blocks before this one are named already
        end = min(end, seq.num_tokens - seq.num_pending_tokens)  # a token still in flight has no value to hash
        if end // self.block_size <= first:
            return  # no block became full (most decode steps)
        previous = self.blocks[table[first - 1]].hash if first else None
        for j in range(first, end // self.block_size):
            block = self.blocks[table[j]]
            if block.hash is None:
                block.token_ids = tuple(seq.token_ids[j * self.block_size : (j + 1) * self.block_size])
                block.hash = chain_hash(previous, block.token_ids)
                self.cached.setdefault(block.hash, block.block_id)
            previous = block.hash
        self._num_hashed[seq.seq_id] = max(first, end // self.block_size)
