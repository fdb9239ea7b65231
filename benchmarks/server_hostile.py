"""Does one hostile request stall the other clients' streams? The longest gap between a stream's tokens, alone
and while hostile requests arrive, against a real server process.

    python benchmarks/server_hostile.py [--model smollm2] [--max-tokens 96]

It starts `python -m reference serve` on a free loopback port, streams one greedy completion alone (the
baseline), then streams it again while another client sends each hostile request in turn (a 3 MB body, a
2 MB prompt, 50,000 stop strings, JSON nested 5,000 deep, a lone surrogate, a form post), then once more while
an honest but long prompt (--long-prompt tokens) arrives, whose prefill competes with the stream's decode
steps for the step's token budget (--max-num-batched-tokens). It prints each hostile request's status and time
to answer, the long prompt's time to first token, and the stream's median and longest inter-token gap.
Wall-clock figures: run it on a quiet machine, and compare the two runs of one call, not across machines.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
JSON = {"Content-Type": "application/json"}
HOSTILE = [
    ("3 MB body", b'{"prompt": "' + b"x" * (3 << 20) + b'"}', JSON),
    ("2 MB prompt", json.dumps({"prompt": "word " * 400_000}).encode(), JSON),
    ("50,000 stop strings", json.dumps({"prompt": "x", "stop": [f"s{i}" for i in range(50_000)]}).encode(), JSON),
    ("JSON 5,000 deep", b'{"prompt": "x", "extra": ' + b"[" * 5000 + b"]" * 5000 + b"}", JSON),
    ("lone surrogate", b'{"prompt": "ok \\ud800", "max_tokens": 2}', JSON),
    ("form post", b'{"prompt": "x"}', {"Content-Type": "application/x-www-form-urlencoded"}),
]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(model: str, budget: int | None) -> tuple[subprocess.Popen, str]:
    port = free_port()
    budget_flags = [] if budget is None else ["--max-num-batched-tokens", str(budget)]
    process = subprocess.Popen([sys.executable, "-m", "reference", "serve", "--model", model, "--port", str(port),
                                "--max-model-len", "2048", *budget_flags], cwd=ROOT, stdout=subprocess.DEVNULL,
                               stderr=subprocess.STDOUT, env={**os.environ, "TQDM_DISABLE": "1"})
    url = f"http://127.0.0.1:{port}"
    for _ in range(1200):
        if process.poll() is not None:
            sys.exit(f"the server exited with {process.returncode}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return process, url
        except httpx.HTTPError:
            time.sleep(0.25)
    sys.exit("the server did not start")


def stream_gaps(url: str, max_tokens: int, started: threading.Event | None = None) -> list[float]:
    """Seconds between consecutive events of one streamed greedy completion."""
    body = {"prompt": "Once upon a time", "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
            "stream": True}
    times = []
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=600) as response:
        for line in response.iter_lines():
            if line.startswith("data: "):
                times.append(time.perf_counter())
                if started is not None and len(times) == 2:
                    started.set()
    return [later - earlier for earlier, later in zip(times[1:], times[2:])]  # from the 2nd: TTFT left out


def long_prompt_beside_a_stream(url: str, max_tokens: int, prompt_tokens: int) -> list[float]:
    """The stream's gaps while a long prompt (token ids) is prefilled beside it; prints that prompt's TTFT."""
    started, result = threading.Event(), {}
    thread = threading.Thread(target=lambda: result.update(gaps=stream_gaps(url, max_tokens, started)))
    thread.start()
    started.wait(120)
    body = {"prompt": [(i * 7919) % 40000 + 100 for i in range(prompt_tokens)], "max_tokens": 1, "temperature": 0}
    begin = time.perf_counter()
    status = httpx.post(url + "/v1/completions", json=body, timeout=600).status_code
    print(f"long prompt of {prompt_tokens} tokens: status {status}, answered in {time.perf_counter() - begin:.2f} s")
    thread.join()
    return result["gaps"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--max-tokens", type=int, default=96)
    parser.add_argument("--long-prompt", type=int, default=2000, help="tokens of the honest long prompt")
    parser.add_argument("--max-num-batched-tokens", type=int, default=None, help="the server's token budget per "
                        "step (default: the engine's)")
    args = parser.parse_args()
    process, url = start_server(args.model, args.max_num_batched_tokens)
    try:
        stream_gaps(url, 8)  # warm-up
        alone = stream_gaps(url, args.max_tokens)
        started, result = threading.Event(), {}
        thread = threading.Thread(target=lambda: result.update(gaps=stream_gaps(url, args.max_tokens, started)))
        thread.start()
        started.wait(120)
        print(f"{'hostile request':22} {'status':>6} {'answered in s':>14}")
        with httpx.Client(base_url=url, timeout=600) as client:
            for name, body, headers in HOSTILE:
                begin = time.perf_counter()
                try:
                    status = str(client.post("/v1/completions", content=body, headers=headers).status_code)
                except httpx.HTTPError as error:  # a server that drops the connection
                    status = type(error).__name__
                print(f"{name:22} {status:>6} {time.perf_counter() - begin:>14.3f}")
        thread.join()
        during_long = long_prompt_beside_a_stream(url, args.max_tokens, args.long_prompt)
        print(f"\n{'stream (ms between tokens)':32} {'median':>8} {'longest':>8}")
        for label, gaps in (("alone", alone), ("during hostile requests", result["gaps"]),
                            (f"while a {args.long_prompt}-token prompt arrives", during_long)):
            print(f"{label:32} {1000 * statistics.median(gaps):>8.1f} {1000 * max(gaps):>8.1f}")
    finally:
        process.terminate()
        process.wait(60)


if __name__ == "__main__":
    main()
