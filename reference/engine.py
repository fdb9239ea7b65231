"""LLMEngine: the step loop. Requests in, one scheduled forward pass per step, outputs streamed back.

    add_request -> Sequence(s) queued -> step(): scheduler plans -> model runner runs + samples
                -> tokens appended, detokenized, stop conditions checked -> RequestOutputs of what progressed

The engine owns requests and their sequences' state (prompt, params, tokens, per-sample text and logprobs,
metrics) and the step loop. It does not know how attention or memory work: the KV manager is sized and built by
kv/sizing.py (the engine only says how much memory is free), and the forward pass is the model runner's:
model_runner.py (eager, synchronous: the one to read) or fast_runner.py (async scheduling, CUDA graphs).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from functools import partial

import torch

from .engine_config import EngineConfig
from .metrics import StepRecord
from .fast_runner import FastModelRunner
from .kv.gpu_sizing import fill_gpu_sizes
from .kv.sizing import gpu_memory_for_kv, make_kv_manager
from .model_runner import ModelRunner
from .models import load_model
from .outputs import CompletionOutput, RequestMetrics, RequestOutput
from .parallel.ranks import EngineRanks
from .runtime import CpuThreads, resolve_device, resolve_dtype
from .sampled_tokens import SampledToken
from .sampling import SamplingParams
from .scheduler import ScheduledBatch, Scheduler
from .sequence import PENDING_TOKEN, Sequence
from .tokenizer import IncrementalDetokenizer, Tokenizer
from .warmup import warm_up

logger = logging.getLogger(__name__)


def record_plan(batch: ScheduledBatch) -> None:
    """The engine owns sequence state: it writes in what the scheduler decided, before the runner reads it. A
    preempted sequence has nothing in the cache any more; a scheduled one starts where the plan says (a newly
    admitted one after the prefix its KV manager found cached). Test doubles of the engine call it too."""
    for seq in batch.preempted:
        seq.num_computed_tokens = 0
    for seq, start in zip(batch.seqs, batch.starts):
        seq.num_computed_tokens = start


def record_computed(batch: ScheduledBatch) -> None:
    """The batch has run (or is queued on the device, in order): its tokens' K/V count as computed."""
    for seq, start, num_tokens in zip(batch.seqs, batch.starts, batch.num_tokens):
        seq.num_computed_tokens = start + num_tokens


def best_completions(completions: list[CompletionOutput], n: int) -> list[CompletionOutput]:
    """best_of's answer: the n completions with the highest cumulative_logprob, best first, each keeping its own
    index; on a tie the lower index first (the input is in index order and the sort is stable)."""
    return sorted(completions, key=lambda c: -c.cumulative_logprob)[:n]


@dataclass
class _Sample:
    """The engine's view of one output stream: its sequence, text so far and logprobs."""

    seq: Sequence
    detokenizer: IncrementalDetokenizer | None
    text: str = ""
    logprobs: list[tuple[float, dict[int, float]]] | None = None  # only when the request asked for them
    cumulative_logprob: float | None = None  # the sum of its tokens' logprobs, whenever they are computed
    delivered: int = 0  # output tokens that reached the host and were checked


@dataclass
class _Request:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    samples: list[_Sample] = field(default_factory=list)
    metrics: RequestMetrics | None = None

    @property
    def finished(self) -> bool:
        """Every sample finished and its last token arrived from the device."""
        return all(s.seq.is_finished and not s.seq.num_pending_tokens for s in self.samples)


