"""The ranks that share one model, and the collectives the parallel layers use (timed when a CollectiveTimer is
installed: benchmarks/tensor_parallel.py measures the share of a step spent in them)."""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.distributed as dist


class CollectiveTimer:
    """Seconds and calls this process spends in each kind of collective, waiting for the other ranks included.
    On a GPU the timer synchronizes before and after each collective (NCCL runs asynchronously), which costs a
    little speed: install it to measure, not in production."""

    def __init__(self) -> None:
        self.seconds = {"all_reduce": 0.0, "all_gather": 0.0}
        self.calls = {"all_reduce": 0, "all_gather": 0}

    @contextmanager
    def timing(self, kind: str, x: torch.Tensor):
        if x.is_cuda:
            torch.cuda.synchronize(x.device)
        start = time.perf_counter()
        yield
        if x.is_cuda:
            torch.cuda.synchronize(x.device)
        self.seconds[kind] += time.perf_counter() - start
        self.calls[kind] += 1


@dataclass(frozen=True)
class TensorParallel:
    """This process's place among `size` ranks. size 1: no communication at all (every collective is a no-op)."""

    rank: int = 0
    size: int = 1
    timer: ClassVar[CollectiveTimer | None] = None  # set TensorParallel.timer to time this process's collectives

    def __post_init__(self) -> None:
        if self.size < 1 or not 0 <= self.rank < self.size:
            raise ValueError(f"rank {self.rank} is not one of {self.size} ranks")

    @classmethod
    def from_default_group(cls) -> TensorParallel:
        """The world of torch.distributed's default process group (init_process_group must have run)."""
        return cls(dist.get_rank(), dist.get_world_size())

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum `x` over the ranks, in place; every rank gets the sum."""
        if self.size > 1:
            with self._timed("all_reduce", x):
                dist.all_reduce(x)
        return x

    def all_gather_last(self, x: torch.Tensor) -> torch.Tensor:
        """Concatenate every rank's `x` along the last dimension, in rank order."""
        if self.size == 1:
            return x
        parts = [torch.empty_like(x) for _ in range(self.size)]
        with self._timed("all_gather", x):
            dist.all_gather(parts, x.contiguous())
        return torch.cat(parts, dim=-1)

    def split(self, total: int) -> tuple[int, int]:
        """[start, end) of this rank's even share of `total` items (`total` must divide by size)."""
        if total % self.size:
            raise ValueError(f"{total} does not split evenly over {self.size} ranks")
        share = total // self.size
        return self.rank * share, (self.rank + 1) * share

    @contextmanager
    def _timed(self, kind: str, x: torch.Tensor):
        if TensorParallel.timer is None:
            yield
        else:
            with TensorParallel.timer.timing(kind, x):
                yield
