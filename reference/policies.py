"""Scheduling policies: in which order waiting sequences are admitted and running ones are kept.

A policy is one function, `sort_key(seq, step)`: sequences with SMALLER keys go first. The scheduler admits
waiting sequences in increasing key order, serves running ones in that order, and when memory runs out it
preempts the running sequence with the LARGEST key. Ties fall back to arrival order (the key ends with it).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # for the type hints only: the CLI's flags import this module and must not load torch
    from .sequence import Sequence


class SchedulingPolicy:
    name = "base"

    def sort_key(self, seq: Sequence, step: int) -> tuple:
        raise NotImplementedError


class FCFS(SchedulingPolicy):
    """First come, first served: arrival order. Never starves anyone; a long prompt delays those behind it."""

    name = "fcfs"

    def sort_key(self, seq: Sequence, step: int) -> tuple:
        return (seq.arrival_time, seq.seq_id)


class ShortestJobFirst(SchedulingPolicy):
    """Fewest prompt tokens left to prefill first: lowers mean time-to-first-token; long prompts may wait."""

    name = "sjf"

    def sort_key(self, seq: Sequence, step: int) -> tuple:
        return (seq.num_uncomputed_tokens, seq.arrival_time, seq.seq_id)


class PriorityWithAging(SchedulingPolicy):
    """Smaller `priority` first; a waiting sequence gains one level per `aging_steps` steps it has waited.

    Without aging a steady stream of urgent requests starves everyone else forever; with it, any request's
    effective priority eventually beats every newcomer's.
    """

    name = "priority"

    def __init__(self, aging_steps: int = 32) -> None:
        if aging_steps < 1:
            raise ValueError(f"aging_steps must be >= 1, got {aging_steps}")
        self.aging_steps = aging_steps

    def sort_key(self, seq: Sequence, step: int) -> tuple:
        # priority - waited / aging_steps, scaled by aging_steps to stay an integer. Not rounded down: rounding
        # would make two sequences that age at the same rate swap places every few steps (and evict each other).
        waited = max(0, step - seq.waiting_since_step)
        return (seq.priority * self.aging_steps - waited, seq.arrival_time, seq.seq_id)


POLICIES = {"fcfs": FCFS, "sjf": ShortestJobFirst, "priority": PriorityWithAging}


def make_policy(policy: str | SchedulingPolicy) -> SchedulingPolicy:
    if isinstance(policy, SchedulingPolicy):
        return policy
    if policy not in POLICIES:
        raise ValueError(f"scheduling_policy={policy!r} is unknown; choose one of: {', '.join(POLICIES)}")
    return POLICIES[policy]()


def sequence_fields(seq: Sequence) -> dict:
    """What a policy may look at, as plain data (the argument of a KeyFunctionPolicy's function)."""
    return {"seq_id": seq.seq_id, "arrival_time": seq.arrival_time, "priority": seq.priority,
            "num_uncomputed": seq.num_uncomputed_tokens, "waiting_since_step": seq.waiting_since_step}


class KeyFunctionPolicy(SchedulingPolicy):
    """A policy given as a function of plain data: key_fn(sequence_fields(seq), step) -> tuple (smaller first).

    The hook lab 0.2 uses to run a learner's policy in the engine: LLM(..., scheduling_policy=KeyFunctionPolicy(fn)).
    """

    def __init__(self, key_fn, name: str = "key function") -> None:
        self.key_fn = key_fn
        self.name = name

    def sort_key(self, seq: Sequence, step: int) -> tuple:
        return tuple(self.key_fn(sequence_fields(seq), step))
