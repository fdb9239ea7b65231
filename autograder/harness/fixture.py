"""The fixture lab's preamble, references and driver (see autograder/labs/fixture.py for its cases)."""

from __future__ import annotations

from typing import Any

import torch

PREAMBLE = "import torch\n"


def ref_add(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return a + b


class ReferenceCounter:
    def __init__(self, start: int) -> None:
        self.total = start

    def increment(self, by: int) -> int:
        if by < 0:
            raise ValueError("by must be >= 0")
        self.total += by
        return self.total


def drive_counter(cls: type, inputs: dict[str, Any]) -> list[Any]:
    counter = cls(inputs["start"])
    trace: list[Any] = []
    for by in inputs["steps"]:
        try:
            trace.append(counter.increment(by))
        except NotImplementedError:
            raise
        except Exception as exc:
            trace.append({"error": f"{type(exc).__name__}: {exc}"})
    return trace
