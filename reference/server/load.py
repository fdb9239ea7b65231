"""A load generator for a running server: Poisson arrivals, streamed replies, latency percentiles and throughput.

    python -m reference bench --serve http://127.0.0.1:8000 --num-requests 64 --rate 2 --input-len 32:128 ...

What it measures. Each request is sent at its arrival time (exponential gaps with mean 1/rate seconds, or all at
once for rate inf) as a streamed completion, and timed on the client from that scheduled arrival, so a client
that falls behind shows up as latency:
- TTFT: arrival to the first chunk that carries a generated token;
- TPOT: (last token - first token) / (output tokens - 1), per request;
- ITL: the gap between two consecutive chunks of one stream that carry tokens (every gap of every stream), the
  stall a reader of the stream sees;
- end-to-end: arrival to the end of the stream;
- throughput: output (and prompt + output) tokens, and requests, per second of wall time from the first arrival
  to the last finish. Tokens are counted from the chunks' `token_ids` (the `return_token_ids` extension) and
  checked against the stream's usage.

The workload is the offline bench's (`reference.bench.make_workload`): the same seed gives the same lengths,
prompt token ids and arrival times, so `bench` and `bench --serve` runs are comparable. Random prompts are drawn
from the vocabulary the server reports in /v1/models; `real` prompts are the offline bench's questions, sent as
chat messages. One short warm-up request runs before the clock starts.

`--long-prompt N` adds one honest but long request (N fresh random prompt tokens, 1 output token) once the first
request has streamed LONG_PROMPT_AFTER tokens, so the others are decoding when it arrives. Its prefill competes
with their decode steps for each step's token budget (`--max-num-batched-tokens` on the server): the report gives
its time to first token and the longest gap of the other streams while it was being prefilled, beside their
median gap.

This module is a client: it speaks HTTP (httpx) and never imports the engine.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from ..workload import REAL_QUESTIONS, check_fits, make_workload, workload_options
from ..flags import engine_options, flag
from ..metrics import Summary, percentile


@dataclass
class PlannedRequest:
    path: str  # "/v1/completions" or "/v1/chat/completions"
    body: dict
    arrival: float  # seconds after the start
    max_tokens: int


@dataclass
class RequestRecord:
    """What one request did, timed on the client (seconds; None where it never got that far)."""

    ok: bool
    prompt_tokens: int = 0
    output_tokens: int = 0
    ttft: float | None = None
    e2e: float | None = None
    decode_time: float | None = None  # first token to last token
    error: str | None = None
    token_times: list[float] = field(default_factory=list)  # perf_counter() of each chunk that carried tokens

    @property
    def gaps(self) -> list[tuple[float, float]]:
        """(start, end) of each wait between two chunks with tokens."""
        return list(zip(self.token_times, self.token_times[1:]))

    @property
    def tpot(self) -> float | None:
        if self.decode_time is None or self.output_tokens < 2:
            return None
        return self.decode_time / (self.output_tokens - 1)


@dataclass
class ServeBenchResult:
    url: str
    model: str
    description: str
    records: list[RequestRecord]
    wall_time: float
    long_prompt: "LongPromptProbe | None" = None
    summary: Summary = field(init=False)

    def __post_init__(self) -> None:
        done = [r for r in self.records if r.ok]
        series = {"TTFT": [r.ttft for r in done if r.ttft is not None],
                  "TPOT": [r.tpot for r in done if r.tpot is not None],
                  "ITL": [end - start for r in done for start, end in r.gaps],
                  "end-to-end": [r.e2e for r in done if r.e2e is not None]}
        latencies = {name: {"mean": sum(v) / len(v) if v else math.nan,
                            **{f"p{q}": percentile(v, q) for q in (50, 90, 99)}} for name, v in series.items()}
        self.summary = Summary(num_requests=len(done), wall_time=self.wall_time,
                               prompt_tokens=sum(r.prompt_tokens for r in done),
                               output_tokens=sum(r.output_tokens for r in done), latencies=latencies)

    @property
    def failures(self) -> list[RequestRecord]:
        return [r for r in self.records if not r.ok]

    def table(self) -> str:
        lines = [f"server {self.url}, model {self.model}", f"workload: {self.description}",
                 f"completed {self.summary.num_requests} of {len(self.records)} requests"
                 + (f"; first failure: {self.failures[0].error}" if self.failures else ""),
                 self.summary.table()]
        if self.long_prompt is not None:
            lines.append(self.long_prompt.line(self.summary.latencies["ITL"]["p50"]))
        return "\n".join(lines)

    def as_dict(self) -> dict:
        s = self.summary
        return {"url": self.url, "model": self.model, "workload": self.description,
                "num_requests": len(self.records), "num_failed": len(self.failures), "wall_time_s": s.wall_time,
                "prompt_tokens": s.prompt_tokens, "output_tokens": s.output_tokens,
                "output_tokens_per_s": s.output_throughput, "total_tokens_per_s": s.total_throughput,
                "requests_per_s": s.num_requests / s.wall_time, "latency_s": s.latencies,
                "long_prompt": None if self.long_prompt is None else self.long_prompt.as_dict()}


LONG_PROMPT_AFTER = 8  # tokens the first request streams before the long prompt is sent


@dataclass
class LongPromptProbe:
    """One long prompt sent while the workload's streams decode, and what the other streams saw meanwhile."""

    prompt_tokens: int
    record: RequestRecord  # its ttft counts from sent_at
    sent_at: float  # perf_counter() when it was sent
    longest_gap: float  # the others' longest gap that overlaps [sent_at, its first token]; nan if none did

    @classmethod
    def measure(cls, prompt_tokens: int, record: RequestRecord, sent_at: float,
                others: list[RequestRecord]) -> "LongPromptProbe":
        end = sent_at + record.ttft if record.ttft is not None else math.inf
        overlapping = [b - a for r in others for a, b in r.gaps if a < end and b > sent_at]
        return cls(prompt_tokens, record, sent_at, max(overlapping, default=math.nan))

    def line(self, median_gap: float) -> str:
        if not self.record.ok:
            return f"long prompt ({self.prompt_tokens} tokens) failed: {self.record.error}"
        return (f"long prompt ({self.prompt_tokens} tokens): first token after {self.record.ttft * 1000:.0f} ms; "
                f"longest gap of the other streams meanwhile {self.longest_gap * 1000:.0f} ms "
                f"(their median gap {median_gap * 1000:.0f} ms)")

    def as_dict(self) -> dict:
        return {"prompt_tokens": self.prompt_tokens, "server_prompt_tokens": self.record.prompt_tokens,
                "ok": self.record.ok, "error": self.record.error,
                "ttft_s": self.record.ttft, "longest_gap_of_others_s": self.longest_gap}


