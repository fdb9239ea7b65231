"""The FastAPI app: OpenAI's routes on top of an EngineThread, with the server's limits and metrics.

    GET  /health               liveness, plus what the engine holds (requests, KV blocks in use)
    GET  /metrics              Prometheus text format (see metrics.py)
    GET  /v1/models            the one model served
    POST /v1/completions       a prompt (text or token ids) -> text; stream true/false
    POST /v1/chat/completions  messages -> a reply, formatted with the model's chat template; stream true/false

A generation request: check the API key -> read at most --max-request-bytes of a JSON body -> validate it (types:
pydantic; values: SamplingParams) -> check the model name -> tokenize the prompt on a worker thread (prompts.py)
-> check the queue limit -> submit to the engine thread -> wait for Accepted or Rejected (the context length
check happens there) -> collect the Update deltas into one response, or send each as a server-sent event
(`data: {json}\\n\\n`, ending with `data: [DONE]\\n\\n`). A client that goes away, or a request that outlives
--request-timeout, is aborted in the engine, which frees its KV blocks before the next step.

Every error has OpenAI's shape, {"error": {"message", "type", "param", "code"}}; an unexpected one says only
"internal server error" (the log has the rest). This module must not touch the engine: only the engine thread does.
/health and /metrics stay open when --api-key is set (for load balancers and Prometheus): bind to a private
address if what they show (request counts, KV usage) must stay private.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import TypeVar

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..engine import LLMEngine
from . import MAX_REQUEST_BYTES
from .engine_thread import Accepted, EngineThread, Event, Rejected, RequestStream, Stopped, Submission, Update
from .metrics import CONTENT_TYPE, ServerMetrics
from .prompts import PromptEncoder
from .protocol import APIError, ChatCompletionRequest, ChatFormat, ChoiceState, CompletionFormat, CompletionRequest

logger = logging.getLogger("reference.server")

GENERATION_PATHS = ("/v1/completions", "/v1/chat/completions")
BodyModel = TypeVar("BodyModel", bound=BaseModel)


@dataclass
class ServerSettings:
    model_name: str  # what clients put in "model"
    api_key: str | None = None  # None: no key needed
    max_queue: int | None = None  # requests that may wait beyond the engine's max_num_seqs; None: no limit
    request_timeout: float | None = None  # seconds from arrival to the last token; None: no limit
    disconnect_poll_s: float = 0.5  # how often a non-streamed request checks that its client is still there
    max_request_bytes: int = MAX_REQUEST_BYTES  # larger bodies get 413 before they are parsed


def create_app(engine: LLMEngine, settings: ServerSettings) -> FastAPI:
    """The app; its lifespan starts the engine thread and stops it (aborting what is in flight).

    app.state.engine_thread and app.state.metrics are exposed for the CLI and tests.
    """
    for name, value in (("max_queue", settings.max_queue), ("request_timeout", settings.request_timeout)):
        if value is not None and value < 0:
            raise ValueError(f"{name} must be >= 0 or None, got {value}")
    if settings.max_request_bytes < 1:
        raise ValueError(f"max_request_bytes must be >= 1, got {settings.max_request_bytes}")
    metrics = ServerMetrics()
    engine_thread = EngineThread(engine, metrics)
    server = _Server(engine_thread, settings, metrics, engine.config.max_num_seqs, engine.config.max_model_len,
                     engine.model_config.vocab_size)
    encoder = PromptEncoder(engine.tokenizer, engine.config.max_model_len)
    server.encoder = encoder

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        engine_thread.start()
        yield
        encoder.close()
        await asyncio.to_thread(engine_thread.shutdown)

    app = FastAPI(title="nano-vLLM Labs", lifespan=lifespan)
    app.state.engine_thread = engine_thread
    app.state.metrics = metrics
    app.state.server = server
    _add_error_handlers(app, metrics)
    _add_routes(app, server)
    return app


def _add_routes(app: FastAPI, server: "_Server") -> None:
    """OpenAI's routes under /v1 (behind the API key), and /health and /metrics beside them."""
    engine_thread, settings, metrics = server.engine_thread, server.settings, server.metrics

    @app.get("/health")
    async def health() -> dict:
        stats = engine_thread.stats
        return {"status": "ok" if engine_thread.accepting else "shutting_down", "model": settings.model_name,
                "in_flight": server.in_flight, "requests_in_engine": stats.num_requests,
                "running": stats.num_running, "waiting": stats.num_waiting,
                "kv_blocks_in_use": stats.kv_blocks_in_use, "kv_blocks_total": stats.kv_blocks_total,
                "engine_steps": stats.num_steps}

    @app.get("/metrics")
    async def prometheus_metrics() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    v1 = APIRouter(prefix="/v1", dependencies=[Depends(server.check_api_key)])

    @v1.get("/models")
    async def models() -> dict:
        return {"object": "list", "data": [server.model_card()]}

    @v1.post("/completions")
    async def completions(request: Request) -> Response:
        return await server.generate(await _parse_body(request, CompletionRequest, settings), request)

    @v1.post("/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await server.generate(await _parse_body(request, ChatCompletionRequest, settings), request)

    app.include_router(v1)


def _add_error_handlers(app: FastAPI, metrics: ServerMetrics) -> None:
    def answer(request: Request, error: APIError) -> JSONResponse:
        if request.url.path in GENERATION_PATHS:
            metrics.count(error.outcome)
        return JSONResponse(error.body(), status_code=error.status)

    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError) -> JSONResponse:
        return answer(request, exc)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return answer(request, APIError(exc.status_code, str(exc.detail)))

    @app.exception_handler(Exception)
    async def server_error(request: Request, exc: Exception) -> JSONResponse:
        logger.exception("unhandled error on %s", request.url.path)
        return answer(request, APIError(500, "internal server error", type="server_error", outcome="error"))


