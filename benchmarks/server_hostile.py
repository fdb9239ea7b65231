"""Does one hostile request stall the other clients' streams? The longest gap between a stream's tokens, alone
and while hostile requests arrive, against a real server process.

    python benchmarks/server_hostile.py [--model smollm2] [--max-tokens 96]

It starts `python -m reference serve` on a free loopback port, streams one greedy completion alone (the
baseline), then streams it again while another client sends each hostile request in turn (a 3 MB body, a
2 MB prompt, 50,000 stop strings, JSON nested 5,000 deep, a lone surrogate, a form post). It prints each
hostile request's status and time to answer, and the stream's median and longest inter-token gap in both runs.
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


def start_server(model: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "reference", "serve", "--model", model, "--port", str(port),
                                "--max-model-len", "1024"], cwd=ROOT, stdout=subprocess.DEVNULL,
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--max-tokens", type=int, default=96)
    args = parser.parse_args()
    process, url = start_server(args.model)
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
        print(f"\n{'stream (ms between tokens)':28} {'median':>8} {'longest':>8}")
        for label, gaps in (("alone", alone), ("during hostile requests", result["gaps"])):
            print(f"{label:28} {1000 * statistics.median(gaps):>8.1f} {1000 * max(gaps):>8.1f}")
    finally:
        process.terminate()
        process.wait(60)


if __name__ == "__main__":
    main()
