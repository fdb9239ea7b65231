"""The scheduler: each step, which sequences run and how many of their tokens (continuous batching).

Every step has a token budget (max_num_batched_tokens) and a cap on running sequences (max_num_seqs):

1. Running sequences go first, in policy order. A decoding sequence needs 1 token; one still prefilling gets
   the next chunk of its prompt that fits the budget. If the KV manager cannot grow a sequence, the scheduler
   preempts the running sequence the policy values least (recompute: its cache is freed and it goes back to
   the front of the queue to be prefilled again later), until the sequence fits or is itself the victim.
2. The budget left over admits waiting sequences, in policy order, while the KV manager can hold them (a
   prefix it already caches is not recomputed). With
   chunked prefill a long prompt takes several steps, possibly beside chunks of other prompts; without it a
   prompt is admitted only when it fits the budget whole.

Finished sequences leave and waiting ones join at every step. The scheduler never runs the model, and never
writes a sequence's num_computed_tokens: it returns a plan (which sequences, from which position, how many tokens
each, and whom it preempted) that the engine records in the sequences and the model runner executes.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from .kv import KVCacheManager
from .policies import SchedulingPolicy, make_policy
from .sequence import Sequence, SequenceStatus


@dataclass
class ScheduledBatch:
    """One step's plan: seqs[i] runs num_tokens[i] tokens from position starts[i] on.

    starts[i] is seqs[i].num_computed_tokens, except for a sequence admitted this step whose prompt begins with a
    prefix its KV manager already caches: it starts after that prefix. Preempted sequences lost their cache. The
    engine writes both into the sequences (engine.record_plan) before the runner reads them.
    """

    seqs: list[Sequence] = field(default_factory=list)
    num_tokens: list[int] = field(default_factory=list)
    starts: list[int] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)

    @property
    def total_tokens(self) -> int:
        return sum(self.num_tokens)

    @property
    def num_decode_tokens(self) -> int:
        """Read after the engine recorded the plan and before it records the step as computed."""
        return sum(1 for s in self.seqs if s.is_decoding)

    @property
    def num_prefill_tokens(self) -> int:
        return self.total_tokens - self.num_decode_tokens

    def add(self, seq: Sequence, num_tokens: int, start: int) -> None:
        """Plan num_tokens of seq's tokens from position `start` on."""
        self.seqs.append(seq)
        self.num_tokens.append(num_tokens)
        self.starts.append(start)


class Scheduler:
    def __init__(
        self,
        kv_manager: KVCacheManager,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        policy: str | SchedulingPolicy = "fcfs",
        enable_chunked_prefill: bool = True,
    ) -> None:
        self.kv = kv_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.policy = make_policy(policy)
        self.enable_chunked_prefill = enable_chunked_prefill
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.step_count = 0
        self.num_preemptions = 0

    # -- queue management -------------------------------------------------------------------------------------
    def add(self, seq: Sequence) -> None:
        seq.status = SequenceStatus.WAITING
        seq.waiting_since_step = self.step_count
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def finish(self, seq: Sequence, reason: str) -> None:
        """Take seq out of the queues for good and return its KV memory."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.kv.free(seq)
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason

    def _preempt(self, seq: Sequence, batch: ScheduledBatch) -> None:
        """Recompute preemption: drop seq's cache and queue it at the front; its tokens so far are kept (the
        engine records that none of them is computed any more: batch.preempted)."""
        self.running.remove(seq)
        self.kv.free(seq)
        seq.num_preemptions += 1
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions += 1
        batch.preempted.append(seq)

    def _admit(self, seq: Sequence, num_tokens: int, start: int, batch: ScheduledBatch) -> None:
        """Move a waiting seq into the running set with its first num_tokens tokens from `start` (its cached prefix)."""
        self.waiting.remove(seq)
        self.kv.allocate(seq, num_tokens)
        seq.status = SequenceStatus.RUNNING
        self.running.append(seq)
        batch.add(seq, num_tokens, start)

    # -- the step -------------------------------------------------------------------------------------------------
    def fork(self, parent: Sequence, child: Sequence) -> int:
        """Start `child` (another sample of parent's request) from the parent's computed prompt. Returns how many
        of its tokens it shares, already computed (the engine records them in the child).

        The child shares the KV of all prompt tokens but the last, and recomputes that one to get logits of
        its own; with the paged manager that first write lands in a shared block and triggers copy-on-write.
        Its seat in the running set was reserved when the parent was admitted.
        """
        shared = parent.num_prompt_tokens - 1
        self.kv.fork(parent, child, shared)
        child.status = SequenceStatus.RUNNING
        child.waiting_since_step = parent.waiting_since_step
        parent.num_unborn_siblings -= 1
        self.running.append(child)
        return shared

    def _seats(self, seq: Sequence) -> int:
        """Running-set seats a sequence needs: its own plus one per sibling still to be forked from it."""
        return 1 + seq.num_unborn_siblings

    def _chunk(self, seq: Sequence, budget: int, already_cached: int = 0) -> int:
        """How many of seq's uncomputed tokens to run now (0 = none fit)."""
        want = seq.num_uncomputed_tokens - already_cached
        if want <= budget:
            return want
        return budget if self.enable_chunked_prefill else 0

    def schedule(self) -> ScheduledBatch:
        batch = ScheduledBatch()
        budget = self.max_num_batched_tokens
        key = lambda s: self.policy.sort_key(s, self.step_count)  # noqa: E731

        # 1. Running sequences, most valued first; the least valued ones are the preemption victims.
        self.running.sort(key=key)
        queue = deque(self.running)
        while queue and budget > 0:
            seq = queue.popleft()
            num_tokens = self._chunk(seq, budget)
            if num_tokens == 0:
                continue
            while not self.kv.can_allocate(seq, num_tokens):
                victim = queue.pop() if queue else seq  # the least valued not yet scheduled, else seq itself
                self._preempt(victim, batch)
                if victim is seq:
                    break
            else:
                self.kv.allocate(seq, num_tokens)
                batch.add(seq, num_tokens, seq.num_computed_tokens)
                budget -= num_tokens

        # 2. Admit waiting sequences with what is left (none while anything was preempted this step: memory is
        #    short, and a preempted sequence must not be readmitted in the same step it was evicted).
        if not batch.preempted:
            self.waiting = deque(sorted(self.waiting, key=key))
            seats_taken = sum(self._seats(s) for s in self.running)
            while self.waiting and budget > 0:
                seq = self.waiting[0]
                if seats_taken + self._seats(seq) > self.max_num_seqs:
                    break
                cached = self.kv.cached_prefix_len(seq)
                num_tokens = self._chunk(seq, budget, cached)
                if num_tokens == 0 or not self.kv.can_allocate(seq, num_tokens):
                    break  # keep policy order: do not let later arrivals overtake the head of the queue
                self._admit(seq, num_tokens, cached, batch)
                budget -= num_tokens
                seats_taken += self._seats(seq)

        self.step_count += 1
        return batch
