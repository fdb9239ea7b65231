"""EngineThread: the one thread that owns the LLMEngine, and the events it hands to each request's handler.

The engine is not thread-safe and HTTP handlers run on asyncio's event loop, so handlers never touch it. They
put a Submission (or an abort) into a thread-safe inbox and wake the engine thread; the engine thread drains the
inbox between steps, steps while any request has work, and sleeps on an Event when none has. Everything that
needs the engine happens on the engine thread: the context-length checks, admission, and the token strings of
logprobs. Tokenizing a prompt, whose cost grows with what the client sent, does not: prompts.py does it on a
worker thread before the request is submitted, so a huge prompt never stalls the running streams. Each RequestOutput becomes an Update of deltas (per choice: new
text, new token ids, new logprobs, the finish reason) delivered to the request's asyncio queue with
`loop.call_soon_threadsafe`.

Streaming text must never be taken back, but the engine finds a stop string only once all of it was generated
and then cuts it out. So while a choice runs, the engine thread holds back any tail of its text that could be the start
of a stop string (the text "Hello, W" with stop "World" sends "Hello, " until the next token decides).

This module must not know about HTTP or JSON (app.py and protocol.py do).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import queue
import threading
from dataclasses import dataclass

from ..engine import LLMEngine
from ..outputs import CompletionOutput, RequestMetrics, RequestOutput
from ..sampling import SamplingParams

logger = logging.getLogger("reference.server")


# -- what the engine thread sends to a request's handler --------------------------------------------------------------
@dataclass
class TokenLogprob:
    token: str  # the token's text (special tokens included)
    logprob: float
    top: list[tuple[str, float]]  # the most likely tokens at this position and their logprobs, most likely first


@dataclass
class ChoiceDelta:
    index: int  # which of the request's n choices
    text: str  # new text since the previous delta (may be empty: held back, or an unfinished character)
    token_ids: list[int]  # new token ids since the previous delta
    logprobs: list[TokenLogprob] | None  # one per new token, when the request asked for logprobs
    finish_reason: str | None  # "stop", "length" once the choice is done


@dataclass
class Accepted:
    """The request is in the engine; its prompt has this many tokens."""

    num_prompt_tokens: int


@dataclass
class Rejected:
    """The request was refused before it ran; param and code fill OpenAI's error shape."""

    message: str
    param: str | None
    code: str | None = None


@dataclass
class Update:
    choices: list[ChoiceDelta]  # only the choices that progressed
    finished: bool  # every choice is done; this is the request's last event
    num_prompt_tokens: int
    num_output_tokens: int  # all samples together, so far (best_of's samples that will not be chosen included)
    metrics: RequestMetrics


@dataclass
class Stopped:
    """The request ended without finishing: the server is shutting down ("shutdown") or the engine failed ("error")."""

    reason: str
    message: str


Event = Accepted | Rejected | Update | Stopped


class RequestStream:
    """One request's mailbox: the engine thread puts events, the handler awaits them on its event loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._queue: asyncio.Queue[Event] = asyncio.Queue()

    def put(self, event: Event) -> None:
        """Called on the engine thread."""
        try:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, event)
        except RuntimeError:  # the event loop is closed: nobody is listening any more
            pass

    async def get(self, timeout: float | None = None) -> Event:
        """Called on the event loop; raises TimeoutError after `timeout` seconds without an event."""
        return await asyncio.wait_for(self._queue.get(), timeout)


@dataclass
class Submission:
    """A request for the engine thread, its prompt already tokenized (prompts.py, on a worker thread)."""

    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    max_tokens_given: bool  # False: generate until EOS or the context is full (params.max_tokens is a placeholder)
    prompt_param: str  # the API's name for the prompt ("prompt" or "messages"), for error messages
    stream: RequestStream


@dataclass(frozen=True)
class EngineStats:
    """A snapshot the engine thread publishes after every step and every inbox drain (read by /health, gauges)."""

    num_requests: int = 0  # requests in the engine (admitted, not finished)
    num_running: int = 0  # requests with a sequence the scheduler is running
    num_waiting: int = 0  # requests with a sequence waiting for a seat (new or preempted)
    kv_blocks_in_use: int = 0  # KV blocks held by live sequences (free prefix-cached blocks do not count)
    kv_blocks_total: int = 0
    num_steps: int = 0


class _Reject(Exception):
    def __init__(self, rejected: Rejected) -> None:
        super().__init__(rejected.message)
        self.rejected = rejected


@dataclass
class _Live:
    """The engine thread's books on one admitted request: how much of each choice was handed out."""

    submission: Submission
    num_prompt_tokens: int
    sent_chars: list[int]
    sent_tokens: list[int]
    done: list[bool]
    num_output_tokens: int = 0  # tokens generated for it so far, all samples (best_of's included)