# -- the workload -------------------------------------------------------------------------------------------------
def plan_requests(
    model: str,
    num_requests: int,
    input_len: tuple[int, int],
    output_len: tuple[int, int],
    *,
    prompts: str,
    vocab_size: int,
    max_model_len: int,
    rate: float,
    ignore_eos: bool,
    temperature: float,
    seed: int,
) -> tuple[list[PlannedRequest], str]:
    """The requests to send and a one-line description. Random prompts: the offline bench's workload exactly."""
    stream = {"stream": True, "stream_options": {"include_usage": True}, "return_token_ids": True}
    common = {"model": model, "temperature": temperature, "ignore_eos": ignore_eos, **stream}
    if prompts == "random":
        workload = make_workload(num_requests, input_len, output_len, prompts="random", vocab_size=vocab_size,
                                 rate=rate, ignore_eos=ignore_eos, temperature=temperature, seed=seed)
        check_fits(workload, max_model_len)
        planned = []
        for i, (ids, out_len, arrival) in enumerate(zip(workload.prompt_token_ids, workload.output_lens,
                                                        workload.arrival_times)):
            body = {**common, "prompt": ids, "max_tokens": out_len, "seed": workload.sampling_params(i).seed}
            planned.append(PlannedRequest("/v1/completions", body, arrival, out_len))
        return planned, workload.describe()
    if prompts != "real":
        raise ValueError(f"prompts={prompts!r} is unknown; choose 'random' or 'real'")
    # The offline bench chat-templates these questions itself; here the server does, so only lengths and
    # arrivals are drawn (same draw order: output lengths, then arrivals).
    rng = random.Random(seed)
    output_lens = [rng.randint(*output_len) for _ in range(num_requests)]
    arrivals, clock = [], 0.0
    for _ in range(num_requests):
        arrivals.append(clock)
        if not math.isinf(rate):
            clock += rng.expovariate(rate)
    planned = []
    for i, (out_len, arrival) in enumerate(zip(output_lens, arrivals)):
        question = REAL_QUESTIONS[i % len(REAL_QUESTIONS)]
        body = {**common, "messages": [{"role": "user", "content": question}], "max_tokens": out_len,
                "seed": None if temperature == 0 else seed + i}
        planned.append(PlannedRequest("/v1/chat/completions", body, arrival, out_len))
    span = f"{output_len[0]}" if output_len[0] == output_len[1] else f"uniform {output_len[0]}-{output_len[1]}"
    arrivals_text = "all at once" if math.isinf(rate) else f"Poisson arrivals at {rate:g} req/s"
    description = (f"{num_requests} requests, built-in chat questions, output {span} tokens "
                   f"({'ignore EOS' if ignore_eos else 'stop at EOS'}), {arrivals_text}, "
                   f"{'greedy' if temperature == 0 else f'temperature {temperature:g}'}, seed {seed}")
    return planned, description


