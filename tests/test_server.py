"""The OpenAI-compatible server, run as a real process on 127.0.0.1 and called with the official openai client.

Two server processes per module (SmolLM2, float32, CPU): `server` with default limits, and `limited_server` with
an API key, max_num_seqs 2, --max-queue 1 and a 4 s request timeout. The reference is `reference.LLM` built in
this process with the same engine options, so greedy text must match it (tie rule of DESIGN.md §7 where batches
differ). What the server holds is read from its own /metrics and /health, never from timing.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
prometheus_parser = pytest.importorskip("prometheus_client.parser")

from exactness import assert_greedy_agree  # noqa: E402
from reference import LLM, SamplingParams  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
ENGINE = dict(max_model_len=512, max_num_seqs=8)
# The main server plans each step while the previous one runs (the GPU's default), so the tests below compare
# that path, through streaming, aborts and disconnects, with the in-process engine's synchronous steps.
SERVER_FLAGS = ["--max-model-len", "512", "--max-num-seqs", "8", "--async-scheduling"]
API_KEY = "test-key-123"
LIMITED_FLAGS = ["--max-model-len", "512", "--max-num-seqs", "2", "--max-queue", "1", "--request-timeout", "4",
                 "--api-key", API_KEY]
MODEL = "smollm2"
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


# -- the server process -------------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ServerProcess:
    """`python -m reference serve` on a free loopback port; its output goes to a log file."""

    def __init__(self, log_path: Path, *flags: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self._log = open(log_path, "w")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "reference", "serve", "--host", "127.0.0.1", "--port", str(self.port), *flags],
            cwd=ROOT, stdout=self._log, stderr=subprocess.STDOUT, env={**os.environ, "TQDM_DISABLE": "1"})

    def log(self) -> str:
        return self.log_path.read_text()

    def wait_ready(self, timeout: float = 300) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                pytest.fail(f"the server exited with {self.process.returncode}:\n{self.log()}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        pytest.fail(f"the server was not ready after {timeout} s:\n{self.log()}")

    def terminate(self, timeout: float = 60) -> int:
        """SIGTERM, then wait for the exit; returns the exit status."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout)
        finally:
            if self.process.poll() is None:
                self.process.kill()
            self._log.close()


@pytest.fixture(scope="module")
def llm():
    """The in-process reference, with the server's engine options (this also converts the model once)."""
    return LLM(MODEL, **ENGINE)


def _start(tmp_path_factory, name: str, *flags: str):
    server = ServerProcess(tmp_path_factory.mktemp(name) / "server.log", *flags)
    server.wait_ready()
    yield server
    status = server.terminate()
    assert status == 0, f"the server did not exit cleanly on SIGTERM ({status}):\n{server.log()}"
    assert "shut down cleanly" in server.log()


@pytest.fixture(scope="module")
def server(llm, tmp_path_factory):
    yield from _start(tmp_path_factory, "server", *SERVER_FLAGS)


@pytest.fixture(scope="module")
def limited_server(llm, tmp_path_factory):
    yield from _start(tmp_path_factory, "limited", *LIMITED_FLAGS)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=300)


def scrape(url: str) -> dict[str, float]:
    """Every sample of /metrics, parsed by prometheus-client: 'name' or 'name{label=value}' -> value."""
    text = httpx.get(url + "/metrics", timeout=30).text
    values = {}
    for family in prometheus_parser.text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
            values[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return values


def outcome(metrics: dict[str, float], name: str) -> float:
    return metrics[f"nano_vllm_requests_total{{outcome={name}}}"]


def wait_until_idle(url: str, timeout: float = 30) -> dict[str, float]:
    """/metrics once no request runs, waits or holds a KV block (the gauges update right after the last step)."""
    deadline = time.monotonic() + timeout
    while True:
        metrics = scrape(url)
        idle = (metrics["nano_vllm_kv_blocks_in_use"], metrics["nano_vllm_num_requests_running"],
                metrics["nano_vllm_num_requests_waiting"], metrics["nano_vllm_num_requests_in_flight"]) == (0, 0, 0, 0)
        if idle or time.monotonic() > deadline:
            return metrics
        time.sleep(0.1)


def greedy(max_tokens: int, **kwargs) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=max_tokens, **kwargs)


# -- fast checks of the pieces (no server) -------------------------------------------------------------------------
def test_stop_strings_are_bounded_and_a_long_list_is_not_echoed_back():
    from reference.sampling import MAX_STOP_CHARS, MAX_STOP_STRINGS

    assert SamplingParams(stop=["x"] * MAX_STOP_STRINGS).stop == ["x"] * MAX_STOP_STRINGS
    for stop in (["x"] * (MAX_STOP_STRINGS + 1), ["y" * (MAX_STOP_CHARS + 1)], [f"s{i}" for i in range(50_000)]):
        with pytest.raises(ValueError, match="at most") as error:
            SamplingParams(stop=stop)
        assert len(str(error.value)) < 300


