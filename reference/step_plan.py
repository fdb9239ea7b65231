"""The scheduler's step as a function of plain data, and a hook that lets such a function drive the engine (lab 0.2).

The Scheduler (scheduler.py) decides each step over Sequence objects and a KV manager. Lab 0.2 asks for the
same decision over plain dicts, so that it can be written, tested and compared step by step:

    plan = plan_fn(running, waiting, num_free_blocks, block_size, max_num_seqs, token_budget, chunked_prefill)
    running, waiting: [{"seq_id": int, "num_tokens": int, "num_computed": int}, ...], each in policy order
        (most valued first); a running sequence holds ceil(num_computed / block_size) KV blocks, a waiting one none.
    plan: {"scheduled": [[seq_id, num_tokens], ...], "preempted": [seq_id, ...]}

- plan_step is the engine's own answer: it rebuilds that state around the real Scheduler (with a KV manager that
  keeps exactly the block counts above) and runs one schedule().
- scheduler_state(scheduler) reads a live scheduler's state in that form.
- PlanScheduler is a Scheduler whose schedule() asks any plan function for the plan and carries it out on the
  real sequences and KV manager; install_scheduler(engine, scheduler) puts it (or any fresh Scheduler, e.g. with
  another token budget or policy) into an idle LLMEngine. That is how a learner's schedule_step runs SmolLM2.

The block-count model holds for the contiguous manager (one max_model_len "block" per sequence) and for the paged
manager without prefix caching; with prefix caching, or with n > 1 samples (forks share blocks), it does not,
and scheduler_state says so. This module changes nothing in the Scheduler itself.
"""

from __future__ import annotations

from typing import Any, Callable

from .kv import KVCacheManager, blocks_for_tokens
from .policies import SchedulingPolicy
from .sampling import SamplingParams
from .scheduler import ScheduledBatch, Scheduler
from .sequence import Sequence, SequenceStatus

PlanFunction = Callable[..., dict[str, Any]]


class _CountingKV(KVCacheManager):
    """Block counts only: a sequence holding T computed tokens owns ceil(T / block_size) blocks."""

    def __init__(self, num_free_blocks: int, block_size: int, held: dict[int, int]) -> None:
        self.block_size = block_size
        self.held = dict(held)
        self.num_blocks = num_free_blocks + sum(held.values())
        self._free = num_free_blocks

    def _needed(self, seq: Sequence, num_new_tokens: int) -> int:
        held = self.held.get(seq.seq_id, 0)
        return blocks_for_tokens(seq.num_computed_tokens + num_new_tokens, self.block_size) - held

    def can_allocate(self, seq: Sequence, num_new_tokens: int) -> bool:
        return self._needed(seq, num_new_tokens) <= self._free

    def allocate(self, seq: Sequence, num_new_tokens: int) -> None:
        needed = self._needed(seq, num_new_tokens)
        assert needed <= self._free, "allocate() without can_allocate()"
        self._free -= needed
        self.held[seq.seq_id] = self.held.get(seq.seq_id, 0) + needed

    def free(self, seq: Sequence) -> None:
        self._free += self.held.pop(seq.seq_id, 0)

    def block_table(self, seq: Sequence) -> list[int]:
        return list(range(self.held.get(seq.seq_id, 0)))  # ids are not part of the plain model

    @property
    def num_free_blocks(self) -> int:
        return self._free

    def num_reserved_slots(self) -> int:
        return sum(self.held.values()) * self.block_size


class _GivenOrder(SchedulingPolicy):
    """The order the plain state lists sequences in (running first, then waiting)."""

    name = "given"

    def __init__(self, rank: dict[int, int]) -> None:
        self.rank = rank

    def sort_key(self, seq: Sequence, step: int) -> tuple:
        return (self.rank[seq.seq_id],)


