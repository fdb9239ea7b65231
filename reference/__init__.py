"""nano-vLLM Labs' reference engine: a small, readable LLM inference engine.

    from reference import LLM, SamplingParams
    llm = LLM("smollm2")
    print(llm.generate("What is the capital of France?", SamplingParams(temperature=0))[0].outputs[0].text)

The names below load on first use (module __getattr__), so `import reference` and `python -m reference --help`
do not import torch, which takes seconds; `from reference import LLM` imports the engine as it always did.
"""

from __future__ import annotations

import importlib
import os
import sys

# OpenMP's idle threads spin by default, waiting for the next op. On a laptop running other programs a spinning
# thread takes a core from them, and a descheduled one stalls every op: a busy 2-core VM measured steps 25x slower
# with two threads (benchmarks/RESULTS.md). Idle threads that sleep cost nothing measurable when the machine is
# quiet. OpenMP reads this once, when torch loads, so it can only be set here if torch is not loaded yet.
if "torch" not in sys.modules:
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

_EXPORTS = {"LLM": "llm", "LLMEngine": "engine", "SamplingParams": "sampling", "RequestOutput": "outputs",
            "CompletionOutput": "outputs"}

__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'reference' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