def test_prompt_encoder_refuses_surrogates_and_hopeless_lengths_before_tokenizing(llm):
    from reference.server.prompts import PromptEncoder, longest_token_chars
    from reference.server.protocol import APIError

    tokenizer = llm.engine.tokenizer
    longest = longest_token_chars(tokenizer)
    # an independent check of the bound: no token decodes to more characters than it
    assert max(len(tokenizer.decode([i], skip_special_tokens=False)) for i in range(0, 49152, 7)) <= longest
    encoder = PromptEncoder(tokenizer, max_model_len=512)
    calls = []
    tokenizer_encode = tokenizer.encode
    try:
        tokenizer.encode = lambda text: calls.append(len(text)) or tokenizer_encode(text)
        assert asyncio.run(encoder.encode("Hello there", None, "prompt")) == tokenizer_encode("Hello there")
        with pytest.raises(APIError) as error:
            asyncio.run(encoder.encode("a" * (encoder.max_chars + 1), None, "prompt"))
        assert error.value.status == 400 and error.value.code == "context_length_exceeded"
        with pytest.raises(APIError) as error:
            asyncio.run(encoder.encode(None, [{"role": "user", "content": "ok \ud800 no"}], "messages"))
        assert error.value.param == "messages" and "surrogate" in error.value.message and "character 3" in error.value.message
        assert calls == [len("Hello there")]  # the refused prompts were never tokenized
        assert asyncio.run(encoder.encode([5, 6, 7], None, "prompt")) == [5, 6, 7]
    finally:
        tokenizer.encode = tokenizer_encode
        encoder.close()


def test_held_back_text_is_the_longest_tail_that_could_start_a_stop_string():
    from reference.server.engine_thread import held_back_length

    assert held_back_length("Hello, W", ["World"]) == 1
    assert held_back_length("Hello, Wor", ["World", "or"]) == 3
    assert held_back_length("Hello", ["World"]) == 0
    assert held_back_length("abc", []) == 0
    assert held_back_length("xx", ["xxxx"]) == 2


def test_sampling_errors_name_the_api_field():
    from reference.server.protocol import APIError, ChatCompletionRequest

    body = ChatCompletionRequest.model_validate({"messages": QUESTION, "max_completion_tokens": 0})
    with pytest.raises(APIError) as error:
        body.sampling_params()
    assert (error.value.status, error.value.param) == (400, "max_completion_tokens")
    assert "max_completion_tokens must be an integer >= 1" in error.value.message


def test_load_plan_is_the_offline_bench_workload():
    from reference.bench import make_workload
    from reference.server.load import plan_requests

    planned, _ = plan_requests(MODEL, 5, (4, 9), (2, 6), prompts="random", vocab_size=1000, max_model_len=64,
                               rate=2.0, ignore_eos=True, temperature=0.0, seed=3)
    workload = make_workload(5, (4, 9), (2, 6), vocab_size=1000, rate=2.0, seed=3)
    assert [p.body["prompt"] for p in planned] == workload.prompt_token_ids
    assert [p.max_tokens for p in planned] == workload.output_lens
    assert [p.arrival for p in planned] == workload.arrival_times



# -- the OpenAI API with the official client -------------------------------------------------------------------------
@pytest.mark.slow
def test_models_lists_the_served_model(client):
    models = client.models.list().data
    assert [m.id for m in models] == [MODEL]
    assert models[0].max_model_len == 512


@pytest.mark.slow
def test_chat_completion_equals_llm_chat(client, llm):
    expected = llm.chat([QUESTION], greedy(24), use_tqdm=False)[0]
    reply = client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=24, temperature=0)
    choice = reply.choices[0]
    assert choice.message.role == "assistant"
    assert choice.message.content == expected.outputs[0].text
    assert "Paris" in choice.message.content
    assert choice.finish_reason == expected.outputs[0].finish_reason
    assert reply.usage.prompt_tokens == len(expected.prompt_token_ids)
    assert reply.usage.completion_tokens == len(expected.outputs[0].token_ids)
    assert reply.object == "chat.completion" and reply.id.startswith("chatcmpl-")


