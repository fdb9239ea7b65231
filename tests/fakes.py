"""Test doubles for the scheduler: the one fake engine, and a paged KV manager with exact bookkeeping.

- The fake engine (its model runner FakeRunner, `schedule`, the fake model next_token / expected_output) lives in
  autograder/harness/fake_engine.py, since lab 0.2's grader drives learner code with it too; it is re-exported here.
- FakePagedKVManager hands out blocks on demand (a sequence holding T tokens owns ceil(T / block_size) blocks)
  and checks its own books on every call, so a scheduler that frees twice, leaks or shares a block fails loudly.
- run_steps drives schedule + runner step by step and records what each step did.

Nothing here loads a model; these fakes only know the scheduler's and KV manager's interfaces.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from autograder.harness.fake_engine import FAKE_VOCAB_SIZE, FakeRunner, expected_output, next_token, schedule
from reference.kv import blocks_for_tokens as blocks_for  # ceil(num_tokens / block_size)
from reference.kv_manager import KVCacheManager
from reference.scheduler import ScheduledBatch, Scheduler
from reference.sequence import Sequence

__all__ = ["FAKE_VOCAB_SIZE", "FakePagedKVManager", "FakeRunner", "StepTrace", "blocks_for", "expected_output",
           "next_token", "run_steps", "schedule"]


class FakePagedKVManager(KVCacheManager):
    """On-demand block allocation with exact ownership records; every mutation re-checks the books.

    tables[seq_id] lists the blocks a sequence owns, in order; owner[block_id] says who owns a block. A block is
    in exactly one place: the free list or one table. free() of a sequence holding nothing is a no-op, but a
    block id entering the free list twice is an AssertionError (that would be a double free).
    """

    def __init__(self, num_blocks: int, block_size: int) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"num_blocks and block_size must be >= 1, got {num_blocks} and {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._free: list[int] = list(range(num_blocks - 1, -1, -1))  # pop() hands out block 0 first
        self._free_set: set[int] = set(self._free)
        self.tables: dict[int, list[int]] = {}
        self.owner: dict[int, int] = {}
        self.num_allocations = 0
        self.num_frees = 0
        self.peak_blocks_in_use = 0

    # -- the KVCacheManager interface -------------------------------------------------------------------------
    def _new_blocks_needed(self, seq: Sequence, num_new_tokens: int) -> int:
        held = len(self.tables.get(seq.seq_id, ()))
        return blocks_for(seq.num_computed_tokens + num_new_tokens, self.block_size) - held

    def can_allocate(self, seq: Sequence, num_new_tokens: int) -> bool:
        assert num_new_tokens >= 1, f"can_allocate asked for {num_new_tokens} tokens"
        return self._new_blocks_needed(seq, num_new_tokens) <= len(self._free)

    def allocate(self, seq: Sequence, num_new_tokens: int) -> None:
        assert self.can_allocate(seq, num_new_tokens), "allocate() without a successful can_allocate()"
        needed = self._new_blocks_needed(seq, num_new_tokens)
        # A sequence never holds more than its tokens need: a reset (preemption) must have freed it first.
        assert needed >= 0, (f"seq {seq.seq_id} holds {-needed} blocks more than its "
                             f"{seq.num_computed_tokens} + {num_new_tokens} tokens need")
        table = self.tables.setdefault(seq.seq_id, [])
        for _ in range(needed):
            block_id = self._free.pop()
            self._free_set.remove(block_id)
            assert block_id not in self.owner, f"block {block_id} was free and owned by seq {self.owner[block_id]}"
            self.owner[block_id] = seq.seq_id
            table.append(block_id)
        self.num_allocations += 1
        self.peak_blocks_in_use = max(self.peak_blocks_in_use, self.num_blocks - len(self._free))
        self.check()

    def free(self, seq: Sequence) -> None:
        for block_id in self.tables.pop(seq.seq_id, []):
            assert block_id not in self._free_set, f"double free of block {block_id} (seq {seq.seq_id})"
            assert self.owner.pop(block_id) == seq.seq_id, f"block {block_id} freed by a seq that did not own it"
            self._free.append(block_id)
            self._free_set.add(block_id)
        self.num_frees += 1
        self.check()

    def block_table(self, seq: Sequence) -> list[int]:
        return self.tables[seq.seq_id]

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    def num_reserved_slots(self) -> int:
        return self.num_held_blocks * self.block_size

    # -- bookkeeping for tests --------------------------------------------------------------------------------
    @property
    def num_held_blocks(self) -> int:
        return sum(len(table) for table in self.tables.values())

    def num_blocks_of(self, seq: Sequence) -> int:
        return len(self.tables.get(seq.seq_id, ()))

    def holds(self, seq: Sequence) -> bool:
        return bool(self.tables.get(seq.seq_id))

    def check(self) -> None:
        """free + held == all blocks, each block in exactly one place, owner map consistent with tables."""
        assert len(self._free) == len(self._free_set), "a block id is in the free list twice"
        held = [b for table in self.tables.values() for b in table]
        assert len(held) == len(set(held)), "a block is owned by two sequences (or twice by one)"
        assert not self._free_set & set(held), "a block is both free and owned"
        assert self._free_set | set(held) == set(range(self.num_blocks)), "a block was leaked (neither free nor owned)"
        assert {b: s for s, table in self.tables.items() for b in table} == self.owner


@dataclass
class StepTrace:
    """What one step did."""

    step: int
    scheduled: list[tuple[int, int]]  # (seq_id, num_tokens) in batch order
    num_tokens: int
    num_prefill_tokens: int
    num_decode_tokens: int
    preempted: list[int]  # seq_ids
    sampled: list[int]  # seq_ids that got a token this step
    finished: list[int]  # seq_ids finished this step (max_tokens reached)
    num_running: int  # after the step
    num_waiting: int  # after the step
    num_free_blocks: int  # after the step


StepHook = Callable[[Scheduler, ScheduledBatch], None]


def run_steps(
    scheduler: Scheduler,
    runner: FakeRunner,
    max_steps: int,
    arrivals: dict[int, list[Sequence]] | None = None,
    after_schedule: StepHook | None = None,
    after_run: StepHook | None = None,
) -> list[StepTrace]:
    """Step until nothing is unfinished and nothing is left to arrive, or max_steps steps ran.

    arrivals[k] are added (in list order) just before step k is scheduled. after_schedule sees the batch before
    the runner executes it, after_run after. The caller checks scheduler.has_unfinished() to tell a hang.
    """
    arrivals = dict(arrivals or {})
    records: list[StepTrace] = []
    for step in range(max_steps):
        for seq in arrivals.pop(step, []):
            scheduler.add(seq)
        if not scheduler.has_unfinished() and not arrivals:
            break
        batch = schedule(scheduler)
        scheduled = [(s.seq_id, n) for s, n in zip(batch.seqs, batch.num_tokens)]
        num_prefill, num_decode = batch.num_prefill_tokens, batch.num_decode_tokens  # before the runner moves them
        if after_schedule is not None:
            after_schedule(scheduler, batch)
        sampled, finished = runner.step(batch)
        if after_run is not None:
            after_run(scheduler, batch)
        records.append(StepTrace(
            step=step, scheduled=scheduled, num_tokens=batch.total_tokens, num_prefill_tokens=num_prefill,
            num_decode_tokens=num_decode, preempted=[s.seq_id for s in batch.preempted],
            sampled=[s.seq_id for s in sampled], finished=[s.seq_id for s in finished],
            num_running=len(scheduler.running), num_waiting=len(scheduler.waiting),
            num_free_blocks=scheduler.kv.num_free_blocks,
        ))
    return records