def _check_entries(entries: list[dict[str, Any]], where: str, running: bool) -> None:
    for entry in entries:
        if not 0 <= entry["num_computed"] < entry["num_tokens"]:
            raise ValueError(f"{where}: need 0 <= num_computed < num_tokens, got {entry}")
        if not running and entry["num_computed"]:
            raise ValueError(f"{where}: a waiting sequence holds no cache, so num_computed must be 0, got {entry}")


def plan_step(running: list[dict[str, Any]], waiting: list[dict[str, Any]], num_free_blocks: int, block_size: int,
              max_num_seqs: int, token_budget: int, chunked_prefill: bool = True) -> dict[str, Any]:
    """The engine Scheduler's plan for one step of the plain state described in the module docstring."""
    _check_entries(running, "running", True)
    _check_entries(waiting, "waiting", False)
    ids = [entry["seq_id"] for entry in running + waiting]
    if len(set(ids)) != len(ids):
        raise ValueError(f"seq_ids must be unique, got {ids}")
    held = {e["seq_id"]: blocks_for_tokens(e["num_computed"], block_size) for e in running}
    kv = _CountingKV(num_free_blocks, block_size, held)
    scheduler = Scheduler(kv, max_num_seqs, token_budget, _GivenOrder({i: r for r, i in enumerate(ids)}),
                          chunked_prefill)
    params = SamplingParams(max_tokens=1, ignore_eos=True)
    for entry, is_running in [(e, True) for e in running] + [(e, False) for e in waiting]:
        seq = Sequence(str(entry["seq_id"]), [0] * entry["num_tokens"], params, seq_id=entry["seq_id"],
                       num_computed_tokens=entry["num_computed"])
        if is_running:
            seq.status = SequenceStatus.RUNNING
            scheduler.running.append(seq)
        else:
            scheduler.add(seq)
    batch = scheduler.schedule()
    return {"scheduled": [[s.seq_id, n] for s, n in zip(batch.seqs, batch.num_tokens)],
            "preempted": [s.seq_id for s in batch.preempted]}


def _plain(seq: Sequence) -> dict[str, int]:
    return {"seq_id": seq.seq_id, "num_tokens": seq.num_tokens, "num_computed": seq.num_computed_tokens}


def scheduler_state(scheduler: Scheduler) -> dict[str, Any]:
    """The keyword arguments of a plan function for this scheduler's next step (queues in policy order)."""
    kv = scheduler.kv
    if getattr(kv, "enable_prefix_caching", False):
        raise ValueError("the plain scheduler state needs a KV manager without prefix caching "
                         "(cached prefixes share blocks); build the engine with enable_prefix_caching=False")
    if any(s.num_unborn_siblings for s in scheduler.waiting) or any(s.num_unborn_siblings for s in scheduler.running):
        raise ValueError("the plain scheduler state covers n=1 requests only (forked samples share blocks)")
    key = lambda s: scheduler.policy.sort_key(s, scheduler.step_count)  # noqa: E731
    return {
        "running": [_plain(s) for s in sorted(scheduler.running, key=key)],
        "waiting": [_plain(s) for s in sorted(scheduler.waiting, key=key)],
        "num_free_blocks": kv.num_free_blocks, "block_size": kv.block_size,
        "max_num_seqs": scheduler.max_num_seqs, "token_budget": scheduler.max_num_batched_tokens,
        "chunked_prefill": scheduler.enable_chunked_prefill,
    }