def held_back_length(text: str, stops: list[str]) -> int:
    """Length of the longest tail of `text` that is a proper prefix of some stop string (0 if none)."""
    longest = 0
    for stop in stops:
        for length in range(min(len(stop) - 1, len(text)), longest, -1):
            if text.endswith(stop[:length]):
                longest = length
                break
    return longest


class EngineThread:
    """Runs `engine` on its own thread. submit() and abort() are safe to call from any thread.

    metrics: an optional ServerMetrics; the thread counts tokens and steps, observes latencies of finished
    requests and sets the engine gauges.
    """

    def __init__(self, engine: LLMEngine, metrics=None) -> None:
        self.engine = engine  # only the engine thread may use it once start() has run
        self.metrics = metrics
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._lock = threading.Lock()  # orders submit() against the thread closing its inbox
        self._closed = False
        self._live: dict[str, _Live] = {}
        self._token_text: dict[int, str] = {}
        self._thread = threading.Thread(target=self._run, name="engine-thread", daemon=True)
        self.stats = EngineStats(kv_blocks_total=engine.kv_manager.num_blocks)

    # -- any thread ---------------------------------------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    @property
    def accepting(self) -> bool:
        return not self._stopping.is_set()

    def submit(self, submission: Submission) -> None:
        """Queue a request; its events (Accepted or Rejected first) arrive on submission.stream."""
        with self._lock:
            if not self._closed:
                self._inbox.put(("add", submission))
                self._wake.set()
                return
        submission.stream.put(Stopped("shutdown", "the server is shutting down"))

    def abort(self, request_id: str) -> None:
        """Stop a request and free its KV memory before the next step. No more events come for it."""
        self._inbox.put(("abort", request_id))
        self._wake.set()

    def begin_shutdown(self) -> None:
        """Abort every request in flight (each gets Stopped("shutdown")) and let the thread end; returns at once."""
        self._stopping.set()
        self._wake.set()

    def shutdown(self, timeout: float = 30.0) -> None:
        """begin_shutdown(), then wait for the thread to end."""
        self.begin_shutdown()
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(timeout)

    # -- the engine thread ----------------------------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            self._drain_inbox()
            if self._stopping.is_set():
                break
            if self.engine.has_unfinished_requests():
                self._step()
            else:
                self._wake.wait()
                self._wake.clear()  # cleared before the next drain, so a submit() that raced us is not missed
        self._stop_all("shutdown", "the server is shutting down")
        with self._lock:
            self._closed = True
        self._drain_inbox()  # submissions that arrived while we stopped

    def _drain_inbox(self) -> None:
        while True:
            try:
                kind, item = self._inbox.get_nowait()
            except queue.Empty:
                break
            if kind == "abort":
                self._abort(item)
            elif self._closed:
                item.stream.put(Stopped("shutdown", "the server is shutting down"))
            else:
                self._admit(item)
        self._publish_stats()

    def _admit(self, sub: Submission) -> None:
        try:
            prompt_ids = self._prompt_token_ids(sub)
            params = self._fit_max_tokens(sub, len(prompt_ids))
            self.engine.add_request(sub.request_id, prompt_ids, params)
        except _Reject as exc:
            sub.stream.put(exc.rejected)
            return
        except ValueError as exc:  # add_request's checks (token ids outside the vocabulary, no tokenizer...)
            sub.stream.put(Rejected(str(exc), sub.prompt_param))
            return
        except Exception:  # a bug, not a user error: this request fails, the thread goes on
            logger.exception("could not admit %s", sub.request_id)
            sub.stream.put(Stopped("error", "the server failed to admit this request; see the server log"))
            return
        n = params.n
        self._live[sub.request_id] = _Live(sub, len(prompt_ids), [0] * n, [0] * n, [False] * n)
        if self.metrics is not None:
            self.metrics.prompt_tokens.inc(len(prompt_ids))
        sub.stream.put(Accepted(len(prompt_ids)))

    def _prompt_token_ids(self, sub: Submission) -> list[int]:
        ids = sub.prompt_ids
        limit = self.engine.config.max_model_len
        if len(ids) >= limit:
            what = "the prompt has" if sub.prompt_param == "prompt" else f"the {sub.prompt_param} have"
            raise _Reject(Rejected(
                f"this model's context length (max_model_len) is {limit} tokens, but {what} {len(ids)} tokens and "
                f"at least one must be left for the reply: shorten the {sub.prompt_param} to at most {limit - 1} "
                "tokens", sub.prompt_param, "context_length_exceeded"))
        return ids

    def _fit_max_tokens(self, sub: Submission, num_prompt_tokens: int) -> SamplingParams:
        limit = self.engine.config.max_model_len
        room = limit - num_prompt_tokens
        if not sub.max_tokens_given:
            return dataclasses.replace(sub.params, max_tokens=room)
        asked = sub.params.max_tokens
        if asked > room:
            raise _Reject(Rejected(
                f"this model's context length (max_model_len) is {limit} tokens, but {num_prompt_tokens + asked} "
                f"were requested ({num_prompt_tokens} in the {sub.prompt_param} + {asked} max_tokens): lower "
                f"max_tokens to at most {room} or shorten the {sub.prompt_param}", "max_tokens",
                "context_length_exceeded"))
        return sub.params

    def _abort(self, request_id: str) -> None:
        if self._live.pop(request_id, None) is not None:
            self.engine.abort(request_id)  # frees its KV blocks now; its "abort" output is ignored next step

    def _step(self) -> None:
        try:
            outputs = self.engine.step()
        except Exception:  # a bug, not a user error: fail what is in flight, keep serving
            logger.exception("engine step failed; failing every request in flight")
            self._stop_all("error", "the engine failed while running this request; see the server log")
            self._wake.wait(1.0)  # if the engine is left broken, do not spin on it
            return
        new_tokens = 0
        for out in outputs:
            live = self._live.get(out.request_id)
            if live is None:  # aborted: nobody is waiting for it
                continue
            new_tokens += out.metrics.num_output_tokens - live.num_output_tokens
            live.num_output_tokens = out.metrics.num_output_tokens
            if out.finished or not live.submission.params.ranks_samples:  # best_of: only the final n are the answer
                live.submission.stream.put(self._update(live, out))
            if out.finished:
                del self._live[out.request_id]
                if self.metrics is not None:
                    self.metrics.observe_finished(out.metrics)
        if self.metrics is not None:
            self.metrics.engine_steps.inc()
            self.metrics.generation_tokens.inc(new_tokens)
        self._publish_stats(steps_done=1)

    def _update(self, live: _Live, out: RequestOutput) -> Update:
        stops = live.submission.params.stop
        choices = []
        for i, completion in enumerate(out.outputs):  # i: the choice (best_of's samples keep their own .index)
            if live.done[i]:
                continue
            finished = completion.finish_reason is not None
            text = completion.text
            end = len(text) if finished else len(text) - held_back_length(text, stops)
            end = max(end, live.sent_chars[i])
            new_ids = completion.token_ids[live.sent_tokens[i]:]
            if end == live.sent_chars[i] and not new_ids and not finished:
                continue
            choices.append(ChoiceDelta(i, text[live.sent_chars[i]:end], new_ids,
                                       self._new_logprobs(completion, live.sent_tokens[i]), completion.finish_reason))
            live.sent_chars[i], live.sent_tokens[i], live.done[i] = end, len(completion.token_ids), finished
        return Update(choices, out.finished, live.num_prompt_tokens, out.metrics.num_output_tokens, out.metrics)

    def _new_logprobs(self, completion: CompletionOutput, start: int) -> list[TokenLogprob] | None:
        if completion.logprobs is None:
            return None
        entries = []
        for token_id, (logprob, top) in zip(completion.token_ids[start:], completion.logprobs[start:]):
            ranked = sorted(top.items(), key=lambda item: -item[1])
            entries.append(TokenLogprob(self._text_of(token_id), logprob,
                                        [(self._text_of(t), lp) for t, lp in ranked]))
        return entries

    def _text_of(self, token_id: int) -> str:
        if token_id not in self._token_text:
            tokenizer = self.engine.tokenizer
            text = tokenizer.decode([token_id], skip_special_tokens=False) if tokenizer.available else str(token_id)
            self._token_text[token_id] = text
        return self._token_text[token_id]

    def _stop_all(self, reason: str, message: str) -> None:
        for request_id, live in list(self._live.items()):
            try:
                self.engine.abort(request_id)
            except Exception:  # after a failed step the engine's books may be broken; the request still ends
                logger.exception("could not abort %s", request_id)
            live.submission.stream.put(Stopped(reason, message))
        self._live.clear()
        self._publish_stats()

    def _publish_stats(self, steps_done: int = 0) -> None:
        scheduler, kv = self.engine.scheduler, self.engine.kv_manager
        self.stats = EngineStats(
            num_requests=len(self._live),
            num_running=len({s.request_id for s in scheduler.running}),
            num_waiting=len({s.request_id for s in scheduler.waiting}),
            kv_blocks_in_use=kv.num_blocks - kv.num_free_blocks,
            kv_blocks_total=kv.num_blocks,
            num_steps=self.stats.num_steps + steps_done,
        )
        if self.metrics is not None:
            self.metrics.set_engine_stats(self.stats)