async def _parse_body(request: Request, model: type[BodyModel], settings: ServerSettings) -> BodyModel:
    """The JSON body checked by the pydantic model; pydantic's first complaint becomes a 400 naming the field
    ("messages.0.role"), not FastAPI's 422 list.

    Only a JSON content type is taken: a web page may post a form or text/plain to a local server without the
    browser asking first, but not JSON. The body is read up to settings.max_request_bytes, then refused.
    """
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type != "application/json" and not content_type.endswith("+json"):
        raise APIError(415, f"the request body must be JSON, sent with 'Content-Type: application/json' (got "
                            f"{content_type or 'no Content-Type'}); with curl, add -H 'Content-Type: application/json'")
    raw = await _read_body(request, settings.max_request_bytes)
    try:
        data = json.loads(raw)
    except RecursionError:
        raise APIError(400, "the request body is nested too deeply to be a request") from None
    except ValueError as exc:
        raise APIError(400, f"the request body is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise APIError(400, f"the request body must be a JSON object, got {type(data).__name__}")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        param = ".".join(str(part) for part in first["loc"])
        raise APIError(400, f"invalid {param}: {first['msg']}", param=param) from None


async def _read_body(request: Request, limit: int) -> bytes:
    too_large = APIError(413, f"the request body is larger than this server takes ({limit} bytes, "
                              "--max-request-bytes): shorten the prompt")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise too_large
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_large
        chunks.append(chunk)
    return b"".join(chunks)


class _EventStream(StreamingResponse):
    """A StreamingResponse that always runs `on_close`, even if the client left before the first byte."""

    def __init__(self, content: AsyncIterator[str], on_close) -> None:
        super().__init__(content, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        self._on_close = on_close

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._on_close()


def _sse(data: dict | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data, separators=(',', ':'))}\n\n"


class _Server:
    """The handlers' shared state: settings, the engine thread, metrics, and the number of requests in flight."""

    def __init__(self, engine_thread: EngineThread, settings: ServerSettings, metrics: ServerMetrics, max_num_seqs: int,
                 max_model_len: int, vocab_size: int) -> None:
        self.engine_thread, self.settings, self.metrics = engine_thread, settings, metrics
        self.max_num_seqs, self.max_model_len, self.vocab_size = max_num_seqs, max_model_len, vocab_size
        self.in_flight = 0  # only the event loop changes it, so no lock
        self.encoder: PromptEncoder | None = None  # set by create_app
        self.created = int(time.time())

    # -- checks -----------------------------------------------------------------------------------------------
    async def check_api_key(self, request: Request) -> None:
        expected = self.settings.api_key
        if expected is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), expected.encode()):
            raise APIError(401, "invalid or missing API key: send the header 'Authorization: Bearer <key>'",
                           code="invalid_api_key", outcome="unauthorized")

    def model_card(self) -> dict:
        # max_model_len and vocab_size are extensions (the load generator draws random prompts from them).
        return {"id": self.settings.model_name, "object": "model", "created": self.created,
                "owned_by": "nano-vllm-labs", "max_model_len": self.max_model_len, "vocab_size": self.vocab_size}

    def _check_model(self, name: str | None) -> None:
        if name is not None and name != self.settings.model_name:
            raise APIError(404, f"the model {name!r} does not exist: this server serves "
                                f"{self.settings.model_name!r}", param="model", code="model_not_found")

    def _check_capacity(self) -> None:
        if not self.engine_thread.accepting:
            raise APIError(503, "the server is shutting down", type="server_error", code="shutting_down",
                           outcome="shutdown")
        max_queue = self.settings.max_queue
        if max_queue is not None and self.in_flight >= self.max_num_seqs + max_queue:
            raise APIError(429, f"the server is full: {self.in_flight} requests in flight, at most "
                                f"{self.max_num_seqs} running (max_num_seqs) + {max_queue} waiting (--max-queue); "
                                "retry later", type="rate_limit_error", code="queue_full", outcome="rejected")

    # -- a generation request ---------------------------------------------------------------------------------
    async def generate(self, body: CompletionRequest | ChatCompletionRequest, request: Request) -> Response:
        self._check_model(body.model)
        params = body.sampling_params()
        if params.num_samples > self.max_num_seqs:  # the engine would never find seats for all samples at once
            name = "best_of" if params.ranks_samples else "n"
            raise APIError(400, f"invalid {name}={params.num_samples}: this server runs at most {self.max_num_seqs} "
                                f"sequences at once (max_num_seqs), so {name} must not exceed that", param=name)
        if isinstance(body, CompletionRequest):
            prompt, messages, fmt_class = body.prompt_input(), None, CompletionFormat
        else:
            prompt, messages, fmt_class = None, body.conversation(), ChatFormat
        prompt_ids = await self.encoder.encode(prompt, messages, body.prompt_param)
        self._check_capacity()

        request_id = fmt_class.id_prefix + uuid.uuid4().hex
        timeout = self.settings.request_timeout
        deadline = None if timeout is None else asyncio.get_running_loop().time() + timeout
        stream = RequestStream(asyncio.get_running_loop())
        self._enter()
        handed_over = False  # once a stream response exists, it owns ending the request
        settled = False  # the engine is done with the request (finished, or never admitted)
        try:
            self.engine_thread.submit(Submission(request_id, prompt_ids, params, body.max_tokens_given,
                                                 body.prompt_param, stream))
            # A non-streamed request watches for its client leaving; a stream learns it from Starlette.
            waiter = _Waiter(self, stream, request_id, deadline, None if body.stream else request)
            first = await waiter.next()
            settled = not isinstance(first, Accepted)
            if isinstance(first, Rejected):
                raise APIError(400, first.message, param=first.param, code=first.code)
            if isinstance(first, Stopped):
                raise _stopped_error(first)
            assert isinstance(first, Accepted), first
            fmt = self._format(fmt_class, request_id, body.return_token_ids, params.n)
            if not body.stream:
                choices, num_output_tokens = await self._collect(waiter, params.n)
                settled = True
                self.metrics.count("success")
                return JSONResponse(fmt.response(choices, first.num_prompt_tokens, num_output_tokens))
            outcome: dict[str, str] = {}
            events = self._events(waiter, fmt, body.include_usage, outcome)
            response = _EventStream(events, lambda: self._end_stream(request_id, outcome))
            handed_over = True
            return response
        finally:
            if not handed_over:
                if not settled:  # an error or a cancelled handler: do not leave the request running
                    self.engine_thread.abort(request_id)
                self._leave()

    def _format(self, fmt_class: type, request_id: str, return_token_ids: bool, n: int):
        """The response format of this request: chat or completion objects, created now."""
        created = int(time.time())
        if fmt_class is ChatFormat:
            return ChatFormat(request_id, created, self.settings.model_name, return_token_ids, n)
        return CompletionFormat(request_id, created, self.settings.model_name, return_token_ids)

    def _enter(self) -> None:
        self.in_flight += 1
        self.metrics.in_flight.set(self.in_flight)

    def _leave(self) -> None:
        self.in_flight -= 1
        self.metrics.in_flight.set(self.in_flight)

    async def _collect(self, waiter: _Waiter, n: int) -> tuple[list[ChoiceState], int]:
        """The n choices of a non-streamed request and the tokens generated for it (all samples of best_of)."""
        choices = [ChoiceState() for _ in range(n)]
        while True:
            event = await waiter.next()
            if isinstance(event, Stopped):
                raise _stopped_error(event)
            assert isinstance(event, Update), event
            for delta in event.choices:
                choices[delta.index].add(delta)
            if event.finished:
                return choices, event.num_output_tokens

    async def _events(self, waiter: _Waiter, fmt: CompletionFormat, include_usage: bool,
                      outcome: dict[str, str]) -> AsyncIterator[str]:
        """The server-sent events of one request; sets outcome["outcome"] once it knows how the request ended."""
        for chunk in fmt.opening_chunks():
            yield _sse(chunk)
        while True:
            try:
                event = await waiter.next()
            except APIError as error:  # the timeout: the status line is long gone, so the error is an event
                outcome["outcome"] = error.outcome
                yield _sse(error.body())
                break
            if isinstance(event, Stopped):
                error = _stopped_error(event)
                outcome["outcome"] = error.outcome
                yield _sse(error.body())
                break
            assert isinstance(event, Update), event
            for delta in event.choices:
                yield _sse(fmt.chunk(delta))
            if event.finished:
                outcome["outcome"] = "success"
                if include_usage:
                    yield _sse(fmt.usage_chunk(event.num_prompt_tokens, event.num_output_tokens))
                break
        yield _sse("[DONE]")

    def _end_stream(self, request_id: str, outcome: dict[str, str]) -> None:
        """Runs when a streamed response ends for any reason; no outcome yet means the client went away."""
        if "outcome" not in outcome:
            self.engine_thread.abort(request_id)
            outcome["outcome"] = "aborted"
        self.metrics.count(outcome["outcome"])
        self._leave()