# -- sending ------------------------------------------------------------------------------------------------------
async def _send(client: httpx.AsyncClient, request: PlannedRequest, arrival_clock: float,
                on_tokens=None) -> RequestRecord:
    """Stream one request; times count from arrival_clock (time.perf_counter() of its scheduled arrival).

    on_tokens(tokens so far) is called after each chunk that carries tokens.
    """
    record = RequestRecord(ok=False)
    first_token = last_token = None
    usage = None
    try:
        async with client.stream("POST", request.path, json=request.body) as response:
            if response.status_code != 200:
                body = (await response.aread()).decode(errors="replace")
                record.error = f"HTTP {response.status_code}: {body[:200]}"
                return record
            async for line in response.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[len("data: "):]
                if data == "[DONE]":
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    record.error = chunk["error"].get("message", str(chunk["error"]))
                    return record
                usage = chunk.get("usage") or usage
                new_tokens = sum(_tokens_in(choice) for choice in chunk.get("choices", []))
                if new_tokens:
                    now = time.perf_counter()
                    first_token = first_token or now
                    last_token = now
                    record.output_tokens += new_tokens
                    record.token_times.append(now)
                    if on_tokens is not None:
                        on_tokens(record.output_tokens)
    except httpx.HTTPError as exc:
        record.error = f"{type(exc).__name__}: {exc}"
        return record
    end = time.perf_counter()
    if usage is not None:
        record.prompt_tokens = usage["prompt_tokens"]
        record.output_tokens = usage["completion_tokens"]  # the server's count wins over ours
    record.ok = True
    record.e2e = end - arrival_clock
    if first_token is not None:
        record.ttft = first_token - arrival_clock
        record.decode_time = last_token - first_token
    return record


def _tokens_in(choice: dict) -> int:
    """Tokens a streamed choice carries: its token_ids (our extension), else 1 if it has any text."""
    if "token_ids" in choice:
        return len(choice["token_ids"] or [])
    text = choice.get("text") or (choice.get("delta") or {}).get("content")
    return 1 if text else 0


async def _run(url: str, planned: list[PlannedRequest], headers: dict, timeout: float, progress: bool,
               long_prompt: PlannedRequest | None = None) -> tuple[list[RequestRecord], float, tuple | None]:
    """Send the planned requests at their arrival times (and the long prompt, if any, once the first request has
    streamed LONG_PROMPT_AFTER tokens). Returns the records, the wall time and (long prompt's record, sent_at)."""
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=timeout, limits=limits) as client:
        warm_up = dict(planned[0].body, max_tokens=2, stream=False)
        warm_up.pop("stream_options", None)
        response = await client.post(planned[0].path, json=warm_up)
        if response.status_code != 200:
            raise ValueError(f"the warm-up request failed with HTTP {response.status_code}: {response.text[:300]}")
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(planned), desc="Requests", unit="req", dynamic_ncols=True)
        first_is_decoding = asyncio.Event()

        def watch_first(tokens: int) -> None:
            if tokens >= LONG_PROMPT_AFTER:
                first_is_decoding.set()

        async def timed(request: PlannedRequest, arrival_clock: float, on_tokens=None) -> RequestRecord:
            record = await _send(client, request, arrival_clock, on_tokens)
            first_is_decoding.set()  # a first request shorter than LONG_PROMPT_AFTER must not hold the probe back
            if bar is not None:
                bar.update(1)
            return record

        async def probe() -> tuple[RequestRecord, float]:
            await first_is_decoding.wait()
            sent_at = time.perf_counter()
            return await _send(client, long_prompt, sent_at), sent_at

        start = time.perf_counter()
        tasks, probe_task = [], None if long_prompt is None else asyncio.create_task(probe())
        for i, request in enumerate(planned):
            delay = start + request.arrival - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            watcher = watch_first if i == 0 else None
            tasks.append(asyncio.create_task(timed(request, start + request.arrival, watcher)))
        records = await asyncio.gather(*tasks)
        wall_time = time.perf_counter() - start
        probed = None if probe_task is None else await probe_task
        if bar is not None:
            bar.close()
    return list(records), wall_time, probed


def plan_long_prompt(model: str, prompt_tokens: int, vocab_size: int, max_model_len: float,
                     seed: int) -> PlannedRequest:
    """A streamed greedy completion of `prompt_tokens` fresh random ids and one output token."""
    if prompt_tokens < 1:
        raise ValueError(f"--long-prompt must be a positive number of tokens, got {prompt_tokens}")
    if prompt_tokens + 1 > max_model_len:
        raise ValueError(f"--long-prompt {prompt_tokens} does not fit the server's max_model_len ({max_model_len}) "
                         "with its one output token; choose at most max_model_len - 1")
    rng = random.Random(seed + 7919)  # not the workload's stream: a prompt no prefix cache has seen
    ids = [rng.randrange(vocab_size) for _ in range(prompt_tokens)]
    body = {"model": model, "prompt": ids, "max_tokens": 1, "temperature": 0.0, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}, "return_token_ids": True}
    return PlannedRequest("/v1/completions", body, math.nan, 1)