@pytest.mark.slow
def test_streamed_chat_adds_up_to_llm_chat(client, llm):
    expected = llm.chat([QUESTION], greedy(24), use_tqdm=False)[0].outputs[0]
    chunks = list(client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=24, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert content == expected.text
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [expected.finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(expected.token_ids)
    assert len([c for c in chunks if c.choices]) > 2, "the reply came in one piece, not streamed"


@pytest.mark.slow
def test_completion_text_and_logprobs_equal_llm_generate(client, llm):
    prompt = "The three primary colors are"
    expected = llm.generate(prompt, greedy(16, logprobs=2), use_tqdm=False)[0].outputs[0]
    reply = client.completions.create(model=MODEL, prompt=prompt, max_tokens=16, temperature=0, logprobs=2)
    choice = reply.choices[0]
    assert choice.text == expected.text
    assert choice.finish_reason == expected.finish_reason
    logprobs = choice.logprobs
    assert len(logprobs.tokens) == len(expected.token_ids) == len(logprobs.top_logprobs)
    assert logprobs.tokens == [llm.tokenizer.decode([t], skip_special_tokens=False) for t in expected.token_ids]
    ours = torch.tensor(logprobs.token_logprobs)
    theirs = torch.tensor([lp for lp, _ in expected.logprobs])
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0)  # same batch of one, same arithmetic
    for top, (chosen, _) in zip(logprobs.top_logprobs, expected.logprobs):
        assert len(top) <= 2 and max(top.values()) == pytest.approx(chosen, abs=1e-4)  # greedy: chosen is the top
    assert logprobs.text_offset[0] == 0


@pytest.mark.slow
def test_streamed_completion_of_token_ids_equals_llm_generate(client, llm):
    prompt_ids = llm.tokenizer.encode("Once upon a time")
    expected = llm.generate([prompt_ids], greedy(12), use_tqdm=False)[0].outputs[0]
    stream = client.completions.create(model=MODEL, prompt=prompt_ids, max_tokens=12, temperature=0, stream=True,
                                       extra_body={"return_token_ids": True})
    chunks = list(stream)
    assert "".join(c.choices[0].text for c in chunks) == expected.text
    assert [t for c in chunks for t in c.choices[0].token_ids] == expected.token_ids
    assert chunks[-1].choices[0].finish_reason == "length"


@pytest.mark.slow
def test_n2_seeded_samples_equal_llm_generate(client, llm):
    prompt = "My favourite animal is"
    params = SamplingParams(n=2, temperature=0.9, seed=11, max_tokens=12)
    expected = [c.text for c in llm.generate(prompt, params, use_tqdm=False)[0].outputs]
    reply = client.completions.create(model=MODEL, prompt=prompt, n=2, temperature=0.9, seed=11, max_tokens=12)
    assert [c.index for c in reply.choices] == [0, 1]
    assert [c.text for c in reply.choices] == expected  # seeded tokens do not depend on the batch
    assert expected[0] != expected[1], "two samples should differ (pick another seed)"
    streamed = ["", ""]
    for chunk in client.completions.create(model=MODEL, prompt=prompt, n=2, temperature=0.9, seed=11,
                                           max_tokens=12, stream=True):
        for choice in chunk.choices:
            streamed[choice.index] += choice.text
    assert streamed == expected


@pytest.mark.slow
def test_best_of_answer_equals_llm_generate_and_bills_every_sample(client, llm):
    prompt = "My favourite animal is"
    params = SamplingParams(n=2, best_of=4, temperature=0.9, seed=11, max_tokens=12)
    expected = llm.generate(prompt, params, use_tqdm=False)[0]
    assert [c.index for c in expected.outputs] != [0, 1], "the best are the first two samples (pick another seed)"
    reply = client.completions.create(model=MODEL, prompt=prompt, n=2, best_of=4, temperature=0.9, seed=11,
                                      max_tokens=12, extra_body={"return_token_ids": True})
    assert [c.index for c in reply.choices] == [0, 1]  # the API numbers its choices; the engine's index is ours
    assert [(c.text, c.token_ids, c.finish_reason) for c in reply.choices] == [
        (c.text, c.token_ids, c.finish_reason) for c in expected.outputs]
    assert reply.usage.completion_tokens == expected.metrics.num_output_tokens > sum(
        len(c.token_ids) for c in expected.outputs), "all four samples were generated, so all are billed"
    assert reply.usage.prompt_tokens == len(expected.prompt_token_ids)


@pytest.mark.slow
def test_stop_sequence_cuts_the_text_streamed_or_not(client, llm):
    prompt = "Here is a list of fruits: apple, banana,"
    full = llm.generate(prompt, greedy(32, ignore_eos=True), use_tqdm=False)[0].outputs[0].text
    middle = len(full) // 2
    stop = full[middle:middle + 5]  # five characters from the middle, which likely span two tokens
    cut = full.find(stop)
    assert cut > 0, (full, stop)
    reply = client.completions.create(model=MODEL, prompt=prompt, max_tokens=32, temperature=0, stop=[stop],
                                      extra_body={"ignore_eos": True})
    assert reply.choices[0].text == full[:cut]
    assert reply.choices[0].finish_reason == "stop"
    chunks = list(client.completions.create(model=MODEL, prompt=prompt, max_tokens=32, temperature=0, stop=stop,
                                            stream=True, extra_body={"ignore_eos": True}))
    assert "".join(c.choices[0].text for c in chunks) == full[:cut]  # nothing of the stop string ever went out
    assert chunks[-1].choices[0].finish_reason == "stop"


@pytest.mark.slow
def test_32_concurrent_streaming_clients_all_complete_and_free_every_block(server, llm):
    prompts = [f"Fact number {i} about the ocean:" for i in range(32)]
    expected = llm.generate(prompts, greedy(16, logprobs=2, ignore_eos=True), use_tqdm=False)
    before = scrape(server.url)

    async def one(client, prompt):
        stream = await client.completions.create(model=MODEL, prompt=prompt, max_tokens=16, temperature=0,
                                                 stream=True, extra_body={"return_token_ids": True,
                                                                          "ignore_eos": True})
        text, ids, finish = "", [], None
        async for chunk in stream:
            text += chunk.choices[0].text
            ids += chunk.choices[0].token_ids
            finish = chunk.choices[0].finish_reason or finish
        return text, ids, finish

    async def all_clients():
        client = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=600)
        async with client:
            return await asyncio.gather(*(one(client, p) for p in prompts))

    results = asyncio.run(all_clients())
    assert [finish for _, _, finish in results] == ["length"] * 32
    assert [len(ids) for _, ids, _ in results] == [16] * 32

    # Batches differ from the reference's, so compare tokens under the tie rule, with the reference's top-2 logprobs.
    prompt_ids = [o.prompt_token_ids for o in expected]
    reference = [o.outputs[0].token_ids for o in expected]
    top2 = {tuple(o.prompt_token_ids): [sorted(top.values(), reverse=True) for _, top in o.outputs[0].logprobs]
            for o in expected}

    def reference_logits(token_ids: list[int]) -> torch.Tensor:
        for prompt in top2:
            if tuple(token_ids[:len(prompt)]) == prompt:
                return torch.tensor(top2[prompt][len(token_ids) - len(prompt)])
        raise AssertionError("unknown prompt")

    excused = assert_greedy_agree(prompt_ids, [ids for _, ids, _ in results], reference, reference_logits)
    if not excused:
        assert [text for text, _, _ in results] == [o.outputs[0].text for o in expected]

    after = wait_until_idle(server.url)
    assert after["nano_vllm_kv_blocks_in_use"] == 0, "a finished request still holds KV blocks"
    assert after["nano_vllm_num_requests_running"] == after["nano_vllm_num_requests_waiting"] == 0
    assert outcome(after, "success") - outcome(before, "success") == 32
    assert after["nano_vllm_generation_tokens_total"] - before["nano_vllm_generation_tokens_total"] == 32 * 16
    steps = after["nano_vllm_engine_steps_total"] - before["nano_vllm_engine_steps_total"]
    assert steps < 32 * 16 / 2, f"{steps} steps for 512 tokens: requests were not batched"
    health = httpx.get(server.url + "/health").json()
    assert (health["in_flight"], health["requests_in_engine"], health["kv_blocks_in_use"]) == (0, 0, 0)


