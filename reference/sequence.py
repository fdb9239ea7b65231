"""Sequence: one output stream being generated, and the state the scheduler and KV manager keep about it.

A request with SamplingParams.n = k becomes k sequences that share a prompt. A sequence's tokens are its
prompt followed by its output so far; `num_computed_tokens` of them have their K/V in the cache. Each step
the scheduler gives a sequence a number of its uncomputed tokens to run: a prefill chunk, or the single newest
token when decoding. After preemption by recompute the cache is dropped, num_computed_tokens goes back to 0,
and prompt + output so far are prefilled again.

The engine owns this state and is the only writer of num_computed_tokens: the scheduler and the KV managers
report what they decided (ScheduledBatch: each chunk's start, who was preempted; Scheduler.fork: the tokens a
child shares), the engine records it (engine.record_plan, record_computed), runners only read it. With
async scheduling (fast_runner.py) a sampled token is appended the moment its step is launched, as a placeholder
(PENDING_TOKEN) whose value is still on the device: the scheduler can plan the next step around it while the GPU
works, and the fast runner reads its value from the device.
`num_pending_tokens` counts the placeholders at the end (always 0 with the plain runner).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from enum import Enum

from .sampling import SamplingParams

_seq_ids = itertools.count()
PENDING_TOKEN = -1  # a sampled token whose value has not reached the host yet


class SequenceStatus(Enum):
    WAITING = "waiting"  # queued (new or preempted); holds no KV memory
    RUNNING = "running"  # admitted; holds KV memory
    FINISHED = "finished"


@dataclass
class Sequence:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    sample_index: int = 0  # which of the request's n samples this is
    priority: int = 0  # smaller runs first under the "priority" policy
    arrival_time: float = 0.0
    seq_id: int = field(default_factory=lambda: next(_seq_ids))
    token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    num_pending_tokens: int = 0  # trailing placeholders in token_ids: sampled, value not on the host yet
    status: SequenceStatus = SequenceStatus.WAITING
    finish_reason: str | None = None  # "stop", "length" or "abort"
    num_preemptions: int = 0
    num_unborn_siblings: int = 0  # sample 0 of an n > 1 request: samples still to be forked from it
    waiting_since_step: int = 0  # for aging in the priority policy
    # Filled in by the engine as the sequence progresses (time.monotonic() seconds).
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    finish_time: float | None = None

    def __post_init__(self) -> None:
        if not self.token_ids:
            self.token_ids = list(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        """The output tokens whose values are known (a copy): placeholders still in flight are left out."""
        return self.token_ids[self.num_prompt_tokens : self.num_tokens - self.num_pending_tokens]

    @property
    def num_output_tokens(self) -> int:
        """Output tokens sampled so far, those still in flight included (what max_tokens counts)."""
        return self.num_tokens - self.num_prompt_tokens

    @property
    def num_uncomputed_tokens(self) -> int:
        """Tokens not yet in the KV cache: the rest of the prompt while prefilling, 1 while decoding."""
        return self.num_tokens - self.num_computed_tokens

    @property
    def is_decoding(self) -> bool:
        """Its only uncomputed token is its newest output token (else it is (re)computing its prompt)."""
        return self.num_uncomputed_tokens == 1 and self.num_tokens > self.num_prompt_tokens

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED
