"""LLM: the offline API. Give it prompts, get completions; the engine batches them continuously underneath.

    llm = LLM("smollm2")
    outs = llm.generate(["What is the capital of France?"], SamplingParams(temperature=0, max_tokens=32))
    print(outs[0].outputs[0].text)
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Sequence

from .engine import LLMEngine
from .outputs import RequestOutput
from .progress import ProgressBar
from .sampling import SamplingParams

Prompt = str | list[int]


class LLM:
    def __init__(self, model: str = "smollm2", **engine_options) -> None:
        """engine_options: see EngineConfig (device, dtype, max_num_seqs, max_num_batched_tokens, ...)."""
        self.engine = LLMEngine(model, **engine_options)
        self.tokenizer = self.engine.tokenizer
        self._ids = itertools.count()

    def close(self) -> None:
        """Stop the engine's tensor-parallel worker processes, if any (garbage collection and exit do it too)."""
        self.engine.close()

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
        priority: Sequence[int] | None = None,
    ) -> list[RequestOutput]:
        """Generate for every prompt; returns the final RequestOutputs in prompt order."""
        prompts = self._as_prompt_list(prompts)
        params = self._per_prompt(sampling_params, len(prompts), "sampling_params")
        priorities = [0] * len(prompts) if priority is None else list(priority)
        if len(priorities) != len(prompts):
            raise ValueError(f"priority has {len(priorities)} entries for {len(prompts)} prompts; give one per prompt")
        request_ids = []
        try:
            for prompt, p, prio in zip(prompts, params, priorities):
                request_id = f"gen-{next(self._ids)}"
                self.engine.add_request(request_id, prompt, p, priority=prio)
                request_ids.append(request_id)
        except ValueError:
            for request_id in request_ids:  # all or nothing: do not leave half a batch running
                self.engine.abort(request_id)
            raise
        return self._collect(request_ids, use_tqdm)

    def chat(
        self,
        conversations: list[dict[str, str]] | Sequence[list[dict[str, str]]],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
    ) -> list[RequestOutput]:
        """One RequestOutput per conversation (a list of {"role", "content"} messages), replying to its end."""
        if conversations and isinstance(conversations[0], dict):
            conversations = [conversations]
        prompts = [self.tokenizer.apply_chat_template(list(messages)) for messages in conversations]
        return self.generate(prompts, sampling_params, use_tqdm=use_tqdm)

    def stream(self, prompt: Prompt, sampling_params: SamplingParams | None = None) -> Iterator[RequestOutput]:
        """Yield the request's cumulative RequestOutput after every step that advanced it; the last is finished.
        With best_of above n, each output holds the n best samples so far (LLMEngine.step says more)."""
        request_id = f"stream-{next(self._ids)}"
        self.engine.add_request(request_id, prompt, sampling_params)
        try:
            while True:
                for out in self.engine.step():
                    if out.request_id == request_id:
                        yield out
                        if out.finished:
                            return
        finally:
            if request_id in self.engine.requests:  # the consumer stopped early
                self.engine.abort(request_id)

    # -- helpers ----------------------------------------------------------------------------------------------
    def _collect(self, request_ids: list[str], use_tqdm: bool) -> list[RequestOutput]:
        """Step the engine until every one of request_ids has finished; their final outputs, in that order."""
        wanted = set(request_ids)
        final: dict[str, RequestOutput] = {}
        with ProgressBar(len(request_ids), "Generating", use_tqdm) as bar:
            while len(final) < len(wanted):
                for out in self.engine.step(only_finished=True):
                    if out.request_id in wanted and out.finished:
                        final[out.request_id] = out
                        bar.finished(out)
        return [final[r] for r in request_ids]

    @staticmethod
    def _as_prompt_list(prompts) -> list[Prompt]:
        if isinstance(prompts, str):
            return [prompts]
        if isinstance(prompts, (list, tuple)) and prompts and all(isinstance(t, int) for t in prompts):
            return [list(prompts)]  # a single prompt given as token ids
        if isinstance(prompts, (list, tuple)):
            return list(prompts)
        raise ValueError(f"prompts must be a string, a list of strings or a list of token-id lists, "
                         f"got {type(prompts).__name__}")

    @staticmethod
    def _per_prompt(value, count: int, name: str) -> list:
        if value is None or isinstance(value, SamplingParams):
            return [value] * count
        value = list(value)
        if len(value) != count:
            raise ValueError(f"{name} has {len(value)} entries for {count} prompts; give one, or one per prompt")
        return value
