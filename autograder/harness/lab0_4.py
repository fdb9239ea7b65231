"""Lab 0.4 (Scaling out): what runs beside learner code: the preamble, the references and the driver.

The references are thin adapters over `reference.parallel`: the slices that ColumnParallelLinear and
RowParallelLinear hold (their `source_range`, from TensorParallel.split), their forward passes with the
collective done by hand over a list of simulated ranks (the all-gather is a concatenation in rank order, the
all-reduce a sum), the head plan (`check_shardable`, `kv_head_range`) and the collective bytes per token
(`reference.parallel.cost`). Everything is bound at import time, so a grader that later hides those symbols from
learner code does not break the stand-ins. No exercise needs processes or torch.distributed: each simulates n
ranks in one process with lists of tensors. The cases are in autograder/labs/lab0_4.py.
"""

from __future__ import annotations

from typing import Any

import torch

from reference.config import ModelConfig
from reference.parallel.cost import collective_bytes_per_token as _collective_bytes_per_token
from reference.parallel.group import TensorParallel
from reference.parallel.layers import ColumnParallelLinear, RowParallelLinear
from reference.parallel.plan import check_shardable as _check_shardable
from reference.parallel.plan import kv_head_range as _kv_head_range

# Exercise cells may rely on these imports and nothing else from their notebook.
PREAMBLE = """\
import math
import torch
import torch.nn.functional as F
"""


def drive_calls(fn, inputs: dict[str, Any]) -> list[Any]:
    """One trace entry per call in inputs["calls"] (arguments in the signature's order): the result, or
    {"error": "Type: message"} when the call raised (NotImplementedError passes), so an edge case or an error is
    always checked beside an ordinary call."""
    trace = []
    for call in inputs["calls"]:
        try:
            trace.append(fn(*call.values()))
        except NotImplementedError:
            raise
        except Exception as exc:
            trace.append({"error": f"{type(exc).__name__}: {exc}"})
    return trace


def _narrow(tensor: torch.Tensor, where) -> torch.Tensor:
    dim, start, end = where
    return tensor.narrow(dim, start, end - start).clone()


# ============================================================================================================
# Notebook 1: splitting a linear layer
# ============================================================================================================


def ref_column_shard(weight: torch.Tensor, bias: torch.Tensor | None, rank: int,
                     world_size: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    tp = TensorParallel(rank, world_size)
    layer = ColumnParallelLinear(weight.shape[1], tp.split(weight.shape[0]), bias is not None)
    return (_narrow(weight, layer.source_range("weight")),
            None if bias is None else _narrow(bias, layer.source_range("bias")))


def ref_row_shard(weight: torch.Tensor, rank: int, world_size: int) -> torch.Tensor:
    tp = TensorParallel(rank, world_size)
    layer = RowParallelLinear(tp.split(weight.shape[1]), weight.shape[0], False, tp)
    return _narrow(weight, layer.source_range("weight"))


def ref_column_parallel_forward(x: torch.Tensor, weight_shards: list[torch.Tensor],
                                bias_shards: list[torch.Tensor] | None) -> torch.Tensor:
    outputs = []
    for rank, weight in enumerate(weight_shards):
        layer = ColumnParallelLinear(weight.shape[1], (0, weight.shape[0]), bias_shards is not None)
        layer.weight.data = weight
        if bias_shards is not None:
            layer.bias.data = bias_shards[rank]
        with torch.no_grad():
            outputs.append(layer(x))
    return torch.cat(outputs, dim=-1)  # the all-gather: TensorParallel.all_gather_last, in rank order


def ref_row_parallel_forward(x_shards: list[torch.Tensor], weight_shards: list[torch.Tensor],
                             bias: torch.Tensor | None) -> torch.Tensor:
    partials = []
    for x, weight in zip(x_shards, weight_shards):
        layer = RowParallelLinear((0, weight.shape[1]), weight.shape[0], False, TensorParallel())
        layer.weight.data = weight
        with torch.no_grad():
            partials.append(layer(x))
    total = torch.stack(partials).sum(dim=0)  # the all-reduce: every rank gets the sum
    return total if bias is None else total + bias  # the bias once, after the sum (RowParallelLinear.forward)


# ============================================================================================================
# Notebook 2: sharding attention
# ============================================================================================================


def ref_head_shard(num_heads: int, num_kv_heads: int, rank: int, world_size: int) -> tuple[int, int, int, int]:
    config = ModelConfig(model_type="llama", vocab_size=1, hidden_size=1, intermediate_size=world_size,
                         num_hidden_layers=1, num_attention_heads=num_heads, num_key_value_heads=num_kv_heads,
                         head_dim=1)
    tp = TensorParallel(rank, world_size)
    _check_shardable(config, world_size)
    q_start, q_end = tp.split(num_heads)
    kv_start, kv_end = _kv_head_range(config, tp)
    return q_start, q_end, kv_start, kv_end


# ============================================================================================================
# Notebook 3: communication cost
# ============================================================================================================


def ref_comm_bytes_per_token(config: dict[str, Any], tp_size: int, dtype_bytes: int) -> dict[str, int]:
    filled = {"model_type": "llama", "intermediate_size": 1, "num_attention_heads": 1, **config}
    return _collective_bytes_per_token(ModelConfig.from_hf_dict(filled), tp_size, dtype_bytes)
