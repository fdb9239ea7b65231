"""The OpenAI API's shapes: request bodies (pydantic), the error body, and the responses and stream chunks.

Request bodies are checked for types here (pydantic, strict: "max_tokens": "5" or true is an error) and for
values by `SamplingParams`, the one place that knows what a valid temperature or top_p is; its ValueError is
turned into a 400 that names the API's field. Fields the engine does not have are ignored, except those whose
non-default value would change the answer, which are refused with a 400 naming them: echo, several prompts,
suffix, tools / tool_choice / functions, response_format. best_of (>= n) runs best_of samples and answers the n
with the highest cumulative logprob; like OpenAI, it cannot be streamed when above n, and usage counts the
tokens of all best_of samples (they were all generated).

Extensions beyond OpenAI's API (vLLM has the same names): top_k, ignore_eos, stop_token_ids, min_tokens,
repetition_penalty, and return_token_ids, which adds each choice's (or chunk's) generated `token_ids`.

This module only describes data; it must not touch the engine or the network.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict

from ..sampling import SamplingParams
from .engine_thread import ChoiceDelta, TokenLogprob

MAX_TOP_LOGPROBS = 20


class APIError(Exception):
    """An error answered in OpenAI's shape: {"error": {"message", "type", "param", "code"}}.

    outcome: how the request is counted in the server's metrics (see metrics.OUTCOMES).
    """

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, outcome: str = "invalid") -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code, self.outcome = (
            status, message, type, param, code, outcome)

    def body(self) -> dict:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


_SAMPLING_ERROR = re.compile(r"SamplingParams\((\w+)=(.*?)\): (.*)", re.S)


def sampling_error(exc: ValueError, api_names: dict[str, str]) -> APIError:
    """SamplingParams' ValueError as a 400 naming the API's field (api_names maps ours to theirs)."""
    match = _SAMPLING_ERROR.match(str(exc))
    if match is None:
        return APIError(400, str(exc))
    name, value, requirement = match.groups()
    api_name = api_names.get(name, name)
    return APIError(400, f"invalid {api_name}={value}: {requirement.replace(name, api_name)}", param=api_name)


# -- request bodies ---------------------------------------------------------------------------------------------
class StreamOptions(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    include_usage: bool = False


class _GenerationBody(BaseModel):
    """What completions and chat completions share. None means "the default" for every optional field."""

    model_config = ConfigDict(strict=True, extra="ignore")

    model: str | None = None  # None: the one model this server serves
    n: int | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool = False
    stop_token_ids: list[int] | None = None
    return_token_ids: bool = False
    logit_bias: dict[str, float] | None = None  # OpenAI's keys are token ids written as strings
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None
    min_tokens: int | None = None
    best_of: int | None = None
    # Would change the answer and the engine cannot do them: refused when given (see _refuse_unsupported).
    suffix: Any = None
    tools: Any = None
    tool_choice: Any = None
    functions: Any = None
    function_call: Any = None
    response_format: Any = None

    prompt_param: ClassVar[str]  # how the API names the prompt, for errors about it

    def _refuse_unsupported(self) -> None:
        for name in ("suffix", "tools", "tool_choice", "functions", "function_call", "response_format"):
            if getattr(self, name) not in (None, "", [], "none"):
                raise APIError(400, f"{name} is not supported by this server; leave it out", param=name)
        n = 1 if self.n is None else self.n
        if self.stream and self.best_of is not None and self.best_of > n:  # the best are known only at the end
            raise APIError(400, f"best_of={self.best_of} above n={n} cannot be streamed: set stream to false or "
                                "leave best_of out", param="best_of")

    def _logit_bias(self) -> dict[int, float] | None:
        if not self.logit_bias:
            return None
        try:
            return {int(token): bias for token, bias in self.logit_bias.items()}
        except ValueError:
            raise APIError(400, "logit_bias keys must be token ids (integers written as strings)",
                           param="logit_bias") from None

    def _sampling_params(self, max_tokens: int | None, logprobs: int | None,
                         api_names: dict[str, str] | None = None) -> SamplingParams:
        """max_tokens None: a placeholder of 1 here; the engine thread sets the room left once the prompt is known.

        api_names: how the API names SamplingParams' fields, where the names differ (for error messages).
        """
        self._refuse_unsupported()
        min_tokens = self.min_tokens or 0
        try:
            return SamplingParams(
                n=1 if self.n is None else self.n,
                temperature=1.0 if self.temperature is None else self.temperature,
                top_p=1.0 if self.top_p is None else self.top_p,
                top_k=-1 if self.top_k is None else self.top_k,
                max_tokens=max(1, min_tokens) if max_tokens is None else max_tokens,
                stop=self.stop, stop_token_ids=self.stop_token_ids, ignore_eos=self.ignore_eos, seed=self.seed,
                logprobs=logprobs, min_tokens=min_tokens, logit_bias=self._logit_bias(),
                presence_penalty=self.presence_penalty or 0.0, frequency_penalty=self.frequency_penalty or 0.0,
                repetition_penalty=1.0 if self.repetition_penalty is None else self.repetition_penalty,
                best_of=self.best_of,
            )
        except ValueError as exc:
            raise sampling_error(exc, api_names or {}) from None

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


class CompletionRequest(_GenerationBody):
    prompt: str | list[int] | list[str] | list[list[int]]
    logprobs: int | None = None  # the k most likely tokens per position, besides the chosen one
    echo: bool = False

    prompt_param: ClassVar[str] = "prompt"

    def prompt_input(self) -> str | list[int]:
        prompt = self.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
            if len(prompt) != 1:
                raise APIError(400, f"prompt: this server takes one prompt per request, got {len(prompt)}; "
                                    "send one request per prompt", param="prompt")
            prompt = prompt[0]
        if not prompt:
            raise APIError(400, "prompt is empty: give at least one character or token id", param="prompt")
        return prompt

    def sampling_params(self) -> SamplingParams:
        if self.echo:
            raise APIError(400, "echo=true is not supported by this server", param="echo")
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_TOP_LOGPROBS:
            raise APIError(400, f"invalid logprobs={self.logprobs}: logprobs must be an integer in "
                                f"[0, {MAX_TOP_LOGPROBS}]", param="logprobs")
        return self._sampling_params(16 if self.max_tokens is None else self.max_tokens, self.logprobs)

    @property
    def max_tokens_given(self) -> bool:
        return True  # OpenAI's completions default to 16 tokens


class ContentPart(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart] | None = None

    def as_template_message(self) -> dict[str, str]:
        content = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content or [])
        return {"role": "system" if self.role == "developer" else self.role, "content": content}


class ChatCompletionRequest(_GenerationBody):
    messages: list[ChatMessage]
    max_completion_tokens: int | None = None  # OpenAI's newer name for max_tokens
    logprobs: bool = False
    top_logprobs: int | None = None

    prompt_param: ClassVar[str] = "messages"

    def conversation(self) -> list[dict[str, str]]:
        if not self.messages:
            raise APIError(400, "messages is empty: give at least one message", param="messages")
        return [m.as_template_message() for m in self.messages]

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    @property
    def max_tokens_given(self) -> bool:
        return self.requested_max_tokens is not None  # otherwise: until EOS or the context is full

    def sampling_params(self) -> SamplingParams:
        if self.top_logprobs is not None:
            if not self.logprobs:
                raise APIError(400, "top_logprobs needs logprobs=true", param="top_logprobs")
            if not 0 <= self.top_logprobs <= MAX_TOP_LOGPROBS:
                raise APIError(400, f"invalid top_logprobs={self.top_logprobs}: top_logprobs must be an integer in "
                                    f"[0, {MAX_TOP_LOGPROBS}]", param="top_logprobs")
        logprobs = (self.top_logprobs or 0) if self.logprobs else None
        max_tokens_name = "max_completion_tokens" if self.max_completion_tokens is not None else "max_tokens"
        return self._sampling_params(self.requested_max_tokens, logprobs,
                                     {"logprobs": "top_logprobs", "max_tokens": max_tokens_name})


# -- responses ----------------------------------------------------------------------------------------------------
def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


@dataclass
class ChoiceState:
    """One choice of a non-streamed response, accumulated from its deltas."""

    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] | None = None
    finish_reason: str | None = None

    def add(self, delta: ChoiceDelta) -> None:
        self.text += delta.text
        self.token_ids += delta.token_ids
        if delta.logprobs is not None:
            self.logprobs = (self.logprobs or []) + delta.logprobs
        self.finish_reason = delta.finish_reason or self.finish_reason


class CompletionFormat:
    """/v1/completions: a response with choices[i].text, or "text_completion" chunks."""

    object = "text_completion"
    id_prefix = "cmpl-"

    def __init__(self, request_id: str, created: int, model: str, return_token_ids: bool) -> None:
        self.request_id, self.created, self.model, self.return_token_ids = request_id, created, model, return_token_ids
        self._text_offsets: dict[int, int] = {}  # choice -> characters of text before its next token

    def _head(self) -> dict:
        return {"id": self.request_id, "object": self.object, "created": self.created, "model": self.model}

    def _logprobs(self, index: int, entries: list[TokenLogprob] | None) -> dict | None:
        if entries is None:
            return None
        offsets, offset = [], self._text_offsets.get(index, 0)
        for entry in entries:
            offsets.append(offset)
            offset += len(entry.token)
        self._text_offsets[index] = offset
        return {"tokens": [e.token for e in entries], "token_logprobs": [e.logprob for e in entries],
                "top_logprobs": [dict(e.top) for e in entries], "text_offset": offsets}

    def _choice(self, index: int, text: str, token_ids: list[int], logprobs, finish_reason) -> dict:
        choice = {"index": index, "text": text, "logprobs": self._logprobs(index, logprobs),
                  "finish_reason": finish_reason}
        if self.return_token_ids:
            choice["token_ids"] = token_ids
        return choice

    def opening_chunks(self) -> list[dict]:
        return []

    def chunk(self, delta: ChoiceDelta) -> dict:
        choice = self._choice(delta.index, delta.text, delta.token_ids, delta.logprobs, delta.finish_reason)
        return {**self._head(), "choices": [choice]}

    def usage_chunk(self, prompt_tokens: int, completion_tokens: int) -> dict:
        return {**self._head(), "choices": [], "usage": usage(prompt_tokens, completion_tokens)}

    def response(self, choices: list[ChoiceState], prompt_tokens: int, completion_tokens: int) -> dict:
        """completion_tokens: every token generated, best_of's samples that were not chosen included."""
        body = [self._choice(i, c.text, c.token_ids, c.logprobs, c.finish_reason) for i, c in enumerate(choices)]
        return {**self._head(), "choices": body, "usage": usage(prompt_tokens, completion_tokens)}


