"""The command line: the demo question gets Paris, and user errors are one clear line, not a traceback."""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run_cli(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "reference", *args], capture_output=True, text=True, cwd=ROOT,
                          input=stdin, timeout=600)


@pytest.mark.slow
def test_generate_answers_paris(smollm2):  # the fixture converts the model first, so the CLI loads from cache
    result = run_cli("generate", "What is the capital of France?", "--max-tokens", "24")
    assert result.returncode == 0, result.stderr
    assert "Paris" in result.stdout
    assert result.stderr.strip() == "", "start-up should be quiet"


@pytest.mark.slow
def test_chat_streams_replies_until_eof(smollm2):
    result = run_cli("chat", "--max-tokens", "24", stdin="What is the capital of France?\nThanks!\n")
    assert result.returncode == 0, result.stderr
    replies = [line for line in result.stdout.splitlines() if line.startswith("> ") and len(line) > 2]
    assert len(replies) == 2 and "Paris" in replies[0]


def test_chat_sends_the_whole_history_each_turn(monkeypatch):
    """Each turn's prompt holds every earlier user and assistant message; /reset forgets them."""
    from reference import cli

    prompts = []

    class FakeSession:
        def __init__(self, args):
            self.tokenizer = self

        def apply_chat_template(self, messages):
            return [dict(m) for m in messages]

        def stream_reply(self, prompt):
            prompts.append(prompt)
            return f"reply {len(prompts)}"

    monkeypatch.setattr(cli, "Session", FakeSession)
    monkeypatch.setattr("sys.stdin", io.StringIO("first\nsecond\n/reset\nthird\n"))
    assert cli.main(["chat", "--system", "be brief"]) == 0
    system = {"role": "system", "content": "be brief"}
    assert prompts[1] == [system, {"role": "user", "content": "first"}, {"role": "assistant", "content": "reply 1"},
                          {"role": "user", "content": "second"}]
    assert prompts[2] == [system, {"role": "user", "content": "third"}]


@pytest.mark.parametrize("args, message", [
    (["generate", "hi", "--temperature", "-1"], "temperature"),
    (["generate", "hi", "--top-p", "0"], "top_p"),
    (["generate", "hi", "--model", "/no/such/model"], "/no/such/model"),
    (["generate", "hi", "--dtype", "float8"], "dtype"),
    (["generate", "hi", "--device", "tpu"], "device"),
])
def test_user_errors_print_one_line(args, message):
    result = run_cli(*args)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], result.stderr
