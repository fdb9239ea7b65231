"""The four parallel layers. Each holds only its rank's slice of the full matrix, and says which slice that is
(`source_range`), so that the loader can read just that part of the checkpoint.

For y = x W^T with W of shape [out, in]:
- column-parallel: each rank has some rows of W (some output features) and computes its part of y; no
  communication, the output stays split;
- row-parallel: each rank has some columns of W (some input features), takes the matching part of x (the split
  output of a column-parallel layer) and computes a partial y; one all-reduce sums the partial results;
- vocab-parallel embedding: each rank has some rows of the table; tokens outside them give zeros, and an
  all-reduce puts every token's row together;
- vocab-parallel LM head: each rank computes the logits of its vocabulary slice; an all-gather joins them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .group import TensorParallel

# (dimension of the checkpoint tensor, start, end): the part a rank loads; None: it loads the whole tensor.
SourceRange = tuple[int, int, int] | None


class ColumnParallelLinear(nn.Module):
    """Output features [start, end) of a full nn.Linear(in_features, out_features)."""

    def __init__(self, in_features: int, out_range: tuple[int, int], bias: bool) -> None:
        super().__init__()
        self.start, self.end = out_range
        self.weight = nn.Parameter(torch.empty(self.end - self.start, in_features))
        self.bias = nn.Parameter(torch.empty(self.end - self.start)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)

    def source_range(self, param: str) -> SourceRange:
        return (0, self.start, self.end)


class RowParallelLinear(nn.Module):
    """Input features [start, end) of a full nn.Linear(in_features, out_features); the outputs are summed over
    the ranks, and the bias (whole on every rank) is added once, after the sum."""

    def __init__(self, in_range: tuple[int, int], out_features: int, bias: bool, tp: TensorParallel) -> None:
        super().__init__()
        self.start, self.end = in_range
        self.tp = tp
        self.weight = nn.Parameter(torch.empty(out_features, self.end - self.start))
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.tp.all_reduce(F.linear(x, self.weight))
        return y if self.bias is None else y + self.bias

    def source_range(self, param: str) -> SourceRange:
        return (1, self.start, self.end) if param == "weight" else None


def vocab_range(vocab_size: int, tp: TensorParallel) -> tuple[int, int, int]:
    """(start, end, rows): this rank's vocabulary slice, and the rows it holds (the last rank's slice may be
    short; it is padded with zero rows so that every rank's logits have the same width for the all-gather)."""
    rows = -(-vocab_size // tp.size)
    start = tp.rank * rows
    return start, min(vocab_size, start + rows), rows


class VocabParallelEmbedding(nn.Module):
    def __init__(self, vocab_size: int, hidden_size: int, tp: TensorParallel) -> None:
        super().__init__()
        self.start, self.end, rows = vocab_range(vocab_size, tp)
        self.tp = tp
        self.weight = nn.Parameter(torch.empty(rows, hidden_size))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        local = ids - self.start
        mine = (local >= 0) & (local < self.end - self.start)
        rows = F.embedding(torch.where(mine, local, 0), self.weight)
        return self.tp.all_reduce(rows * mine.unsqueeze(-1).to(rows.dtype))

    def source_range(self, param: str) -> SourceRange:
        return (0, self.start, self.end)


class ParallelLMHead(nn.Module):
    """Logits of the whole vocabulary, each rank computing its slice's; `weight` may be the embedding's (tied)."""

    def __init__(self, vocab_size: int, hidden_size: int, tp: TensorParallel) -> None:
        super().__init__()
        self.vocab_size = vocab_size
        self.start, self.end, rows = vocab_range(vocab_size, tp)
        self.tp = tp
        self.weight = nn.Parameter(torch.empty(rows, hidden_size))

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.tp.all_gather_last(F.linear(hidden, self.weight))[..., : self.vocab_size]

    def source_range(self, param: str) -> SourceRange:
        return (0, self.start, self.end)