def _token_bytes(token: str) -> list[int]:
    return list(token.encode("utf-8", errors="replace"))


class ChatFormat(CompletionFormat):
    """/v1/chat/completions: choices[i].message, or "chat.completion.chunk" chunks with a delta."""

    object = "chat.completion"
    id_prefix = "chatcmpl-"

    def __init__(self, request_id: str, created: int, model: str, return_token_ids: bool, n: int) -> None:
        super().__init__(request_id, created, model, return_token_ids)
        self.n = n

    @staticmethod
    def _chat_logprobs(entries: list[TokenLogprob] | None) -> dict | None:
        if entries is None:
            return None
        return {"content": [
            {"token": e.token, "logprob": e.logprob, "bytes": _token_bytes(e.token),
             "top_logprobs": [{"token": t, "logprob": lp, "bytes": _token_bytes(t)} for t, lp in e.top]}
            for e in entries
        ]}

    def _chunk_head(self) -> dict:
        return {**self._head(), "object": "chat.completion.chunk"}

    def opening_chunks(self) -> list[dict]:
        """OpenAI opens each choice's stream with the role, before any content."""
        return [{**self._chunk_head(), "choices": [
            {"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}]}
            for i in range(self.n)]

    def chunk(self, delta: ChoiceDelta) -> dict:
        choice: dict[str, Any] = {"index": delta.index, "delta": {"content": delta.text} if delta.text else {},
                                  "logprobs": self._chat_logprobs(delta.logprobs), "finish_reason": delta.finish_reason}
        if self.return_token_ids:
            choice["token_ids"] = delta.token_ids
        return {**self._chunk_head(), "choices": [choice]}

    def usage_chunk(self, prompt_tokens: int, completion_tokens: int) -> dict:
        return {**self._chunk_head(), "choices": [], "usage": usage(prompt_tokens, completion_tokens)}

    def response(self, choices: list[ChoiceState], prompt_tokens: int, completion_tokens: int) -> dict:
        body = []
        for i, c in enumerate(choices):
            choice = {"index": i, "message": {"role": "assistant", "content": c.text},
                      "logprobs": self._chat_logprobs(c.logprobs), "finish_reason": c.finish_reason}
            if self.return_token_ids:
                choice["token_ids"] = c.token_ids
            body.append(choice)
        return {**self._head(), "choices": body, "usage": usage(prompt_tokens, completion_tokens)}