class LLMEngine:
    def __init__(self, model: str = "smollm2", **kwargs) -> None:
        self.config = config = EngineConfig.from_kwargs(model, **kwargs)
        self.device = resolve_device(config.device)
        self.dtype = resolve_dtype(config.dtype, self.device)
        if config.seed is not None:
            torch.manual_seed(config.seed)
        self.ranks = None  # tensor parallelism: the other ranks' processes (parallel/ranks.py)
        if config.tensor_parallel_size > 1:  # they start and load their slices while this process loads its own
            self.ranks = EngineRanks.start(config.model, config.tensor_parallel_size, self.device, self.dtype,
                                           config.seed)
        try:
            tp = self.ranks.tp if self.ranks is not None else None
            self.model, model_dir = load_model(config.model, self.device, self.dtype, tp=tp)
            self.model_config = self.model.config  # with tensor parallelism: this rank's share of the heads
            self.tokenizer = Tokenizer(model_dir)
            self.eos_token_ids = set(self.model_config.eos_token_ids) | self.tokenizer.eos_token_ids
            config.fill_defaults(self.device, self.model_config, self.dtype.itemsize)
            if self.device.type == "cuda":  # seats and KV capacity from free memory (kv/gpu_sizing.py)
                if self.ranks is not None and config.max_num_seqs is None:  # its profiling pass needs every rank
                    self.ranks.join_profiling_pass(config)
                fill_gpu_sizes(config, self.model, self.device, self.model_config, self.dtype, self.ranks is None)
            budget = self._kv_memory_budget
            if self.ranks is not None:  # each rank measures its own; all take the smallest
                budget = partial(self.ranks.smallest_kv_budget, config, self._kv_memory_budget)
            self.kv_manager = make_kv_manager(config, self.model_config, self.dtype, budget)
            self.runner = self._make_runner()
        except BaseException:
            self.close()  # no worker process outlives a failed start
            raise
        self.scheduler = Scheduler(
            self.kv_manager, config.max_num_seqs, config.max_num_batched_tokens, config.scheduling_policy,
            config.enable_chunked_prefill,
        )
        self.requests: dict[str, _Request] = {}
        self.step_log: list[StepRecord] = []  # one record per step while config.log_steps is on
        self._aborted_outputs: list[RequestOutput] = []
        # On the CPU, torch's thread count: every core, or the free ones where idle threads spin (runtime.CpuThreads).
        self.cpu_threads = CpuThreads(config.cpu_threads) if self.device.type == "cpu" else None
        # On a GPU, compile every kernel a step can need now, so the first generate runs as fast as the second.
        self.warm_up_seconds: float | None = None
        if self.device.type == "cuda":
            self.warm_up_seconds = warm_up(self)
            self.step_log.clear()
            logger.info("engine warm-up (every kind of step, kernels compiled) took %.1f s", self.warm_up_seconds)

    def _make_runner(self) -> ModelRunner:
        """The plain runner, unless async scheduling is on or CUDA graphs can run (a GPU, enforce_eager off)."""
        config = self.config
        options = dict(attention_backend=config.attention_backend, fused_kernels=config.fused_kernels,
                       pack_projections=config.pack_projections,
                       eos_token_ids=frozenset(self.eos_token_ids))  # what min_tokens keeps out
        if self.ranks is not None:  # the plain runner on every rank; each step goes to the workers first
            return self.ranks.runner(ModelRunner(self.model, self.kv_manager, self.dtype, **options), config)
        if config.async_scheduling or (self.device.type == "cuda" and not config.enforce_eager):
            return FastModelRunner(self.model, self.kv_manager, self.dtype, **options,
                                   enforce_eager=config.enforce_eager, max_num_seqs=config.max_num_seqs,
                                   max_model_len=config.max_model_len)
        return ModelRunner(self.model, self.kv_manager, self.dtype, **options)

    def _kv_memory_budget(self) -> int:
        """Bytes the KV cache may take when num_kv_blocks is not given."""
        if self.device.type == "cuda":
            return gpu_memory_for_kv(self.model, self.device, self.config)
        return self.config.cpu_kv_cache_bytes

    def close(self) -> None:
        """Stop the tensor-parallel workers, if any (garbage collection and interpreter exit do it too)."""
        if self.ranks is not None:
            self.ranks.close()

    # -- requests ---------------------------------------------------------------------------------------------
    def add_request(
        self, request_id: str, prompt: str | list[int], params: SamplingParams | None = None, priority: int = 0
    ) -> None:
        """Queue a request. Bad input raises ValueError and leaves the engine and other requests untouched."""
        params = SamplingParams() if params is None else params
        if not isinstance(params, SamplingParams):
            raise ValueError(f"params must be a SamplingParams, got {type(params).__name__}")
        if not isinstance(request_id, str) or not request_id:
            raise ValueError(f"request_id must be a non-empty string, got {request_id!r}")
        if request_id in self.requests:
            raise ValueError(f"request_id {request_id!r} is already in use")
        if not isinstance(priority, int) or isinstance(priority, bool):
            raise ValueError(f"priority must be an integer, got {priority!r}")
        num_samples = params.num_samples  # best_of of them when it ranks samples, else n
        if num_samples > self.config.max_num_seqs:
            # All samples run side by side once forked; more than max_num_seqs could never be scheduled.
            name = "best_of" if params.ranks_samples else "n"
            raise ValueError(f"{name}={num_samples} samples need {num_samples} sequence seats but max_num_seqs is "
                             f"{self.config.max_num_seqs}; lower {name} or raise max_num_seqs")
        vocab = self.model_config.vocab_size
        if params.logit_bias and max(params.logit_bias) >= vocab:
            raise ValueError(f"logit_bias names token {max(params.logit_bias)}, outside the vocabulary [0, {vocab})")
        prompt_text, prompt_ids = self._prompt_token_ids(prompt)
        limit = self.config.max_model_len
        if len(prompt_ids) >= limit:
            raise ValueError(
                f"prompt has {len(prompt_ids)} tokens but max_model_len is {limit}: it must be at most "
                f"{limit - 1} tokens to leave room for one output token; shorten it or raise max_model_len"
            )
        now = time.monotonic()
        request = _Request(request_id, prompt_text, prompt_ids, params,
                           metrics=RequestMetrics(arrival_time=now, num_prompt_tokens=len(prompt_ids)))
        for index in range(num_samples):
            seq = Sequence(request_id, prompt_ids, params, sample_index=index, priority=priority, arrival_time=now)
            detok = IncrementalDetokenizer(self.tokenizer) if self.tokenizer.available else None
            request.samples.append(_Sample(seq, detok, logprobs=[] if params.logprobs is not None else None,
                                           cumulative_logprob=0.0 if params.needs_logprobs else None))
        self.requests[request_id] = request
        # Only sample 0 prefills the prompt; the others are forked from it once it has (see _after_sampling).
        request.samples[0].seq.num_unborn_siblings = num_samples - 1
        self.scheduler.add(request.samples[0].seq)

    def _prompt_token_ids(self, prompt) -> tuple[str | None, list[int]]:
        if isinstance(prompt, str):
            if not prompt:
                raise ValueError("prompt is empty; give at least one character or token id")
            return prompt, self.tokenizer.encode(prompt)
        if isinstance(prompt, (list, tuple)) and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            if not prompt:
                raise ValueError("prompt is an empty list of token ids; give at least one token")
            vocab = self.model_config.vocab_size
            bad = [t for t in prompt if not 0 <= t < vocab]
            if bad:
                raise ValueError(f"token ids {bad[:5]} are outside the vocabulary [0, {vocab})")
            return None, list(prompt)
        raise ValueError(f"prompt must be a string or a list of token ids, got {type(prompt).__name__}")

    def abort(self, request_id: str) -> None:
        """Stop a request now and free its KV memory; its final output (reason "abort") comes with the next step."""
        request = self.requests.pop(request_id, None)
        if request is None:
            return
        now = time.monotonic()
        for sample in request.samples:
            self._drop_pending(sample.seq)  # a step in flight may still sample for it: that token is dropped
            if not sample.seq.is_finished:
                self.scheduler.finish(sample.seq, "abort")
                sample.seq.finish_time = now
        request.metrics.finish_time = now
        self._aborted_outputs.append(self._output(request))

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests) or bool(self._aborted_outputs)

    # -- the step ---------------------------------------------------------------------------------------------
    def step(self, only_finished: bool = False) -> list[RequestOutput]:
        """Run one step. Returns a cumulative RequestOutput for every request that progressed or finished.

        only_finished=True returns only the requests that finished (or were aborted): a caller that does not
        stream saves building an output per running request per step, which adds up at hundreds of requests.
        A best_of request shows, at every step, the n samples with the highest cumulative logprob so far (a
        sample may leave or join them, its CompletionOutput.index says which it is); the finished output's n are
        the best of all best_of samples.

        With async scheduling (the default on a GPU) the step launches this step's work on the device and then
        reads the tokens of the PREVIOUS step, so the host's planning and bookkeeping overlap the device's work
        instead of adding to it. The outputs it returns are one step behind, and a sequence that stops on a
        token (EOS, a stop string) has already been scheduled once more: that extra token is dropped.
        """
        outputs, self._aborted_outputs = self._aborted_outputs, []
        if self.cpu_threads is not None:
            self.cpu_threads.adjust()
        batch = self.scheduler.schedule()
        record_plan(batch)
        started = time.monotonic()
        for seq in batch.seqs:
            if seq.first_scheduled_time is None:
                seq.first_scheduled_time = started
        record = None
        if self.config.log_steps:
            record = StepRecord.of(self.scheduler.step_count - 1, started, batch, self.scheduler, self.kv_manager)
        tokens = self._run_async(batch) if self.config.async_scheduling else self._run(batch)
        progressed = self._deliver(tokens)
        now = time.monotonic()
        if record is not None:
            record.end = now
            self.step_log.append(record)
        for request in progressed.values():
            if request.finished or not only_finished:
                outputs.append(self._output(request))
            if request.finished:
                request.metrics.finish_time = now
                del self.requests[request.request_id]
        return outputs

    def _run(self, batch: ScheduledBatch) -> list[SampledToken]:
        """A synchronous step: run it, record what it computed and append the tokens it sampled."""
        tokens = self.runner.run(batch)
        record_computed(batch)
        for token in tokens:
            token.seq.token_ids.append(token.token_id)
            self._after_sampling(token.seq)
        return tokens

    def _run_async(self, batch: ScheduledBatch) -> list[SampledToken]:
        """Launch this step, giving each sequence that samples a placeholder for its token, so that the next step
        can be planned now; then wait for the PREVIOUS step's tokens and write them over their placeholders."""
        previous = self.runner.in_flight
        launched = self.runner.launch(batch)
        record_computed(batch)
        for seq in launched.seqs:
            seq.token_ids.append(PENDING_TOKEN)
            seq.num_pending_tokens += 1
            self._after_sampling(seq)
        # A sequence that stopped (or was aborted) after that step was launched has no placeholder left for it.
        tokens = [t for t in previous.tokens() if t.seq.num_pending_tokens] if previous is not None else []
        for token in tokens:
            token.seq.token_ids[-token.seq.num_pending_tokens] = token.token_id  # its oldest placeholder
            token.seq.num_pending_tokens -= 1
        return tokens

    def _after_sampling(self, seq: Sequence) -> None:
        """What follows from seq having sampled a token, whatever its value: its siblings start, and at the length
        limit it finishes. (Async: steps run in order on the device, so freeing its memory now is safe.)"""
        if seq.num_unborn_siblings:  # its prompt is in the cache now: start the other samples from it
            for sibling in self.requests[seq.request_id].samples[1:]:
                sibling.seq.num_computed_tokens = self.scheduler.fork(seq, sibling.seq)
        if seq.num_output_tokens >= seq.params.max_tokens or seq.num_tokens >= self.config.max_model_len:
            self.scheduler.finish(seq, "length")

    def _deliver(self, tokens: list[SampledToken]) -> dict[str, _Request]:
        """Detokenize the step's tokens (already in their sequences) and check stop conditions. Returns the
        requests that progressed."""
        progressed: dict[str, _Request] = {}
        now = time.monotonic()
        for token in tokens:
            request = self.requests[token.seq.request_id]
            self._append_token(request, token, now)
            progressed[request.request_id] = request
        return progressed

    def _append_token(self, request: _Request, token: SampledToken, now: float) -> None:
        seq, params = token.seq, request.params
        sample = request.samples[seq.sample_index]
        if seq.first_token_time is None:
            seq.first_token_time = now
            if request.metrics.first_token_time is None:
                request.metrics.first_token_time = now
        if sample.logprobs is not None:
            sample.logprobs.append((token.logprob, token.top_logprobs or {}))
        if sample.cumulative_logprob is not None:
            sample.cumulative_logprob += token.logprob
        sample.delivered += 1
        may_stop = sample.delivered >= params.min_tokens  # before that, nothing ends it but max_tokens
        stop = may_stop and (token.token_id in params.stop_token_ids or (
            not params.ignore_eos and token.token_id in self.eos_token_ids))
        if sample.detokenizer is not None:
            previous = len(sample.text)
            sample.text += sample.detokenizer.push([token.token_id])
            cut = self._find_stop_string(sample.text, previous, params.stop) if may_stop else None
            if cut is not None:
                sample.text, stop = sample.text[:cut], True
        if stop:  # a stop beats the length limit when both fall on the same token
            self._drop_pending(seq)  # tokens sampled after this one are not part of the output
            if seq.is_finished:
                seq.finish_reason = "stop"
            else:
                self.scheduler.finish(seq, "stop")
        if seq.is_finished and not seq.num_pending_tokens:
            seq.finish_time = now

    @staticmethod
    def _drop_pending(seq: Sequence) -> None:
        """Forget the tokens of seq still in flight (their values, when they arrive, are ignored)."""
        if seq.num_pending_tokens:  # (only ever for a sequence that finishes: its other state no longer matters)
            del seq.token_ids[-seq.num_pending_tokens:]
            seq.num_pending_tokens = 0

    @staticmethod
    def _find_stop_string(text: str, previous_len: int, stops: list[str]) -> int | None:
        """Where the earliest stop string that ends in the new text starts, or None."""
        best = None
        for stop in stops:
            at = text.find(stop, max(0, previous_len - len(stop) + 1))
            if at != -1 and (best is None or at < best):
                best = at
        return best

    def _output(self, request: _Request) -> RequestOutput:
        metrics = request.metrics
        metrics.num_output_tokens = sum(len(s.seq.output_token_ids) for s in request.samples)
        metrics.num_preemptions = sum(s.seq.num_preemptions for s in request.samples)
        scheduled = [s.seq.first_scheduled_time for s in request.samples if s.seq.first_scheduled_time is not None]
        metrics.first_scheduled_time = min(scheduled, default=None)
        completions = [
            CompletionOutput(
                index=i, text=s.text, token_ids=s.seq.output_token_ids,
                # A sample stopped for length before its last token arrived is not finished for the caller yet.
                finish_reason=None if s.seq.num_pending_tokens else s.seq.finish_reason,
                logprobs=None if s.logprobs is None else list(s.logprobs), cumulative_logprob=s.cumulative_logprob,
            )
            for i, s in enumerate(request.samples)
        ]
        if request.params.ranks_samples:  # while the request runs: the best n so far
            completions = best_completions(completions, request.params.n)
        # The prompt's ids are shared, not copied: nothing changes them after add_request.
        return RequestOutput(request.request_id, request.prompt, request.prompt_token_ids, completions,
                             request.finished, metrics)
