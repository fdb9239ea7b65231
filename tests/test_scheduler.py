"""The scheduler: budgets, chunked prefill, policies, preemption by recompute, and memory bookkeeping.

Unit tests pin down single behaviours step by step; property tests (hypothesis) drive random workloads through
the scheduler with tests/fakes.py's paged KV manager and model runner and check, every step, the invariants the
engine relies on, and at the end that every request produced exactly the tokens an unpreempted run produces.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import pytest
from hypothesis import HealthCheck, event, example, given, settings, target
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from fakes import (FAKE_VOCAB_SIZE, FakePagedKVManager, FakeRunner, blocks_for, expected_output, run_steps,
                   schedule)
from reference.engine import record_computed, record_plan
from reference.kv import BlockManager
from reference.kv_manager import ContiguousKVManager
from reference.policies import PriorityWithAging
from reference.sampling import SamplingParams
from reference.scheduler import ScheduledBatch, Scheduler
from reference.sequence import Sequence, SequenceStatus


# -- helpers --------------------------------------------------------------------------------------------------------
def make_seq(request_id: str, prompt_len: int, max_tokens: int, *, priority: int = 0, arrival: float = 0.0) -> Sequence:
    """A sequence with distinct, reproducible prompt tokens (a function of request_id only)."""
    base = zlib.crc32(request_id.encode())
    prompt = [(base + 7 * position) % FAKE_VOCAB_SIZE for position in range(prompt_len)]
    return Sequence(request_id, prompt, SamplingParams(max_tokens=max_tokens), priority=priority, arrival_time=arrival)


def paged(num_blocks: int = 256, block_size: int = 4, *, max_num_seqs: int = 8, budget: int = 64,
          policy="fcfs", chunked: bool = True) -> tuple[Scheduler, FakeRunner, FakePagedKVManager]:
    kv = FakePagedKVManager(num_blocks, block_size)
    scheduler = Scheduler(kv, max_num_seqs, budget, policy, enable_chunked_prefill=chunked)
    return scheduler, FakeRunner(scheduler), kv


def step(scheduler: Scheduler, runner: FakeRunner) -> tuple[list[tuple[str, int]], ScheduledBatch]:
    """Schedule and run one step; returns the plan as (request_id, num_tokens) taken before the runner ran."""
    batch = schedule(scheduler)
    plan = [(seq.request_id, num_tokens) for seq, num_tokens in zip(batch.seqs, batch.num_tokens)]
    runner.step(batch)
    return plan, batch


def first_scheduled_order(records, seqs: list[Sequence]) -> list[str]:
    """Request ids in the order they were first scheduled."""
    name = {s.seq_id: s.request_id for s in seqs}
    order: list[str] = []
    for record in records:
        for seq_id, _ in record.scheduled:
            if name[seq_id] not in order:
                order.append(name[seq_id])
    return order


def step_of(records, seq: Sequence, what: str) -> int:
    """The first step whose record lists seq under `what` ("scheduled" or "finished")."""
    for record in records:
        ids = [seq_id for seq_id, _ in record.scheduled] if what == "scheduled" else getattr(record, what)
        if seq.seq_id in ids:
            return record.step
    raise AssertionError(f"{seq.request_id} never appears under {what}")


# -- budget, decode-first, chunked prefill ----------------------------------------------------------------------
def test_decodes_go_before_new_prefills_and_the_leftover_budget_goes_to_a_prefill_chunk():
    scheduler, runner, _ = paged(budget=10)
    a, b = make_seq("A", 3, 10), make_seq("B", 3, 10)
    scheduler.add(a)
    scheduler.add(b)
    assert step(scheduler, runner)[0] == [("A", 3), ("B", 3)]
    c = make_seq("C", 20, 10)
    scheduler.add(c)
    plan, batch = step(scheduler, runner)
    assert plan == [("A", 1), ("B", 1), ("C", 8)]
    assert c.output_token_ids == []  # a chunk that does not finish the prompt samples nothing
    assert step(scheduler, runner)[0] == [("A", 1), ("B", 1), ("C", 8)]
    assert c.output_token_ids == []
    assert step(scheduler, runner)[0] == [("A", 1), ("B", 1), ("C", 4)]  # 20 = 8 + 8 + 4
    assert c.output_token_ids == expected_output(c.prompt_token_ids, 1)
    assert step(scheduler, runner)[0] == [("A", 1), ("B", 1), ("C", 1)]


def test_batch_counts_prefill_and_decode_tokens_separately():
    scheduler, runner, _ = paged(budget=10)
    scheduler.add(make_seq("A", 3, 10))
    step(scheduler, runner)
    scheduler.add(make_seq("C", 20, 10))
    batch = scheduler.schedule()
    assert (batch.total_tokens, batch.num_decode_tokens, batch.num_prefill_tokens) == (10, 1, 9)


def test_a_long_prompt_is_split_over_steps_beside_chunks_of_another_prompt():
    scheduler, runner, _ = paged(budget=8)
    a, b = make_seq("A", 5, 4), make_seq("B", 10, 4)
    scheduler.add(a)
    scheduler.add(b)
    assert step(scheduler, runner)[0] == [("A", 5), ("B", 3)]  # B's first chunk rides along A's whole prompt
    assert (len(a.output_token_ids), len(b.output_token_ids), b.num_computed_tokens) == (1, 0, 3)
    assert step(scheduler, runner)[0] == [("A", 1), ("B", 7)]  # A decodes, B's second chunk takes the rest
    assert (len(a.output_token_ids), len(b.output_token_ids)) == (2, 1)
    assert step(scheduler, runner)[0] == [("A", 1), ("B", 1)]


def test_without_chunked_prefill_a_prompt_runs_only_whole_and_blocks_those_behind_it():
    scheduler, runner, _ = paged(budget=8, chunked=False)
    scheduler.add(make_seq("A", 5, 4))
    scheduler.add(make_seq("B", 6, 4))  # 6 > the 3 tokens A leaves: waits a step instead of being split
    scheduler.add(make_seq("C", 2, 4))  # would fit, but must not overtake B
    assert step(scheduler, runner)[0] == [("A", 5)]
    assert step(scheduler, runner)[0] == [("A", 1), ("B", 6)]
    assert step(scheduler, runner)[0] == [("A", 1), ("B", 1), ("C", 2)]


def test_without_chunked_prefill_a_prompt_longer_than_the_budget_is_never_split():
    # The engine config rejects this setting (max_num_batched_tokens < max_model_len); the scheduler must still
    # never run part of the prompt.
    scheduler, runner, kv = paged(budget=8, chunked=False)
    seq = make_seq("A", 9, 4)
    scheduler.add(seq)
    for _ in range(3):
        assert step(scheduler, runner)[0] == []
    assert (seq.num_computed_tokens, seq.status, kv.num_held_blocks) == (0, SequenceStatus.WAITING, 0)


def test_the_token_budget_is_filled_but_never_exceeded():
    scheduler, runner, _ = paged(budget=16)
    seqs = [make_seq(name, 13, 4, arrival=i) for i, name in enumerate("ABCDE")]
    records = run_steps(scheduler, runner, max_steps=50, arrivals={0: seqs})
    # step 0: A13 B3 | 1: A1 B10 C5 | 2: A1 B1 C8 D6 | 3: A1(done) B1 C1 D7 E6 | 4: B1(done) C1 D1 E7
    assert [r.num_tokens for r in records[:5]] == [16, 16, 16, 16, 10]
    assert max(r.num_tokens for r in records) <= 16
    assert not scheduler.has_unfinished()


def test_max_num_seqs_caps_the_running_set():
    scheduler, runner, _ = paged(max_num_seqs=2)
    seqs = [make_seq(name, 2, 3, arrival=i) for i, name in enumerate("ABCD")]
    records = run_steps(scheduler, runner, max_steps=50, arrivals={0: seqs})
    assert [r.num_running for r in records] == [2, 2, 0, 2, 2, 0]  # A, B finish at step 2; C, D at step 5
    assert [sorted(seq_id for seq_id, _ in r.scheduled) for r in records] == (
        [[seqs[0].seq_id, seqs[1].seq_id]] * 3 + [[seqs[2].seq_id, seqs[3].seq_id]] * 3)
    assert [len(s.output_token_ids) for s in seqs] == [3, 3, 3, 3]


# -- the contiguous manager ---------------------------------------------------------------------------------------
def test_contiguous_manager_admits_only_while_a_row_is_free_and_never_preempts():
    kv = ContiguousKVManager(max_num_seqs=2, max_model_len=32)
    scheduler = Scheduler(kv, max_num_seqs=4, max_num_batched_tokens=64)  # more seats than rows
    runner = FakeRunner(scheduler)
    a, b, c = (make_seq(name, 4, 3, arrival=i) for i, name in enumerate("ABC"))
    for seq in (a, b, c):
        scheduler.add(seq)
    plan, _ = step(scheduler, runner)
    assert plan == [("A", 4), ("B", 4)]
    assert (kv.num_free_blocks, kv.block_table(a), kv.block_table(b), list(scheduler.waiting)) == (0, [0], [1], [c])
    records = run_steps(scheduler, runner, max_steps=20)
    assert all(r.preempted == [] for r in records)
    assert not scheduler.has_unfinished() and kv.num_free_blocks == 2 and kv.num_reserved_slots() == 0
    assert all(s.output_token_ids == expected_output(s.prompt_token_ids, 3) for s in (a, b, c))


def test_contiguous_manager_free_returns_the_row_and_rejects_growth_past_max_model_len():
    kv = ContiguousKVManager(max_num_seqs=2, max_model_len=8)
    a, b, c = make_seq("A", 4, 3), make_seq("B", 4, 3), make_seq("C", 4, 3)
    kv.allocate(a, 4)
    kv.allocate(b, 4)
    assert (kv.block_table(a), kv.block_table(b), kv.num_free_blocks) == ([0], [1], 0)
    assert not kv.can_allocate(c, 4)
    assert kv.can_allocate(a, 4)  # growing within its own row needs no free row
    a.num_computed_tokens = 4
    assert not kv.can_allocate(a, 5)  # 9 > max_model_len
    kv.free(a)
    kv.free(a)  # freeing a sequence that holds nothing is a no-op, not a double free
    assert (kv.num_free_blocks, kv.num_reserved_slots()) == (1, 8)
    kv.allocate(c, 4)
    assert kv.block_table(c) == [0]


# -- policies -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("policy, expected", [("fcfs", "ABC"), ("sjf", "BCA"), ("priority", "CAB")])
def test_policy_decides_the_admission_order(policy, expected):
    # A: 9 prompt tokens, priority 1; B: 2 tokens, priority 2; C: 5 tokens, priority 0; arriving A, B, C.
    scheduler, runner, _ = paged(max_num_seqs=1, policy=policy)
    seqs = [make_seq("A", 9, 1, priority=1, arrival=0), make_seq("B", 2, 1, priority=2, arrival=1),
            make_seq("C", 5, 1, priority=0, arrival=2)]
    records = run_steps(scheduler, runner, max_steps=10, arrivals={0: seqs})
    assert "".join(first_scheduled_order(records, seqs)) == expected
    assert len(records) == 3


def test_sjf_counts_the_remaining_tokens_of_a_preempted_sequence():
    # A preempted sequence must recompute its prompt AND its output so far; SJF ranks it by all of it.
    scheduler, runner, _ = paged(max_num_seqs=1, policy="sjf")
    preempted = make_seq("P", 4, 10, arrival=0)
    preempted.token_ids += [1, 2, 3, 4, 5, 6]  # 10 tokens to recompute
    fresh = make_seq("F", 8, 1, arrival=1)
    records = run_steps(scheduler, runner, max_steps=20, arrivals={0: [preempted, fresh]})
    assert first_scheduled_order(records, [preempted, fresh]) == ["F", "P"]


def test_priority_aging_lets_a_low_priority_request_overtake_a_stream_of_urgent_ones():
    # One urgent request (priority 0, done in one step) arrives every step and max_num_seqs=1, so without aging
    # the low-priority one never gets the seat. With aging_steps=k it gains a level every k steps: at step
    # priority * k its key equals a newcomer's and the earlier arrival wins the tie.
    low_priority, aging_steps = 3, 2

    def run(policy):
        scheduler, runner, _ = paged(max_num_seqs=1, policy=policy)
        low = make_seq("L", 2, 3, priority=low_priority, arrival=0)
        arrivals = {0: [low]}
        for t in range(40):
            arrivals.setdefault(t, []).append(make_seq(f"H{t}", 2, 1, priority=0, arrival=t))
        return low, run_steps(scheduler, runner, max_steps=40, arrivals=arrivals)

    low, records = run(PriorityWithAging(aging_steps=aging_steps))
    assert step_of(records, low, "scheduled") == low_priority * aging_steps == 6
    assert step_of(records, low, "finished") == 8  # three steps: prefill + 2 decodes, alone on the seat
    assert low.output_token_ids == expected_output(low.prompt_token_ids, 3)

    starved, records = run(PriorityWithAging(aging_steps=10**6))
    assert all(starved.seq_id not in [seq_id for seq_id, _ in r.scheduled] for r in records)
    assert starved.status is SequenceStatus.WAITING


def test_priority_aging_keeps_the_ranking_of_two_sequences_fixed():
    # Every sequence gains one level per aging_steps, so which of two is more urgent must not change with time.
    # A: priority 1, queued at step 0; B: priority 0, queued at step 1: B is ahead by 2/3 of a level for good.
    # KNOWN BUG (fails today): floor(waited / k) rounds A and B at different steps, so every 3rd step they tie
    # and the earlier arrival, A, jumps ahead for one step. The scheduler picks preemption victims by this
    # ranking, so the two evict each other in turn (see the property test below).
    policy = PriorityWithAging(aging_steps=3)
    a, b = make_seq("A", 4, 1, priority=1, arrival=0), make_seq("B", 4, 1, priority=0, arrival=1)
    a.waiting_since_step, b.waiting_since_step = 0, 1
    ahead = [min((a, b), key=lambda s: policy.sort_key(s, step)).request_id for step in range(1, 13)]
    assert ahead == ["B"] * 12, f"more urgent at steps 1..12: {ahead}"


# -- preemption ---------------------------------------------------------------------------------------------------
def test_preemption_evicts_the_latest_arrival_which_later_finishes_with_identical_tokens():
    # 4 blocks of 4 slots. A and B (6-token prompts) fill them at step 0; at step 3 A needs a 3rd block.
    scheduler, runner, kv = paged(num_blocks=4, block_size=4)
    a, b = make_seq("A", 6, 8, arrival=0), make_seq("B", 6, 8, arrival=1)
    scheduler.add(a)
    scheduler.add(b)
    for _ in range(3):
        step(scheduler, runner)
    assert (kv.num_free_blocks, len(b.output_token_ids)) == (0, 3)
    b_tokens_so_far = list(b.token_ids)
    c = make_seq("C", 2, 2, arrival=3)
    scheduler.add(c)

    plan, batch = step(scheduler, runner)
    assert plan == [("A", 1)] and batch.preempted == [b]
    assert (b.num_computed_tokens, b.num_preemptions, kv.num_blocks_of(b)) == (0, 1, 0)
    assert b.status is SequenceStatus.WAITING
    assert b.token_ids == b_tokens_so_far  # its output so far is kept, only the cache is dropped
    assert b in scheduler.waiting and b not in scheduler.running
    assert (kv.num_free_blocks, c.status) == (1, SequenceStatus.WAITING)  # nothing admitted in a preempting step
    assert scheduler.num_preemptions == 1

    records = run_steps(scheduler, runner, max_steps=100)
    assert not scheduler.has_unfinished() and kv.num_free_blocks == 4
    assert a.num_preemptions == 0  # the earliest arrival is never the victim under FCFS

    # The same workload with ample memory: no preemption, and the very same tokens.
    ample_scheduler, ample_runner, _ = paged(num_blocks=64, block_size=4)
    twins = [make_seq("A", 6, 8, arrival=0), make_seq("B", 6, 8, arrival=1), make_seq("C", 2, 2, arrival=3)]
    ample = run_steps(ample_scheduler, ample_runner, max_steps=100, arrivals={0: twins[:2], 3: twins[2:]})
    assert all(r.preempted == [] for r in ample)
    for seq, twin in zip((a, b, c), twins):
        expected = expected_output(seq.prompt_token_ids, seq.params.max_tokens)
        assert seq.output_token_ids == twin.output_token_ids == expected


def test_the_victim_is_the_least_valued_running_sequence_not_the_next_in_line():
    # 6 blocks of 4; A, B, C hold 2 each after their 8-token prompts. At step 1 A needs a 3rd block: FCFS evicts C
    # (the latest arrival), whose 2 blocks then serve both A and B.
    scheduler, runner, kv = paged(num_blocks=6, block_size=4)
    a, b, c = (make_seq(name, 8, 4, arrival=i) for i, name in enumerate("ABC"))
    for seq in (a, b, c):
        scheduler.add(seq)
    assert step(scheduler, runner)[0] == [("A", 8), ("B", 8), ("C", 8)]
    plan, batch = step(scheduler, runner)
    assert plan == [("A", 1), ("B", 1)] and batch.preempted == [c]
    assert (kv.num_blocks_of(a), kv.num_blocks_of(b), kv.num_blocks_of(c), kv.num_free_blocks) == (3, 3, 0, 0)


def test_preemption_victim_follows_the_policy():
    # Same memory squeeze, but B is urgent: under "priority" the less urgent A (which arrived first) is evicted.
    scheduler, runner, kv = paged(num_blocks=4, block_size=4, policy=PriorityWithAging(aging_steps=10**6))
    a, b = make_seq("A", 6, 8, priority=5, arrival=0), make_seq("B", 6, 8, priority=0, arrival=1)
    scheduler.add(a)
    scheduler.add(b)
    batches = [step(scheduler, runner) for _ in range(4)]
    assert batches[3][0] == [("B", 1)] and batches[3][1].preempted == [a]
    assert (a.num_computed_tokens, kv.num_blocks_of(a), kv.num_blocks_of(b)) == (0, 0, 3)


def test_a_sequence_with_no_one_left_to_evict_preempts_itself():
    # 5 blocks: A and B hold 2 each. At step 1 both need a 3rd; A (first) takes the last one, B has no victim.
    scheduler, runner, kv = paged(num_blocks=5, block_size=4)
    a, b = make_seq("A", 8, 4, arrival=0), make_seq("B", 8, 4, arrival=1)
    scheduler.add(a)
    scheduler.add(b)
    step(scheduler, runner)
    plan, batch = step(scheduler, runner)
    assert plan == [("A", 1)] and batch.preempted == [b]
    assert (kv.num_blocks_of(a), kv.num_blocks_of(b), kv.num_free_blocks) == (3, 0, 2)
    assert list(scheduler.waiting) == [b] and scheduler.running == [a]
    run_steps(scheduler, runner, max_steps=50)
    assert b.output_token_ids == expected_output(b.prompt_token_ids, 4)


def test_the_scheduler_reports_computed_tokens_and_only_the_engine_records_them():
    # A prefix hit: B's first block holds A's first 4 tokens, so B's chunk starts at 4 (ScheduledBatch.starts).
    kv = BlockManager(num_blocks=4, block_size=4, enable_prefix_caching=True)
    scheduler = Scheduler(kv, max_num_seqs=4, max_num_batched_tokens=64)
    a = Sequence("A", [1, 2, 3, 4, 5], SamplingParams(max_tokens=4))
    scheduler.add(a)
    batch = scheduler.schedule()
    record_plan(batch)
    record_computed(batch)
    b = Sequence("B", [1, 2, 3, 4, 9, 9], SamplingParams(max_tokens=4))
    scheduler.add(b)
    batch = scheduler.schedule()
    assert (batch.seqs, batch.starts, batch.num_tokens, b.num_computed_tokens) == ([b], [4], [2], 0)
    record_plan(batch)
    assert b.num_computed_tokens == 4
    # A preemption: the victim keeps its count until the engine records the plan.
    scheduler, runner, kv = paged(num_blocks=5, block_size=4)
    c, d = make_seq("C", 8, 4, arrival=0), make_seq("D", 8, 4, arrival=1)
    scheduler.add(c)
    scheduler.add(d)
    step(scheduler, runner)
    batch = scheduler.schedule()
    assert (batch.preempted, d.num_computed_tokens) == ([d], 8)
    record_plan(batch)
    assert d.num_computed_tokens == 0


# -- finish / abort -----------------------------------------------------------------------------------------------
def test_finishing_a_running_sequence_frees_all_its_blocks():
    scheduler, runner, kv = paged(num_blocks=16, block_size=4, budget=8)
    seq = make_seq("A", 20, 4)
    scheduler.add(seq)
    step(scheduler, runner)  # mid-prefill: 8 of 20 tokens computed
    assert (kv.num_blocks_of(seq), kv.num_free_blocks) == (2, 14)
    scheduler.finish(seq, "abort")
    assert (kv.num_blocks_of(seq), kv.num_free_blocks) == (0, 16)
    assert (seq.status, seq.finish_reason, scheduler.running, scheduler.has_unfinished()) == (
        SequenceStatus.FINISHED, "abort", [], False)
    assert step(scheduler, runner)[0] == []


def test_finishing_a_waiting_sequence_removes_it_from_the_queue():
    scheduler, runner, kv = paged(num_blocks=4, block_size=4)
    a, b = make_seq("A", 6, 8, arrival=0), make_seq("B", 6, 8, arrival=1)
    never_admitted = make_seq("N", 20, 1, arrival=2)
    for seq in (a, b, never_admitted):
        scheduler.add(seq)
    for _ in range(4):
        step(scheduler, runner)
    assert b.num_preemptions == 1 and b.status is SequenceStatus.WAITING
    scheduler.finish(b, "abort")
    scheduler.finish(never_admitted, "abort")
    assert list(scheduler.waiting) == [] and scheduler.running == [a]
    assert (kv.num_blocks_of(b), kv.num_free_blocks, b.finish_reason) == (0, 1, "abort")
    scheduler.finish(a, "abort")
    assert kv.num_free_blocks == 4 and not scheduler.has_unfinished()


def test_fake_paged_manager_catches_double_ownership():
    # The property tests rely on the fake's own checks; make sure they bite.
    kv = FakePagedKVManager(num_blocks=4, block_size=2)
    a, b = make_seq("A", 3, 1), make_seq("B", 3, 1)
    kv.allocate(a, 3)
    assert kv.tables[a.seq_id] == [0, 1] and kv.num_free_blocks == 2
    kv.free(a)
    kv.free(a)
    assert kv.num_free_blocks == 4
    kv.allocate(b, 3)
    kv.tables[a.seq_id] = [kv.tables[b.seq_id][0]]  # forge a shared block
    with pytest.raises(AssertionError, match="two sequences"):
        kv.check()


# -- property tests -----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Request:
    prompt_len: int
    max_tokens: int
    arrival_step: int
    priority: int


@dataclass(frozen=True)
class Setup:
    requests: tuple[Request, ...]
    policy: str
    aging_steps: int
    chunked: bool
    budget: int
    max_num_seqs: int
    kv_kind: str  # "paged" or "contiguous"
    block_size: int
    num_blocks: int

    @property
    def max_seq_len(self) -> int:
        """The most tokens one sequence ever holds in the cache (its last sampled token is never computed)."""
        return max(r.prompt_len + r.max_tokens - 1 for r in self.requests)

    @property
    def total_work(self) -> int:
        return sum(r.prompt_len + r.max_tokens for r in self.requests)

    @property
    def step_bound(self) -> int:
        # A hang detector, not a performance claim: every step the most valued running sequence computes >= 1
        # token it keeps; recompute may throw away the others' tokens, once per preemption. Observed worst case
        # is about 1.5 x total_work after the last arrival.
        return max(r.arrival_step for r in self.requests) + 1 + (len(self.requests) + 1) * self.total_work


@st.composite
def setups(draw) -> Setup:
    requests = tuple(sorted(
        draw(st.lists(st.builds(Request, st.integers(1, 24), st.integers(1, 10), st.integers(0, 8),
                                st.integers(0, 3)), min_size=1, max_size=7)),
        key=lambda r: r.arrival_step))
    chunked = draw(st.booleans())
    max_len = max(r.prompt_len + r.max_tokens - 1 for r in requests)
    # Without chunked prefill a recomputed sequence must fit one step whole (the engine config enforces this).
    budget = draw(st.integers(1, 32)) if chunked else draw(st.integers(max_len, max_len + 16))
    kv_kind = draw(st.sampled_from(["paged", "paged", "paged", "contiguous"]))
    block_size = draw(st.sampled_from([1, 2, 4, 8]))
    # Paged: from just one longest sequence's worth of blocks (forces preemption) up to a little more.
    # Contiguous: the row length (max_model_len).
    num_blocks = blocks_for(max_len, block_size) + draw(st.integers(0, 6))
    return Setup(requests, draw(st.sampled_from(["fcfs", "sjf", "priority"])), draw(st.integers(1, 4)), chunked,
                 budget, draw(st.integers(1, 5)), kv_kind, block_size, num_blocks)


def build(setup: Setup) -> tuple[Scheduler, FakeRunner, list[Sequence], dict[int, list[Sequence]]]:
    if setup.kv_kind == "paged":
        kv = FakePagedKVManager(setup.num_blocks, setup.block_size)
    else:
        kv = ContiguousKVManager(setup.max_num_seqs, setup.max_seq_len)  # rows = seats, as the engine builds it
    policy = PriorityWithAging(setup.aging_steps) if setup.policy == "priority" else setup.policy
    scheduler = Scheduler(kv, setup.max_num_seqs, setup.budget, policy, setup.chunked)
    seqs, arrivals = [], {}
    for i, r in enumerate(setup.requests):  # created in arrival order, so seq_ids follow arrival too
        seq = make_seq(f"r{i}", r.prompt_len, r.max_tokens, priority=r.priority, arrival=float(r.arrival_step))
        seqs.append(seq)
        arrivals.setdefault(r.arrival_step, []).append(seq)
    return scheduler, FakeRunner(scheduler), seqs, arrivals


def check_kv_books(scheduler: Scheduler, planned: dict[int, int]) -> None:
    """Memory accounting: paged blocks held == exactly what running tokens need; nothing held by waiting seqs."""
    kv = scheduler.kv
    if isinstance(kv, FakePagedKVManager):
        kv.check()  # free + held == all, no block owned twice, no id free twice
        for seq in scheduler.running:
            need = blocks_for(seq.num_computed_tokens + planned.get(seq.seq_id, 0), kv.block_size)
            held = kv.num_blocks_of(seq)
            assert held == need, f"running seq {seq.seq_id} holds {held} blocks, its tokens need {need}"
        assert kv.num_held_blocks == sum(kv.num_blocks_of(s) for s in scheduler.running)
        assert not any(kv.holds(s) for s in scheduler.waiting), "a waiting sequence holds blocks"
    else:
        assert kv.num_free_blocks == kv.num_blocks - len(scheduler.running)
        assert kv.num_reserved_slots() == len(scheduler.running) * kv.block_size


def check_queues(scheduler: Scheduler, seqs: list[Sequence]) -> None:
    """Every arrived, unfinished sequence is in exactly one queue, with the matching status."""
    arrived = [s for s in seqs if s.arrival_time <= scheduler.step_count - 1]  # arrival_time is the arrival step
    queued = [s.seq_id for s in scheduler.running] + [s.seq_id for s in scheduler.waiting]
    assert sorted(queued) == sorted(s.seq_id for s in arrived if not s.is_finished)
    assert all(s.status is SequenceStatus.RUNNING for s in scheduler.running)
    assert all(s.status is SequenceStatus.WAITING for s in scheduler.waiting)


def make_step_checker(setup: Setup, seqs: list[Sequence]):
    def after_schedule(scheduler: Scheduler, batch: ScheduledBatch) -> None:
        assert batch.total_tokens <= setup.budget
        assert len(scheduler.running) <= setup.max_num_seqs
        ids = [s.seq_id for s in batch.seqs]
        assert len(ids) == len(set(ids)), "a sequence is scheduled twice in one step"
        for seq, num_tokens in zip(batch.seqs, batch.num_tokens):
            assert 1 <= num_tokens <= seq.num_uncomputed_tokens
            assert seq.status is SequenceStatus.RUNNING and seq in scheduler.running
            if not setup.chunked:
                assert num_tokens == seq.num_uncomputed_tokens, "a prompt was split without chunked prefill"
        # Running sequences are served before new admissions (a new one has nothing computed yet); nobody is
        # admitted in a step that preempted; admissions follow policy order and nobody waiting jumps the queue.
        new = [s.num_computed_tokens == 0 for s in batch.seqs]
        assert new == sorted(new), "a new admission was scheduled before a running sequence"
        if batch.preempted:
            assert not any(new), "a sequence was admitted in a step that preempted"
        key = lambda s: scheduler.policy.sort_key(s, scheduler.step_count - 1)  # noqa: E731
        admitted_keys = [key(s) for s, is_new in zip(batch.seqs, new) if is_new]
        assert admitted_keys == sorted(admitted_keys)
        if admitted_keys:
            assert all(key(s) > admitted_keys[-1] for s in scheduler.waiting)
        if batch.preempted:  # victims are taken least valued first, so every survivor is valued more
            assert max(map(key, scheduler.running), default=()) < min(map(key, batch.preempted))
        for seq in batch.preempted:
            assert setup.kv_kind == "paged", "the contiguous manager never preempts"
            assert seq in scheduler.waiting and seq.seq_id not in ids
            assert seq.num_computed_tokens == 0 and seq.status is SequenceStatus.WAITING
        check_queues(scheduler, seqs)
        check_kv_books(scheduler, dict(zip(ids, batch.num_tokens)))

    def after_run(scheduler: Scheduler, batch: ScheduledBatch) -> None:
        check_kv_books(scheduler, {})
        check_queues(scheduler, seqs)
        for seq in seqs:
            if seq.is_finished:
                assert seq not in scheduler.running and seq not in scheduler.waiting
                assert len(seq.output_token_ids) == seq.params.max_tokens

    return after_schedule, after_run


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(setups())
def test_random_workloads_respect_every_invariant_and_lose_no_token(setup):
    scheduler, runner, seqs, arrivals = build(setup)
    after_schedule, after_run = make_step_checker(setup, seqs)
    records = run_steps(scheduler, runner, setup.step_bound + 1, arrivals, after_schedule, after_run)

    assert not scheduler.has_unfinished(), f"not finished within {setup.step_bound} steps"
    for seq in seqs:
        assert seq.finish_reason == "length"
        assert seq.output_token_ids == expected_output(seq.prompt_token_ids, seq.params.max_tokens)
    assert scheduler.kv.num_free_blocks == scheduler.kv.num_blocks

    preemptions = sum(len(r.preempted) for r in records)
    assert preemptions == scheduler.num_preemptions == sum(s.num_preemptions for s in seqs)
    event(f"kv={setup.kv_kind} preempted={'yes' if preemptions else 'no'}")
    target(float(preemptions), label="preemptions")
    last_arrival = max(r.arrival_step for r in setup.requests)
    target((len(records) - last_arrival) / setup.total_work, label="steps after the last arrival per token of work")


def test_random_workloads_preempt_in_a_meaningful_fraction_of_cases():
    # The property test above is only as good as the squeeze it generates: with these sizes a good share of
    # paged workloads must preempt. Examples are drawn deterministically (derandomize) so this cannot flake.
    outcomes: list[bool] = []

    @settings(max_examples=150, deadline=None, derandomize=True, database=None)
    @given(setups())
    def record(setup):
        if setup.kv_kind != "paged" or len(setup.requests) < 2:
            return
        scheduler, runner, _, arrivals = build(setup)
        run_steps(scheduler, runner, setup.step_bound + 1, arrivals)
        outcomes.append(scheduler.num_preemptions > 0)

    record()
    assert len(outcomes) >= 30
    assert sum(outcomes) / len(outcomes) >= 0.2, f"only {sum(outcomes)} of {len(outcomes)} workloads preempted"


PING_PONG = Setup(requests=(Request(12, 16, 0, 1), Request(12, 16, 1, 0)), policy="priority", aging_steps=3,
                  chunked=True, budget=2, max_num_seqs=4, kv_kind="paged", block_size=1, num_blocks=27)


@settings(max_examples=150, deadline=None)
@example(PING_PONG)
@given(setups().filter(lambda setup: setup.policy != "sjf" and setup.kv_kind == "paged"))
def test_with_a_fixed_ranking_two_sequences_never_evict_each_other_in_turn(setup):
    """FCFS and priority-with-aging rank sequences the same way at every step, so if Y was scheduled in a step
    that evicted X (Y ranks above X), X can never be scheduled in a step that evicts Y. SJF is exempt: its
    ranking follows progress (a decode ranks above a prefill), so eviction in turn is by design there.

    KNOWN BUG (fails today for "priority"): see test_priority_aging_keeps_the_ranking_of_two_sequences_fixed.
    In PING_PONG, A and B evict each other 9 times (A 5, B 4) and the run takes 109 steps; with a stable
    ranking B is never evicted, A 4 times, and it takes 48.
    """
    scheduler, runner, seqs, arrivals = build(setup)
    records = run_steps(scheduler, runner, setup.step_bound + 1, arrivals)
    assert not scheduler.has_unfinished()
    name = {seq.seq_id: seq.request_id for seq in seqs}
    evicted_by: dict[int, set[int]] = {}  # victim -> the sequences scheduled in the step that evicted it
    for record in records:
        scheduled = {seq_id for seq_id, _ in record.scheduled}
        for victim in record.preempted:
            turned = [name[e] for e in scheduled if victim in evicted_by.get(e, set())]
            assert not turned, f"step {record.step}: {name[victim]} evicted by {turned}, which it had evicted before"
            evicted_by.setdefault(victim, set()).update(scheduled)


@settings(max_examples=100, deadline=None)
@given(
    low_priority=st.integers(1, 4),
    aging_steps=st.integers(1, 5),
    low=st.tuples(st.integers(1, 20), st.integers(1, 6)),  # (prompt_len, max_tokens)
    urgent=st.lists(st.tuples(st.integers(1, 20), st.integers(1, 3)), min_size=1, max_size=4),
    budget=st.integers(4, 16),
)
def test_priority_aging_never_starves_a_low_priority_request(low_priority, aging_steps, low, urgent, budget):
    """An urgent request (priority 0) arrives every step; the low-priority one arrives first, at step 0.

    The bound. Keys are priority - floor(waited / k). An urgent request arriving at step t >= P*k (P: the low
    one's priority, k: aging_steps) has, at any step s, floor(s / k) >= floor((s - t) / k) + P, so its key is
    >= the low one's and the tie goes to the earlier arrival: it never goes first (the same holds for the
    unrounded key priority * k - waited). Only the P*k urgent requests arriving at steps 0 .. P*k-1 can. With
    max_num_seqs=1 and ample memory each holds the one seat for at most D = max over urgent of
    ceil(prompt / budget) + max_tokens - 1 steps and the seat is never idle, so the low one is admitted by step
    P*k*D and, alone on the seat, finishes D_low - 1 steps later: bound = P*k*D + D_low - 1.
    """
    def steps_alone(prompt_len: int, max_tokens: int) -> int:
        return blocks_for(prompt_len, budget) + max_tokens - 1

    worst_urgent = max(steps_alone(*shape) for shape in urgent)
    bound = low_priority * aging_steps * worst_urgent + steps_alone(*low) - 1

    scheduler, runner, _ = paged(max_num_seqs=1, budget=budget, policy=PriorityWithAging(aging_steps))
    low_seq = make_seq("L", low[0], low[1], priority=low_priority, arrival=0)
    arrivals = {0: [low_seq]}
    for t in range(bound + 2):
        prompt_len, max_tokens = urgent[t % len(urgent)]
        arrivals.setdefault(t, []).append(make_seq(f"H{t}", prompt_len, max_tokens, priority=0, arrival=t))
    records = run_steps(scheduler, runner, max_steps=bound + 1, arrivals=arrivals)

    assert low_seq.is_finished, f"low-priority request not finished within {bound} steps"
    assert step_of(records, low_seq, "finished") <= bound
    assert low_seq.output_token_ids == expected_output(low_seq.prompt_token_ids, low[1])


# -- state machine ------------------------------------------------------------------------------------------------
class SchedulerMachine(RuleBasedStateMachine):
    """Requests arrive, steps run and requests are aborted in any order; the books must balance throughout."""

    MAX_PROMPT, MAX_TOKENS = 12, 6

    @initialize(
        block_size=st.sampled_from([1, 2, 4]),
        extra_blocks=st.integers(0, 4),
        policy=st.sampled_from(["fcfs", "sjf", "priority"]),
        budget=st.integers(1, 16),
        max_num_seqs=st.integers(1, 4),
    )
    def setup(self, block_size, extra_blocks, policy, budget, max_num_seqs):
        num_blocks = blocks_for(self.MAX_PROMPT + self.MAX_TOKENS - 1, block_size) + extra_blocks
        self.kv = FakePagedKVManager(num_blocks, block_size)
        policy = PriorityWithAging(aging_steps=2) if policy == "priority" else policy
        self.scheduler = Scheduler(self.kv, max_num_seqs, budget, policy)
        self.runner = FakeRunner(self.scheduler)
        self.budget, self.max_num_seqs = budget, max_num_seqs
        self.seqs: list[Sequence] = []
        self.aborted: set[int] = set()

    @rule(prompt_len=st.integers(1, MAX_PROMPT), max_tokens=st.integers(1, MAX_TOKENS), priority=st.integers(0, 2))
    def add_request(self, prompt_len, max_tokens, priority):
        seq = make_seq(f"m{len(self.seqs)}", prompt_len, max_tokens, priority=priority,
                       arrival=float(self.scheduler.step_count))
        self.seqs.append(seq)
        self.scheduler.add(seq)

    @rule()
    def step(self):
        batch = schedule(self.scheduler)
        assert batch.total_tokens <= self.budget
        assert len({s.seq_id for s in batch.seqs}) == len(batch.seqs)
        check_kv_books(self.scheduler, {s.seq_id: n for s, n in zip(batch.seqs, batch.num_tokens)})
        self.runner.step(batch)

    @rule(data=st.data())
    def abort_random(self, data):
        unfinished = [s for s in self.seqs if not s.is_finished]
        if not unfinished:
            return
        seq = data.draw(st.sampled_from(unfinished))
        self.scheduler.finish(seq, "abort")
        self.aborted.add(seq.seq_id)
        assert self.kv.num_blocks_of(seq) == 0
        assert seq not in self.scheduler.running and seq not in self.scheduler.waiting

    @invariant()
    def books_balance(self):
        check_kv_books(self.scheduler, {})
        assert len(self.scheduler.running) <= self.max_num_seqs
        unfinished = {s.seq_id for s in self.seqs if not s.is_finished}
        queued = [s.seq_id for s in self.scheduler.running] + [s.seq_id for s in self.scheduler.waiting]
        assert sorted(queued) == sorted(unfinished)

    @invariant()
    def tokens_so_far_are_right(self):
        for seq in self.seqs:
            want = expected_output(seq.prompt_token_ids, seq.params.max_tokens)
            assert seq.output_token_ids == want[: len(seq.output_token_ids)]

    def teardown(self):
        if not hasattr(self, "scheduler"):
            return
        work = sum(s.num_tokens + s.params.max_tokens for s in self.seqs)
        run_steps(self.scheduler, self.runner, max_steps=(len(self.seqs) + 1) * work + 1)
        assert not self.scheduler.has_unfinished()
        assert self.kv.num_free_blocks == self.kv.num_blocks
        for seq in self.seqs:
            if seq.seq_id not in self.aborted:
                assert seq.output_token_ids == expected_output(seq.prompt_token_ids, seq.params.max_tokens)


SchedulerMachine.TestCase.settings = settings(max_examples=100, stateful_step_count=40, deadline=None)
test_scheduler_state_machine = SchedulerMachine.TestCase
