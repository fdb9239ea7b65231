"""The paged block manager under random operations (hypothesis state machine).

Besides the bookkeeping invariants (exact ref counts, no leaked or double-freed block, free pool consistent,
cache index consistent), the machine simulates the KV cache itself: each computed token "writes" its token id
into its slot, copy-on-write copies are applied as the model runner would, and after every operation every
live sequence must read back exactly its own tokens through its block table. So a prefix-cache hit on the
wrong block, a shared block written in place, or a freed block still in use all show up as wrong contents.
"""

from __future__ import annotations

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from reference.kv import prefix_cache
from reference.block_manager import BlockManager
from reference.sampling import SamplingParams
from reference.sequence import Sequence

PARAMS = SamplingParams(max_tokens=1000)


class BlockManagerMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.manager: BlockManager | None = None
        self.live: list[Sequence] = []
        self.cache: dict[int, int] = {}  # slot -> token id written there

    @precondition(lambda self: self.manager is None)
    @rule(num_blocks=st.integers(4, 24), block_size=st.sampled_from([1, 2, 4, 8]), caching=st.booleans())
    def setup(self, num_blocks, block_size, caching):
        self.manager = BlockManager(num_blocks, block_size, enable_prefix_caching=caching)

    # -- operations ---------------------------------------------------------------------------------------------
    def _compute(self, seq: Sequence, num_tokens: int, start: int | None = None) -> bool:
        """Allocate and 'run' num_tokens of seq's tokens from `start` (default: its first uncomputed one; a new
        sequence's cached prefix length), as the scheduler, model runner and engine would."""
        start = seq.num_computed_tokens if start is None else start
        if not self.manager.can_allocate(seq, num_tokens):
            return False
        self.manager.allocate(seq, num_tokens)
        for source, destination in self.manager.take_pending_copies():
            size = self.manager.block_size
            for offset in range(size):
                if source * size + offset in self.cache:
                    self.cache[destination * size + offset] = self.cache[source * size + offset]
        table = self.manager.block_table(seq)
        for pos in range(start, start + num_tokens):
            slot = table[pos // self.manager.block_size] * self.manager.block_size + pos % self.manager.block_size
            self.cache[slot] = seq.token_ids[pos]
        seq.num_computed_tokens = start + num_tokens  # the engine's record; the manager never writes it
        return True

    @precondition(lambda self: self.manager is not None)
    @rule(prompt=st.lists(st.integers(0, 3), min_size=1, max_size=20), chunk=st.integers(1, 20))
    def admit(self, prompt, chunk):
        """A new sequence; a tiny token alphabet makes shared prefixes (cache hits) common."""
        seq = Sequence("r", prompt, PARAMS)
        cached = self.manager.cached_prefix_len(seq)
        assert cached < len(prompt) and cached % self.manager.block_size == 0
        num_tokens = min(len(prompt) - cached, chunk)
        if self._compute(seq, num_tokens, start=cached):
            size = self.manager.block_size
            assert len(self.manager.block_table(seq)) == -(-(cached + num_tokens) // size), "cached + new blocks"
            self.live.append(seq)
        else:
            assert seq.seq_id not in self.manager.tables, "a refused admission must hold nothing"

    @precondition(lambda self: self.live)
    @rule(data=st.data(), new_tokens=st.lists(st.integers(0, 3), max_size=6))
    def grow(self, data, new_tokens):
        """Finish the prompt, or append sampled tokens and compute them (decode)."""
        seq = data.draw(st.sampled_from(self.live))
        seq.token_ids.extend(new_tokens)
        if seq.num_uncomputed_tokens:
            self._compute(seq, data.draw(st.integers(1, seq.num_uncomputed_tokens)))

    @precondition(lambda self: self.live)
    @rule(data=st.data())
    def fork(self, data):
        """Parallel sampling: a child shares all of the parent's computed tokens but the last."""
        parent = data.draw(st.sampled_from(self.live))
        if parent.num_computed_tokens < 1:
            return
        shared = parent.num_computed_tokens - 1
        child = Sequence("r", parent.token_ids[: parent.num_computed_tokens], PARAMS)
        self.manager.fork(parent, child, shared)
        child.num_computed_tokens = shared
        self.live.append(child)
        self._compute(child, 1)  # writes into the shared block: copy-on-write unless it is alone

    @precondition(lambda self: self.live)
    @rule(data=st.data())
    def free(self, data):
        seq = data.draw(st.sampled_from(self.live))
        self.live.remove(seq)
        self.manager.free(seq)
        self.manager.free(seq)  # freeing twice is harmless

    # -- invariants ---------------------------------------------------------------------------------------------
    @invariant()
    def ref_counts_are_exact_and_the_pool_is_consistent(self):
        if self.manager is None:
            return
        m = self.manager
        owners = {}
        for table in m.tables.values():
            for block_id in table:
                owners[block_id] = owners.get(block_id, 0) + 1
        for block in m.blocks:
            assert block.ref_count == owners.get(block.block_id, 0)
            assert (block.ref_count == 0) == (block.block_id in m.free_ids)
        assert set(m.tables) == {s.seq_id for s in self.live}
        index = m.prefix_cache
        assert {block_id: h for h, (block_id, _) in index.by_hash.items()} == index.hash_of  # one name per block

    @invariant()
    def every_sequence_reads_back_its_own_tokens(self):
        if self.manager is None:
            return
        size = self.manager.block_size
        for seq in self.live:
            table = self.manager.block_table(seq)
            assert len(table) == -(-seq.num_computed_tokens // size), "holds exactly the blocks its tokens need"
            for pos in range(seq.num_computed_tokens):
                assert self.cache.get(table[pos // size] * size + pos % size) == seq.token_ids[pos], (
                    f"seq {seq.seq_id} position {pos} reads the wrong KV"
                )


BlockManagerMachine.TestCase.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)
TestBlockManager = BlockManagerMachine.TestCase


class CollidingHashMachine(BlockManagerMachine):
    """Every block gets the same hash: only the token comparison stands between a lookup and wrong KV."""

    def __init__(self) -> None:
        super().__init__()
        self._real_hash = prefix_cache.chain_hash
        prefix_cache.chain_hash = lambda previous, tokens: 0

    def teardown(self) -> None:
        prefix_cache.chain_hash = self._real_hash


CollidingHashMachine.TestCase.settings = settings(max_examples=60, stateful_step_count=30, deadline=None)
TestBlockManagerWithCollidingHashes = CollidingHashMachine.TestCase


def test_freed_cached_blocks_are_evicted_least_recently_freed_first():
    manager = BlockManager(num_blocks=4, block_size=2)
    first = Sequence("a", [1, 2, 3], PARAMS)
    second = Sequence("b", [4, 5, 6], PARAMS)
    for seq in (first, second):
        manager.allocate(seq, 3)
        seq.num_computed_tokens = 3
    manager.free(first)
    manager.free(second)
    assert manager.num_cached_free_blocks == 2  # each freed a full, named block [1, 2] and [4, 5]
    # A newcomer needing 3 fresh blocks takes the 2 unnamed ones, then evicts first's (freed earlier).
    manager.allocate(Sequence("c", [7, 8, 9, 10, 11], PARAMS), 5)
    assert manager.cached_prefix_len(Sequence("d", [1, 2, 0], PARAMS)) == 0
    assert manager.cached_prefix_len(Sequence("e", [4, 5, 0], PARAMS)) == 2


@pytest.mark.parametrize("block_size", [0, 3, 12])
def test_block_size_must_be_a_power_of_two(block_size):
    with pytest.raises(ValueError, match="power of two"):
        BlockManager(num_blocks=4, block_size=block_size)


def test_accounting_reports_used_reserved_and_cached_slots():
    manager = BlockManager(num_blocks=10, block_size=4)
    lengths = [5, 8, 1]  # 2 + 2 + 1 blocks; 3 + 0 + 3 slots reserved but empty
    seqs = [Sequence(f"s{i}", list(range(100 * i, 100 * i + n)), PARAMS) for i, n in enumerate(lengths)]
    for seq in seqs:
        manager.allocate(seq, seq.num_tokens)
        seq.num_computed_tokens = seq.num_tokens
    assert manager.num_free_blocks == 5 and manager.usage == 0.5
    assert manager.num_used_slots() == sum(lengths)
    assert manager.num_reserved_slots() == 5 * 4  # internal fragmentation = 20 - 14 = 6 slots
    manager.free(seqs[1])
    assert manager.num_cached_free_blocks == 2  # its two full blocks stay findable
    assert manager.cached_prefix_len(Sequence("again", list(range(100, 108)) + [7], PARAMS)) == 8
    assert manager.prefix_hit_rate == 0.0  # lookups count when a sequence is admitted, not when asked
