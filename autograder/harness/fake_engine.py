"""The one fake engine: the engine's real Scheduler and step contract, with a hash of the tokens for a model.

Lab 0.2's drivers run learner code against it (a serving loop, a plan function replayed step by step) and the
project's scheduler tests drive it too (tests/fakes.py), so the grader and the tests agree on what an engine does:

- schedule(scheduler) is the engine's first half of a step: the scheduler plans, the engine records the plan in
  the sequences (reference.engine.record_plan);
- FakeRunner is the model runner: it writes each scheduled token into a fake cache at the slots the block tables
  name, the engine's record_computed counts them, and a sequence with nothing left to compute "samples"
  next_token(the tokens it reads back from that cache). A token lost, duplicated or read from a slot another
  sequence overwrote changes every later token, so a request's output must be expected_output(prompt, max_tokens);
- FakeEngine is LLMEngine's add_request / step / has_unfinished_requests over those two.

No model, no tensors: only the scheduler's and KV manager's interfaces.
"""

from __future__ import annotations

import zlib
from array import array
from dataclasses import dataclass, field

from reference.engine import record_computed, record_plan
from reference.outputs import CompletionOutput, RequestMetrics, RequestOutput
from reference.sampling import SamplingParams
from reference.scheduler import ScheduledBatch, Scheduler
from reference.sequence import Sequence

FAKE_VOCAB_SIZE = 50_000


def next_token(token_ids: list[int]) -> int:
    """The fake model: the next token is a hash of every token before it (so history errors propagate)."""
    return zlib.crc32(array("q", token_ids).tobytes()) % FAKE_VOCAB_SIZE


def expected_output(prompt_token_ids: list[int], max_tokens: int) -> list[int]:
    """The output an exact engine must produce for this prompt with the fake model (no stop tokens)."""
    tokens = list(prompt_token_ids)
    for _ in range(max_tokens):
        tokens.append(next_token(tokens))
    return tokens[len(prompt_token_ids):]


def schedule(scheduler: Scheduler) -> ScheduledBatch:
    """The engine's first half of a step (LLMEngine.step): the scheduler plans, the engine records the plan."""
    batch = scheduler.schedule()
    record_plan(batch)
    return batch


@dataclass
class FakeRunner:
    """The model runner's side of the engine contract, with a fake cache instead of tensors.

    For each scheduled (seq, n), the plan already recorded by `schedule`: the n tokens at positions
    [num_computed_tokens, num_computed_tokens + n) are written into the slots block_table(seq) names; then the
    engine's record_computed counts them. When num_computed_tokens reaches seq.num_tokens, the runner reads the
    whole sequence back from the cache (asserting every slot still holds this sequence's token) and appends
    next_token(what it read). A sequence whose output reaches params.max_tokens is finished with
    scheduler.finish(seq, "length").
    """

    scheduler: Scheduler
    cache: dict[int, tuple[int, int]] = field(default_factory=dict)  # slot -> (seq_id, token)

    def _slot(self, seq: Sequence, position: int) -> int:
        block_size = self.scheduler.kv.block_size
        table = self.scheduler.kv.block_table(seq)
        assert position // block_size < len(table), (
            f"seq {seq.seq_id} position {position} is beyond its {len(table)} blocks of {block_size}")
        return table[position // block_size] * block_size + position % block_size

    def step(self, batch: ScheduledBatch) -> tuple[list[Sequence], list[Sequence]]:
        """Run one batch. Returns (sequences that got a token, sequences finished), in batch order."""
        sampled, finished = [], []
        for seq, start, num_tokens in zip(batch.seqs, batch.starts, batch.num_tokens):
            assert start == seq.num_computed_tokens, f"seq {seq.seq_id}: the plan was not recorded (schedule)"
            assert 1 <= num_tokens <= seq.num_uncomputed_tokens, (
                f"seq {seq.seq_id} scheduled {num_tokens} tokens with {seq.num_uncomputed_tokens} uncomputed")
            for position in range(start, start + num_tokens):
                self.cache[self._slot(seq, position)] = (seq.seq_id, seq.token_ids[position])
        record_computed(batch)
        for seq in batch.seqs:
            if seq.num_computed_tokens < seq.num_tokens:
                continue  # a prefill chunk that does not reach the end samples nothing
            read = []
            for position in range(seq.num_tokens):
                owner, token = self.cache.get(self._slot(seq, position), (None, None))
                assert owner == seq.seq_id and token == seq.token_ids[position], (
                    f"seq {seq.seq_id} position {position}: cache holds {token} of seq {owner}, "
                    f"expected {seq.token_ids[position]}")
                read.append(token)
            seq.token_ids.append(next_token(read))
            sampled.append(seq)
            if len(seq.output_token_ids) >= seq.params.max_tokens:
                self.scheduler.finish(seq, "length")
                finished.append(seq)
        return sampled, finished


class FakeEngine:
    """LLMEngine's contract for add_request / step / has_unfinished_requests: step() returns a cumulative
    RequestOutput for each request that got a token (in batch order), finished=True on the step that ends it.
    Requests end at max_tokens only (the fake model has no EOS)."""

    def __init__(self, scheduler: Scheduler) -> None:
        self.scheduler = scheduler
        self.runner = FakeRunner(scheduler)
        self.live: dict[str, Sequence] = {}
        self.num_steps = 0
        self.idle_steps = 0  # step() calls with nothing to run: a serving loop should not make them

    def add_request(self, request_id: str, prompt: list[int], params: SamplingParams | None = None,
                    priority: int = 0) -> None:
        if not isinstance(params, SamplingParams) or request_id in self.live or not prompt:
            raise ValueError("add_request(request_id, prompt token ids, SamplingParams): bad or duplicate request")
        self.add_sequence(Sequence(request_id, [int(t) for t in prompt], params, priority=priority,
                                   arrival_time=float(self.num_steps)))

    def add_sequence(self, seq: Sequence) -> None:
        """Queue a sequence built by the caller (who then chooses its seq_id)."""
        self.live[seq.request_id] = seq
        self.scheduler.add(seq)

    def has_unfinished_requests(self) -> bool:
        return bool(self.live)

    def step(self) -> list[RequestOutput]:
        self.idle_steps += not self.live
        batch = schedule(self.scheduler)
        self.num_steps += 1
        sampled, finished = self.runner.step(batch)
        for seq in finished:
            del self.live[seq.request_id]
        return [self._output(seq) for seq in sampled]

    @staticmethod
    def _output(seq: Sequence) -> RequestOutput:
        completion = CompletionOutput(0, "", seq.output_token_ids, seq.finish_reason)
        return RequestOutput(seq.request_id, None, seq.prompt_token_ids, [completion], seq.is_finished,
                             RequestMetrics(arrival_time=0.0))  # steps, not times, are what a fake engine tells
