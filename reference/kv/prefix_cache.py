"""Prefix caching's index (lab 0.3): which physical block holds which full block of tokens.

A full block is named by a chained hash of its tokens and the previous block's name, so equal names mean equal
prefixes: h_j = chain_hash(h_{j-1}, block j's tokens), h_{-1} = None. The index also keeps each block's tokens
and compares them on a hit, so a hash collision can never hand out the wrong K/V. The paged block manager
(block_manager.py) keeps one PrefixCache and asks it; this module holds no tensors and knows no sequences.
"""

from __future__ import annotations


def chain_hash(previous: int | None, token_ids: tuple[int, ...]) -> int:
    """Name of a full block: depends on its tokens AND on every token before it (through `previous`)."""
    return hash((previous, token_ids))


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
    insert_block(previous, tokens, block_id): insert one full block that follows the block named `previous`;
        returns its name (the block manager names a sequence's blocks one at a time, as they fill).
    """

    def __init__(self, block_size: int) -> None:
        self.block_size = block_size
        self.by_hash: dict[int, tuple[int, tuple[int, ...]]] = {}  # hash -> (block id, its tokens)
        self.hash_of: dict[int, int] = {}  # block id -> hash

    def insert(self, token_ids: list[int], block_ids: list[int]) -> int:
        before = len(self.hash_of)
        previous = None
        for j, block_id in enumerate(block_ids[: len(token_ids) // self.block_size]):
            previous = self.insert_block(previous, tuple(token_ids[j * self.block_size : (j + 1) * self.block_size]),
                                         block_id)
        return len(self.hash_of) - before

    def insert_block(self, previous: int | None, tokens: tuple[int, ...], block_id: int) -> int:
        block_hash = chain_hash(previous, tokens)
        if block_hash not in self.by_hash and block_id not in self.hash_of:
            self.by_hash[block_hash] = (block_id, tokens)
            self.hash_of[block_id] = block_hash
        return block_hash

    def lookup(self, token_ids: list[int]) -> list[int]:
        found, previous = [], None
        for j in range((len(token_ids) - 1) // self.block_size):  # leave the last token out
            tokens = tuple(token_ids[j * self.block_size : (j + 1) * self.block_size])
            previous = chain_hash(previous, tokens)
            entry = self.by_hash.get(previous)
            if entry is None or entry[1] != tokens:
                break  # stop at the first miss: later blocks' names depend on this one
            found.append(entry[0])
        return found

    def evict(self, block_id: int) -> bool:
        block_hash = self.hash_of.pop(block_id, None)
        if block_hash is None:
            return False
        del self.by_hash[block_hash]
        return True