class PlanScheduler(Scheduler):
    """A Scheduler whose every step is planned by `plan_fn` (same arguments and result as plan_step).

    The plan is checked before anything changes (known ids, a preempted sequence is running and not also
    scheduled, 1 <= tokens <= uncomputed, the token budget, the seat limit, and the KV blocks it needs), then
    carried out: preemptions first (recompute: the cache is dropped, the sequence rejoins the queue), then the
    scheduled sequences in plan order, waiting ones being admitted. An invalid plan raises ValueError.
    """

    def __init__(self, plan_fn: PlanFunction, kv_manager: KVCacheManager, max_num_seqs: int,
                 max_num_batched_tokens: int, policy: str | SchedulingPolicy = "fcfs",
                 enable_chunked_prefill: bool = True) -> None:
        super().__init__(kv_manager, max_num_seqs, max_num_batched_tokens, policy, enable_chunked_prefill)
        self.plan_fn = plan_fn

    def schedule(self) -> ScheduledBatch:
        state = scheduler_state(self)
        plan = self.plan_fn(**state)
        scheduled, preempted = self._validated(plan, state)
        batch = ScheduledBatch()
        for seq in preempted:
            self._preempt(seq, batch)
        for seq, num_tokens in scheduled:
            if seq.status is SequenceStatus.WAITING:
                self._admit(seq, num_tokens, self.kv.cached_prefix_len(seq), batch)
            else:
                self.kv.allocate(seq, num_tokens)
                batch.add(seq, num_tokens, seq.num_computed_tokens)
        self.step_count += 1
        return batch

    def _validated(self, plan: Any, state: dict[str, Any]) -> tuple[list[tuple[Sequence, int]], list[Sequence]]:
        if not isinstance(plan, dict) or set(plan) != {"scheduled", "preempted"}:
            raise ValueError(f"a plan is a dict with keys 'scheduled' and 'preempted', got {plan!r}")
        by_id = {s.seq_id: s for s in list(self.running) + list(self.waiting)}
        preempted = []
        for seq_id in plan["preempted"]:
            seq = by_id.get(seq_id)
            if seq is None or seq.status is not SequenceStatus.RUNNING or seq in preempted:
                raise ValueError(f"plan preempts {seq_id!r}, which is not a running sequence (or is listed twice)")
            preempted.append(seq)
        scheduled, seen = [], set(s.seq_id for s in preempted)
        free, seats = state["num_free_blocks"], len(self.running) - len(preempted)
        free += sum(blocks_for_tokens(s.num_computed_tokens, state["block_size"]) for s in preempted)
        for entry in plan["scheduled"]:
            seq_id, num_tokens = entry
            seq = by_id.get(seq_id)
            if seq is None or seq_id in seen:
                raise ValueError(f"plan schedules {seq_id!r}: unknown, preempted, or listed twice")
            seen.add(seq_id)
            if not 1 <= num_tokens <= seq.num_uncomputed_tokens:
                raise ValueError(f"plan runs {num_tokens} tokens of {seq_id}, which has {seq.num_uncomputed_tokens} "
                                 f"uncomputed")
            held = blocks_for_tokens(seq.num_computed_tokens, state["block_size"])
            free -= blocks_for_tokens(seq.num_computed_tokens + num_tokens, state["block_size"]) - held
            seats += seq.status is SequenceStatus.WAITING
            scheduled.append((seq, num_tokens))
        if sum(n for _, n in scheduled) > state["token_budget"]:
            raise ValueError(f"plan runs {sum(n for _, n in scheduled)} tokens, over the budget "
                             f"{state['token_budget']}")
        if free < 0:
            raise ValueError(f"plan needs {-free} more KV blocks than are free")
        if seats > state["max_num_seqs"]:
            raise ValueError(f"plan leaves {seats} sequences running, over max_num_seqs {state['max_num_seqs']}")
        return scheduled, preempted


def install_scheduler(engine, scheduler: Scheduler) -> None:
    """Give an idle LLMEngine another scheduler over the engine's own KV manager (new budget, policy, plan function).

    Raises ValueError while requests are unfinished (their sequences live in the old scheduler's queues) or when
    the scheduler manages another KV manager (the model runner reads block tables from the engine's).
    """
    if engine.has_unfinished_requests():
        raise ValueError("install a scheduler only between workloads: this engine has unfinished requests")
    if scheduler.kv is not engine.kv_manager:
        raise ValueError("the scheduler must use the engine's KV manager (engine.kv_manager)")
    if scheduler.max_num_seqs > engine.config.max_num_seqs:
        raise ValueError(f"max_num_seqs={scheduler.max_num_seqs} exceeds the engine's ({engine.config.max_num_seqs}), "
                         f"which sized its buffers")
    engine.scheduler = scheduler
