"""`python -m reference --help`, and a bad flag, are answered without importing torch (which takes seconds), and
`import reference` imports neither torch nor triton until an engine name is used."""

from __future__ import annotations

import subprocess
import sys

import pytest

# Runs the CLI as `python -m reference ARGS` would, then reports which heavy modules it imported.
PROBE = """
import runpy, sys
sys.argv = ["reference", *sys.argv[1:]]
try:
    runpy.run_module("reference", run_name="__main__", alter_sys=True)
except SystemExit as exit:
    code = exit.code
print("exit", code, "torch" in sys.modules, "triton" in sys.modules, "transformers" in sys.modules)
"""


def run_cli(*args: str) -> tuple[str, str]:
    done = subprocess.run([sys.executable, "-c", PROBE, *args], capture_output=True, text=True, timeout=120)
    return done.stdout.strip().splitlines()[-1], done.stdout + done.stderr


@pytest.mark.parametrize("args,code", [
    (["--help"], 0),
    (["bench", "--help"], 0),
    (["generate", "hi", "--max-tokens", "many"], 2),  # argparse refuses the value
    (["generate", "hi", "--kv-cache", "nope"], 2),
    (["serve", "--max-num-seqs", "0"], 2),  # EngineConfig refuses it, before any engine is built
    (["generate", "hi", "--block-size", "12"], 2),
])
def test_help_and_flag_errors_import_no_torch(args, code):
    last_line, output = run_cli(*args)
    assert last_line == f"exit {code} False False False", output


def test_bad_engine_value_is_one_clear_line():
    _, output = run_cli("generate", "hi", "--max-num-seqs", "0")
    assert "error: max_num_seqs must be a positive integer or None, got 0" in output
    assert "Traceback" not in output


def test_import_reference_is_lazy_and_names_still_import():
    code = ("import sys, reference; before = 'torch' in sys.modules\n"
            "from reference import LLM, SamplingParams, LLMEngine, RequestOutput, CompletionOutput\n"
            "print(before, 'torch' in sys.modules, 'triton' in sys.modules, LLM.__module__, "
            "SamplingParams.__module__)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.stdout.split() == ["False", "True", "False", "reference.llm", "reference.sampling"], done.stderr