@pytest.mark.slow
def test_client_disconnect_aborts_the_request_and_frees_its_blocks(server, llm):
    prompt_ids = llm.tokenizer.encode("The history of the printing press " * 12)  # ~ 80 tokens: several blocks
    before = scrape(server.url)
    body = {"model": MODEL, "prompt": prompt_ids, "max_tokens": 400, "ignore_eos": True, "stream": True,
            "return_token_ids": True}
    received = 0
    with httpx.Client(timeout=120) as http:
        with http.stream("POST", server.url + "/v1/completions", json=body) as response:
            assert response.status_code == 200
            for line in response.iter_lines():
                if line.startswith("data: {"):
                    received += len(json.loads(line[6:])["choices"][0]["token_ids"])
                if received >= 3:
                    during = scrape(server.url)
                    break  # closing the half-read response closes the connection: the client is gone
    closed = scrape(server.url)
    assert during["nano_vllm_kv_blocks_in_use"] >= len(prompt_ids) // 16
    assert during["nano_vllm_num_requests_running"] == 1

    deadline = time.monotonic() + 30
    while outcome(scrape(server.url), "aborted") == outcome(before, "aborted"):
        assert time.monotonic() < deadline, "the request was not aborted after its client left"
        time.sleep(0.05)
    after = wait_until_idle(server.url)
    assert after["nano_vllm_kv_blocks_in_use"] == 0
    # One token per step, so tokens made after the client left count the steps until the abort landed.
    after_close = after["nano_vllm_generation_tokens_total"] - closed["nano_vllm_generation_tokens_total"]
    assert after_close <= 5, f"{after_close} tokens were generated after the client disconnected"
    assert after["nano_vllm_generation_tokens_total"] - before["nano_vllm_generation_tokens_total"] < 400
    assert outcome(after, "success") == outcome(before, "success")
    reply = httpx.post(server.url + "/v1/completions", json={"prompt": "Hi", "max_tokens": 2}, timeout=120)
    assert reply.status_code == 200, "the server stopped serving after a disconnect"