class _Waiter:
    """Hands out one request's events, enforcing its deadline and, given `request`, noticing a client that left.

    Either ends the request in the engine (abort) and raises APIError: 408 past the deadline, or "aborted" (499,
    which nobody receives) when the client closed the connection. Events keep coming every step, so the client
    check runs on a clock, not when the queue is idle.
    """

    def __init__(self, server: _Server, stream: RequestStream, request_id: str, deadline: float | None,
                 request: Request | None) -> None:
        self.server, self.stream, self.request_id, self.deadline, self.request = (
            server, stream, request_id, deadline, request)
        self.next_check = 0.0

    async def next(self) -> Event:
        clock = asyncio.get_running_loop()
        poll = self.server.settings.disconnect_poll_s
        while True:
            now = clock.time()
            if self.request is not None and now >= self.next_check:
                self.next_check = now + poll
                if await self.request.is_disconnected():
                    self.server.engine_thread.abort(self.request_id)
                    raise APIError(499, "the client closed the connection", outcome="aborted")
            waits = [t - now for t in (self.deadline, self.next_check if self.request else None) if t is not None]
            try:
                return await self.stream.get(max(min(waits), 0.0) if waits else None)
            except asyncio.TimeoutError:
                pass
            if self.deadline is not None and clock.time() >= self.deadline:
                self.server.engine_thread.abort(self.request_id)
                raise APIError(408, f"the request did not finish within {self.server.settings.request_timeout:g} s "
                                    "(--request-timeout); it was stopped", type="timeout_error", code="timeout",
                               outcome="timeout")


def _stopped_error(event: Stopped) -> APIError:
    if event.reason == "shutdown":
        return APIError(503, event.message, type="server_error", code="shutting_down", outcome="shutdown")
    return APIError(500, event.message, type="server_error", outcome="error")

