"""Drawing the labs' case inputs from a case's seeded generator (parent side), so that a case's inputs depend on
its seed alone. Every random choice in the case modules goes through these few helpers."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch


def integer(generator: torch.Generator, low: int, high: int) -> int:
    """One int in [low, high), uniformly."""
    return int(torch.randint(low, high, (1,), generator=generator))


def choice(generator: torch.Generator, options: Sequence[Any]) -> Any:
    """One of `options`, uniformly."""
    return options[integer(generator, 0, len(options))]


def calls(*calls: dict[str, Any]) -> dict[str, Any]:
    """The inputs of a case that is a list of calls (each a dict of keyword arguments)."""
    return {"calls": list(calls)}


def random_calls(count: int, make_call: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """A case of `count` calls, each made by make_call() (which draws from the case's generator)."""
    return calls(*(make_call() for _ in range(count)))