@pytest.mark.slow
def test_client_that_gives_up_on_a_non_streamed_request_aborts_it(server):
    before = scrape(server.url)
    body = {"model": MODEL, "prompt": "Tell me a long story.", "max_tokens": 400, "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout):  # the client gives up after 1 s and closes the connection
        httpx.post(server.url + "/v1/completions", json=body, timeout=httpx.Timeout(30, read=1))
    deadline = time.monotonic() + 30
    while outcome(scrape(server.url), "aborted") == outcome(before, "aborted"):
        assert time.monotonic() < deadline, "the request was not aborted after its client left"
        time.sleep(0.05)
    after = wait_until_idle(server.url)
    assert after["nano_vllm_kv_blocks_in_use"] == 0
    assert after["nano_vllm_generation_tokens_total"] - before["nano_vllm_generation_tokens_total"] < 400


LONG_PROMPT = list(range(1000, 1600))  # 600 token ids, over max_model_len 512
JSON = {"Content-Type": "application/json"}
BAD_REQUESTS = [
    # (path, body, status, param, words the message must contain)
    ("completions", {"prompt": "x", "max_tokens": 0}, 400, "max_tokens", "max_tokens must be an integer >= 1"),
    ("completions", {"prompt": "x", "temperature": -1}, 400, "temperature", "temperature must be"),
    ("completions", {"prompt": "x", "top_p": 1.5}, 400, "top_p", "top_p must be"),
    ("completions", {"prompt": "x", "top_k": 0}, 400, "top_k", "top_k"),
    ("completions", {"prompt": "x", "n": "two"}, 400, "n", "valid integer"),
    ("completions", {"prompt": "x", "n": 9}, 400, "n", "max_num_seqs"),
    ("completions", {"prompt": "x", "stop": [""]}, 400, "stop", "non-empty"),
    ("completions", {"prompt": "x", "logprobs": 50}, 400, "logprobs", "[0, 20]"),
    ("completions", {"max_tokens": 3}, 400, "prompt", "Field required"),
    ("completions", {"prompt": [1, 2, 10**9]}, 400, "prompt", "vocabulary"),
    ("completions", {"prompt": "x", "model": "gpt-4"}, 404, "model", "'gpt-4' does not exist"),
    ("completions", {"prompt": LONG_PROMPT}, 400, "prompt", "600 tokens"),
    ("completions", {"prompt": "x", "suffix": "y"}, 400, "suffix", "not supported"),
    ("completions", {"prompt": "x", "best_of": 3, "stream": True}, 400, "best_of", "cannot be streamed"),
    ("completions", {"prompt": "x", "n": 2, "best_of": 1}, 400, "best_of", "best_of must be None or an integer >= n=2"),
    ("completions", {"prompt": "x", "best_of": 9}, 400, "best_of", "max_num_seqs"),
    ("chat/completions", {"messages": QUESTION, "tools": [{"type": "function"}]}, 400, "tools", "not supported"),
    ("chat/completions", {"messages": QUESTION, "response_format": {"type": "json_object"}}, 400,
     "response_format", "not supported"),
    ("completions", {"prompt": "x", "presence_penalty": 3}, 400, "presence_penalty", "[-2, 2]"),
    ("completions", {"prompt": "x", "logit_bias": {"a": 1}}, 400, "logit_bias", "token ids"),
    ("completions", {"prompt": "x", "logit_bias": {"999999": 1}}, 400, "prompt", "outside the vocabulary"),
    ("completions", {"prompt": LONG_PROMPT[:500], "max_tokens": 100}, 400, "max_tokens", "600 were requested"),
    ("chat/completions", {"messages": []}, 400, "messages", "empty"),
    ("chat/completions", {"messages": [{"role": "robot", "content": "hi"}]}, 400, "messages.0.role", "'user'"),
    ("chat/completions", {"messages": QUESTION, "top_logprobs": 2}, 400, "top_logprobs", "logprobs=true"),
    ("chat/completions", {"messages": [{"role": "user", "content": "word " * 600}]}, 400, "messages", "512 tokens"),
]


@pytest.mark.slow
def test_bad_requests_get_openai_errors_and_the_server_keeps_serving(server, client):
    before = scrape(server.url)
    for path, body, status, param, words in BAD_REQUESTS:
        response = httpx.post(f"{server.url}/v1/{path}", json=body, timeout=60)
        assert response.status_code == status, (body, response.text)
        error = response.json()["error"]
        assert set(error) == {"message", "type", "param", "code"}
        assert error["param"] == param and words in error["message"], (body, error)
    for body in (b"{not json", b"[1, 2]"):
        response = httpx.post(f"{server.url}/v1/completions", content=body, timeout=60, headers=JSON)
        assert response.status_code == 400 and "JSON" in response.json()["error"]["message"]
    context = httpx.post(f"{server.url}/v1/completions", json={"prompt": LONG_PROMPT}).json()["error"]
    assert context["code"] == "context_length_exceeded" and "512" in context["message"]

    # The openai client sees the same errors as its own exception types.
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="gpt-4", prompt="x")
    with pytest.raises(openai.BadRequestError) as bad:
        client.chat.completions.create(model=MODEL, messages=QUESTION, temperature=-1)
    assert "temperature" in str(bad.value)

    after = wait_until_idle(server.url)
    assert outcome(after, "invalid") - outcome(before, "invalid") == len(BAD_REQUESTS) + 2 + 1 + 2
    assert after["nano_vllm_kv_blocks_in_use"] == 0
    reply = client.completions.create(model=MODEL, prompt="Hello", max_tokens=3, temperature=0)
    assert reply.choices[0].finish_reason == "length" and reply.usage.completion_tokens == 3


