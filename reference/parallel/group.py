"""The ranks that share one model, and the collectives the parallel layers use."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class TensorParallel:
    """This process's place among `size` ranks. size 1: no communication at all (every collective is a no-op)."""

    rank: int = 0
    size: int = 1

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
            dist.all_reduce(x)
        return x

    def all_gather_last(self, x: torch.Tensor) -> torch.Tensor:
        """Concatenate every rank's `x` along the last dimension, in rank order."""
        if self.size == 1:
            return x
        parts = [torch.empty_like(x) for _ in range(self.size)]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts, dim=-1)

    def split(self, total: int) -> tuple[int, int]:
        """[start, end) of this rank's even share of `total` items (`total` must divide by size)."""
        if total % self.size:
            raise ValueError(f"{total} does not split evenly over {self.size} ranks")
        share = total // self.size
        return self.rank * share, (self.rank + 1) * share