def fetch_model_card(url: str, model: str | None = None, api_key: str | None = None) -> dict:
    """The server's /v1/models entry for `model` (None: its first model)."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        response = httpx.get(f"{url}/v1/models", headers=headers, timeout=30)
    except httpx.HTTPError as exc:
        raise ValueError(f"cannot reach a server at {url}: {exc}") from None
    if response.status_code != 200:
        raise ValueError(f"{url}/v1/models answered HTTP {response.status_code}: {response.text[:300]}")
    cards = response.json()["data"]
    for card in cards:
        if model is None or card["id"] == model:
            return card
    raise ValueError(f"the server at {url} serves {[c['id'] for c in cards]}, not {model!r}")


def run_serve_bench(
    url: str,
    num_requests: int = 32,
    rate: float = math.inf,
    input_len: tuple[int, int] = (32, 256),
    output_len: tuple[int, int] = (16, 128),
    model: str | None = None,
    *,
    prompts: str = "random",
    ignore_eos: bool = True,
    temperature: float = 0.0,
    seed: int = 0,
    api_key: str | None = None,
    timeout: float = 600.0,
    progress: bool = False,
    long_prompt: int | None = None,
) -> ServeBenchResult:
    """Send the workload to the server at `url` (e.g. "http://127.0.0.1:8000") and time every reply.

    Lengths are inclusive (low, high) token ranges; rate is requests/s (math.inf: all at once); model None uses
    the server's first model. Random prompts need the server to report `vocab_size` in /v1/models (ours does).
    long_prompt: the length of one extra long prompt sent while the others decode (see the module docstring).
    """
    url = url.rstrip("/")
    card = fetch_model_card(url, model, api_key)
    if (prompts == "random" or long_prompt) and "vocab_size" not in card:
        raise ValueError(f"{url} does not report vocab_size in /v1/models; use prompts='real' and no long prompt")
    planned, description = plan_requests(
        card["id"], num_requests, input_len, output_len, prompts=prompts, vocab_size=card.get("vocab_size", 0),
        max_model_len=card.get("max_model_len", math.inf), rate=rate, ignore_eos=ignore_eos,
        temperature=temperature, seed=seed)
    probe_request = None if not long_prompt else plan_long_prompt(
        card["id"], long_prompt, card["vocab_size"], card.get("max_model_len", math.inf), seed)
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    records, wall_time, probed = asyncio.run(_run(url, planned, headers, timeout, progress, probe_request))
    probe = None if probed is None else LongPromptProbe.measure(long_prompt, *probed, records)
    return ServeBenchResult(url, card["id"], description, records, wall_time, probe)


# -- `python -m reference bench --serve URL` ---------------------------------------------------------------------
def add_serve_bench_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags `bench` needs on top of its own to drive a server instead of an in-process engine."""
    parser.add_argument("--serve", default=None, metavar="URL",
                        help="benchmark the server running at URL (e.g. http://127.0.0.1:8000) instead of an "
                             "in-process engine; --model names the served model")
    parser.add_argument("--api-key", default=None, help="with --serve: the server's API key")
    parser.add_argument("--long-prompt", type=int, default=None, metavar="N",
                        help="with --serve: also send one fresh N-token prompt while the others decode, and "
                             "report their longest gap while it is prefilled")


def run_serve_bench_from_args(args: argparse.Namespace) -> dict:
    """`bench --serve URL` with the offline bench's workload flags; prints the table, returns the numbers."""
    in_process = [*engine_options(args, exclude=("seed",)),
                  *(name for name in ("baseline", "hf_subsample") if getattr(args, name, None) is not None)]
    engine_flags = [flag(name) for name in in_process]
    if engine_flags:
        raise ValueError(f"{', '.join(engine_flags)} configure the in-process engine; with --serve they belong on "
                         "the server's command line")
    options = workload_options(args)
    result = run_serve_bench(
        args.serve, options["num_requests"], args.rate, options["input_len"], options["output_len"],
        args.model or "smollm2",
        prompts=options["prompts"], ignore_eos=options["ignore_eos"], temperature=args.temperature,
        seed=args.seed, api_key=getattr(args, "api_key", None), progress=True,
        long_prompt=getattr(args, "long_prompt", None))
    print(result.table())
    report = result.as_dict()
    if getattr(args, "json", None):
        Path(args.json).write_text(json.dumps(report, indent=2, default=str) + "\n")
    return report