@pytest.mark.slow
def test_hostile_requests_get_4xx_while_a_stream_keeps_going(server):
    """Each refused with a 4xx that says what to change, on one keep-alive connection that survives them all,
    while another client's stream runs to its end (its gaps are measured in benchmarks/server_hostile.py)."""
    hostile = [
        (b'{"prompt": "' + b"x" * (3 << 20) + b'"}', JSON, 413, "--max-request-bytes"),
        (json.dumps({"prompt": "word " * 400_000}).encode(), JSON, 400, "characters"),
        (b'{"prompt": "ok \\ud800 no", "max_tokens": 2}', JSON, 400, "surrogate"),
        (b'{"prompt": "x", "extra": ' + b"[" * 5000 + b"]" * 5000 + b"}", JSON, 400, "nested too deeply"),
        (b'{"prompt": "x", "stop": ' + json.dumps([f"s{i}" for i in range(50_000)]).encode() + b"}", JSON, 400,
         "at most 16"),
        (b'{"prompt": "x"}', {"Content-Type": "application/x-www-form-urlencoded"}, 415, "Content-Type"),
        (b'{"prompt": "x"}', {"Content-Type": "text/plain"}, 415, "application/json"),
    ]
    stream_body = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 48, "temperature": 0,
                   "ignore_eos": True, "stream": True}
    with httpx.Client(base_url=server.url, timeout=120) as other, httpx.Client(base_url=server.url, timeout=120) as me:
        with other.stream("POST", "/v1/completions", json=stream_body) as stream:
            events = stream.iter_lines()
            first = next(line for line in events if line.startswith("data: "))
            for body, headers, status, words in hostile:
                response = me.post("/v1/completions", content=body, headers=headers)
                assert response.status_code == status, (body[:80], response.text[:300])
                assert words in response.json()["error"]["message"], response.text[:300]
                assert len(response.text) < 1000
            rest = [line for line in events if line.startswith("data: ")]
        fine = me.post("/v1/completions", json={"prompt": "Hello", "max_tokens": 2, "temperature": 0})
    assert fine.status_code == 200
    assert rest[-1] == "data: [DONE]"
    tokens = sum(len(json.loads(line[6:])["choices"][0]["text"]) > 0 for line in [first, *rest[:-1]])
    assert tokens >= 1 and json.loads(rest[-2][6:])["choices"][0]["finish_reason"] == "length"
    assert wait_until_idle(server.url)["nano_vllm_kv_blocks_in_use"] == 0


@pytest.mark.slow
def test_penalties_and_logit_bias_through_the_api_equal_llm_generate(client, llm):
    options = dict(max_tokens=8, temperature=0, presence_penalty=1.0, frequency_penalty=0.5)
    reply = client.completions.create(model=MODEL, prompt="The capital of France is",
                                      extra_body={"repetition_penalty": 1.2, "min_tokens": 4}, **options)
    expected = llm.generate("The capital of France is", SamplingParams(repetition_penalty=1.2, min_tokens=4, **options),
                            use_tqdm=False)[0].outputs[0]
    assert reply.choices[0].text == expected.text
    biased = client.completions.create(model=MODEL, prompt="Hello", max_tokens=3, temperature=0,
                                       logit_bias={"28": 100}, extra_body={"return_token_ids": True})
    assert biased.choices[0].token_ids == [28, 28, 28]


