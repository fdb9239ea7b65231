"""The paged cache's bookkeeping rules as small stand-alone functions (lab 0.3 and its tests).

The block manager (block_manager.py) applies these rules inside one stateful object tied to sequences and
the scheduler; here each rule stands alone so that a lab can ask for it, test it and show it:
- slot_mapping: where a token's K/V lives, slot = block_table[pos // block_size] * block_size + pos % block_size;
- block_hashes: the chained names of a token list's full blocks (the same `chain_hash` the manager uses);
- PrefixCache: the hash -> block index behind prefix caching, with token verification and eviction.
tests/test_lab03_hooks.py checks each against the block manager and build_metadata.
This module holds no tensors of the cache and never changes the block manager.
"""

from __future__ import annotations

import torch

from .block_manager import chain_hash


def slot_mapping(block_table: list[int], positions: torch.Tensor, block_size: int) -> torch.Tensor:
    """Cache slot of each position of one sequence.

    block_table: the sequence's block ids in order; positions: int64 [n], each >= 0 or -1 (padding).
    Returns int64 [n]: block_table[p // block_size] * block_size + p % block_size, and -1 where p == -1.
    Raises ValueError when a position's block is not in the table (past its end, or an entry of -1).
    """
    positions = torch.as_tensor(positions, dtype=torch.int64)
    table = torch.tensor(list(block_table) + [-1], dtype=torch.int64)  # the extra -1 catches "past the end"
    padding = positions < 0
    index = torch.where(padding, 0, positions // block_size).clamp(max=len(table) - 1)
    blocks = table[index]
    if bool(((blocks < 0) & ~padding).any()):
        bad = int(positions[(blocks < 0) & ~padding][0])
        raise ValueError(f"position {bad} needs block {bad // block_size} of a table with {len(block_table)} "
                         f"entries {list(block_table)}")
    slots = blocks * block_size + positions % block_size
    return torch.where(padding, torch.full_like(slots, -1), slots)


def block_hashes(token_ids: list[int], block_size: int) -> list[int]:
    """Chained hashes of the full blocks of token_ids: h_j = chain_hash(h_{j-1}, block j's tokens), h_{-1} = None.

    A partly filled last block has no hash (its tokens are not final). Equal hashes mean equal prefixes.
    """
    hashes: list[int] = []
    previous = None
    for j in range(len(token_ids) // block_size):
        previous = chain_hash(previous, tuple(token_ids[j * block_size : (j + 1) * block_size]))
        hashes.append(previous)
    return hashes


class PrefixCache:
    """Which physical block holds which full block of tokens, found by chained hash and checked by tokens.

    insert(token_ids, block_ids): a sequence whose first len(block_ids) blocks are block_ids; each FULL block
        becomes findable (the first block to register a hash keeps it). Returns how many were new.
    lookup(token_ids): block ids holding the longest cached run of token_ids' leading full blocks, never
        covering the last token (it must run through the model to give the next token's logits).
    evict(block_id): the block is reused for other tokens: forget it. Returns whether it was cached.
    """

    def __init__(self, block_size: int) -> None:
        self.block_size = block_size
        self.by_hash: dict[int, tuple[int, tuple[int, ...]]] = {}  # hash -> (block id, its tokens)
        self.hash_of: dict[int, int] = {}  # block id -> hash

    def insert(self, token_ids: list[int], block_ids: list[int]) -> int:
        added = 0
        hashes = block_hashes(token_ids, self.block_size)
        for j, (h, block_id) in enumerate(zip(hashes, block_ids)):
            if h in self.by_hash or block_id in self.hash_of:
                continue
            self.by_hash[h] = (block_id, tuple(token_ids[j * self.block_size : (j + 1) * self.block_size]))
            self.hash_of[block_id] = h
            added += 1
        return added

    def lookup(self, token_ids: list[int]) -> list[int]:
        usable = token_ids[: max(0, len(token_ids) - 1)]  # leave the last token out
        found = []
        for j, h in enumerate(block_hashes(usable, self.block_size)):
            entry = self.by_hash.get(h)
            if entry is None or entry[1] != tuple(usable[j * self.block_size : (j + 1) * self.block_size]):
                break
            found.append(entry[0])
        return found

    def evict(self, block_id: int) -> bool:
        h = self.hash_of.pop(block_id, None)
        if h is None:
            return False
        del self.by_hash[h]
        return True