@pytest.mark.slow
def test_metrics_parse_and_count_the_requests_made(server, client):
    before = scrape(server.url)
    replies = [client.completions.create(model=MODEL, prompt=f"Count to {i}:", max_tokens=5, temperature=0,
                                         extra_body={"ignore_eos": True}) for i in (3, 4)]
    chunks = list(client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=6, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    usages = [r.usage for r in replies] + [chunks[-1].usage]
    for body in ({"prompt": "x", "model": "nope"}, {"prompt": "x", "top_p": 0}):
        assert httpx.post(server.url + "/v1/completions", json=body).status_code in (400, 404)
    after = wait_until_idle(server.url)

    assert outcome(after, "success") - outcome(before, "success") == 3
    assert outcome(after, "invalid") - outcome(before, "invalid") == 2
    for name in ("aborted", "timeout", "rejected", "unauthorized", "shutdown", "error"):
        assert outcome(after, name) == outcome(before, name), name
    delta = {name: after[name] - before[name] for name in after if name in before}
    assert delta["nano_vllm_prompt_tokens_total"] == sum(u.prompt_tokens for u in usages)
    assert delta["nano_vllm_generation_tokens_total"] == sum(u.completion_tokens for u in usages)
    for histogram in ("time_to_first_token", "e2e_request_latency", "queue_time"):
        assert delta[f"nano_vllm_{histogram}_seconds_count"] == 3, histogram
        name = f"nano_vllm_{histogram}_seconds"
        assert after[f"{name}_bucket{{le=+Inf}}"] == after[f"{name}_count"]
    assert delta["nano_vllm_time_per_output_token_seconds_count"] == 3  # every request made >= 2 tokens
    assert after["nano_vllm_kv_blocks_total"] > 0

    types = {f.name: f.type for f in prometheus_parser.text_string_to_metric_families(
        httpx.get(server.url + "/metrics").text)}
    assert types["nano_vllm_requests"] == "counter" and types["nano_vllm_kv_blocks_in_use"] == "gauge"
    assert types["nano_vllm_time_to_first_token_seconds"] == "histogram"


@pytest.mark.slow
def test_load_generator_against_the_server(server, llm, capsys):
    from reference.bench import add_bench_arguments, run_bench

    parser = argparse.ArgumentParser()
    add_bench_arguments(parser)  # the `python -m reference bench` flags, --serve included
    args = parser.parse_args(["--serve", server.url, "--num-requests", "6", "--rate", "20", "--input-len", "8:32",
                              "--output-len", "4:8", "--seed", "1"])
    report = run_bench(args)
    from reference.bench import make_workload

    vocab_size = llm.engine.model_config.vocab_size
    requested = sum(make_workload(6, (8, 32), (4, 8), vocab_size=vocab_size, rate=20, seed=1).output_lens)
    assert report["num_failed"] == 0 and report["output_tokens"] == requested  # --ignore-eos is the default
    for name in ("TTFT", "TPOT", "end-to-end"):
        stats = report["latency_s"][name]
        assert 0 < stats["p50"] <= stats["p99"] and math.isfinite(stats["p99"]), name
    table = capsys.readouterr().out
    assert "Poisson arrivals at 20 req/s" in table and "| TTFT" in table and "P99" in table

    with pytest.raises(ValueError, match="--max-num-seqs"):
        run_bench(parser.parse_args(["--serve", server.url, "--max-num-seqs", "4"]))

    gaps = report["latency_s"]["ITL"]
    assert 0 < gaps["p50"] <= gaps["p99"] and math.isfinite(gaps["p99"])
    probed = run_bench(parser.parse_args(["--serve", server.url, "--num-requests", "3", "--input-len", "8",
                                          "--output-len", "24", "--long-prompt", "300"]))["long_prompt"]
    assert probed["ok"] and probed["server_prompt_tokens"] == 300  # the server counted what we sent
    assert probed["ttft_s"] > 0 and math.isfinite(probed["longest_gap_of_others_s"])
    assert "long prompt (300 tokens): first token after" in capsys.readouterr().out
    with pytest.raises(ValueError, match="--long-prompt 4096 does not fit"):
        run_bench(parser.parse_args(["--serve", server.url, "--long-prompt", "4096"]))
    with pytest.raises(ValueError, match="use it with --serve"):
        run_bench(parser.parse_args(["--long-prompt", "100"]))


def test_long_prompt_probe_takes_the_others_longest_gap_during_its_prefill():
    from reference.server.load import LongPromptProbe, RequestRecord, ServeBenchResult

    probe = RequestRecord(ok=True, ttft=2.0)  # sent at 10.0: prefilled during [10, 12]
    other = RequestRecord(ok=True, token_times=[9.0, 9.5, 10.5, 12.5, 13.0])  # gaps 0.5, 1.0, 2.0, 0.5
    quiet = RequestRecord(ok=True, token_times=[20.0, 26.0])  # a 6 s gap, but after the prefill
    assert LongPromptProbe.measure(300, probe, 10.0, [other, quiet]).longest_gap == 2.0
    waiting_before = RequestRecord(ok=True, token_times=[5.0, 10.2])  # began before the probe was sent
    assert LongPromptProbe.measure(300, probe, 10.0, [waiting_before, other]).longest_gap == pytest.approx(5.2)
    assert math.isnan(LongPromptProbe.measure(300, probe, 10.0, [quiet]).longest_gap)
    result = ServeBenchResult("url", "m", "w", [other, quiet], wall_time=1.0)
    assert result.summary.latencies["ITL"]["p50"] == 1.0  # gaps 0.5, 0.5, 1.0, 2.0, 6.0
    assert result.summary.latencies["ITL"]["mean"] == pytest.approx(10.0 / 5)


# -- the limited server: API key, queue limit, timeout, shutdown -------------------------------------------------------
@pytest.mark.slow
def test_api_key_is_required_on_v1_routes(limited_server):
    url = limited_server.url
    before = scrape(url)
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": API_KEY}):
        for method, path in (("GET", "/v1/models"), ("POST", "/v1/completions")):
            response = httpx.request(method, url + path, headers=headers, json={"prompt": "x"})
            assert response.status_code == 401, (headers, path)
            assert response.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(url + "/health").status_code == 200 and httpx.get(url + "/metrics").status_code == 200
    wrong = openai.OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        wrong.completions.create(model=MODEL, prompt="x", max_tokens=1)
    right = openai.OpenAI(base_url=url + "/v1", api_key=API_KEY, max_retries=0)
    assert right.completions.create(model=MODEL, prompt="Hi", max_tokens=2).usage.completion_tokens == 2
    assert outcome(scrape(url), "unauthorized") - outcome(before, "unauthorized") == 3 + 1  # 3 POSTs, 1 openai


@pytest.mark.slow
def test_full_queue_gets_429_and_slow_requests_time_out(limited_server):
    url, headers = limited_server.url, {"Authorization": f"Bearer {API_KEY}"}
    before = scrape(url)
    long = {"model": MODEL, "prompt": "Tell me a long story.", "max_tokens": 400, "ignore_eos": True, "stream": True}
    with httpx.Client(base_url=url, headers=headers, timeout=120) as http:
        streams = [http.stream("POST", "/v1/completions", json=long) for _ in range(3)]
        responses = [s.__enter__() for s in streams]  # headers arrive once each request is admitted
        try:
            assert [r.status_code for r in responses] == [200, 200, 200]
            full = http.post("/v1/completions", json={"prompt": "x", "max_tokens": 1})
            assert full.status_code == 429, full.text
            assert full.json()["error"]["code"] == "queue_full" and "--max-queue" in full.json()["error"]["message"]
            # max_num_seqs 2 + --max-queue 1 are in flight; each outlives the 4 s timeout and ends with an error event.
            for response in responses:
                events = [line[6:] for line in response.iter_lines() if line.startswith("data: ")]
                assert events[-1] == "[DONE]"
                assert json.loads(events[-2])["error"]["type"] == "timeout_error"
        finally:
            for stream in streams:
                stream.__exit__(None, None, None)
        slow = http.post("/v1/completions", json={**long, "stream": False})
        assert slow.status_code == 408 and "--request-timeout" in slow.json()["error"]["message"]
    after = wait_until_idle(url)
    assert outcome(after, "rejected") - outcome(before, "rejected") == 1
    assert outcome(after, "timeout") - outcome(before, "timeout") == 4
    assert after["nano_vllm_kv_blocks_in_use"] == 0


@pytest.mark.slow
def test_sigterm_mid_stream_ends_the_stream_and_exits_cleanly(limited_server):
    """Last test on limited_server: it stops the process."""
    body = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 400, "ignore_eos": True, "stream": True}
    events = []
    with httpx.Client(timeout=60, headers={"Authorization": f"Bearer {API_KEY}"}) as http:
        with http.stream("POST", limited_server.url + "/v1/completions", json=body) as response:
            for line in response.iter_lines():
                if line.startswith("data: "):
                    events.append(line[6:])
                    if len(events) == 2:
                        limited_server.process.send_signal(signal.SIGTERM)
    assert events[-1] == "[DONE]"
    assert json.loads(events[-2])["error"]["code"] == "shutting_down"
    assert limited_server.process.wait(60) == 0
    assert "shut down cleanly" in limited_server.log()
