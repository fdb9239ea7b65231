"""Lab 0.4 (Scaling out): its exercises and their test cases.

Every case is a list of calls (drive_calls), so an error or an edge case is always judged beside ordinary calls.
"""

from __future__ import annotations

from typing import Any

import torch

from reference.models.presets import ARCHITECTURES

from ..compare import Close, Exact, Trace
from ..harness import lab0_4 as harness
from ..spec import Case, Exercise, Lab
from . import LAB_MEMORY_MB
from .draw import calls, choice, integer, random_calls

NOTEBOOK_1 = "01_splitting_layers.ipynb"
NOTEBOOK_2 = "02_sharding_attention.ipynb"
NOTEBOOK_3 = "03_communication_cost.ipynb"
CLOSE = Close(1e-5, 1e-5)


def _every_rank(make, world_size: int) -> list[dict[str, Any]]:
    return [make(rank) for rank in range(world_size)]


def _names(label: str, world_size: int) -> tuple[str, ...]:
    return tuple(f"{label}, rank {rank} of {world_size}" for rank in range(world_size))


# ============================================================================================================
# Notebook 1: splitting a linear layer
# ============================================================================================================


def _column_calls(g: torch.Generator, out_features: int, in_features: int, world_size: int, bias: bool) -> list:
    weight = torch.randn(out_features, in_features, generator=g)
    b = torch.randn(out_features, generator=g) if bias else None
    return _every_rank(lambda rank: {"weight": weight, "bias": b, "rank": rank, "world_size": world_size},
                       world_size)


def _column_errors(g: torch.Generator) -> dict[str, Any]:
    weight, bias = torch.randn(7, 3, generator=g), torch.randn(7, generator=g)
    even = torch.randn(6, 3, generator=g)
    return calls({"weight": weight, "bias": bias, "rank": 0, "world_size": 2},
                  {"weight": even, "bias": None, "rank": 2, "world_size": 2},
                  {"weight": even, "bias": None, "rank": -1, "world_size": 2},
                  {"weight": even, "bias": None, "rank": 1, "world_size": 2})


COLUMN_SHARD = Exercise(
    name="column_shard", symbol="column_shard", notebook=NOTEBOOK_1,
    signature="column_shard(weight: Tensor, bias: Tensor | None, rank: int, world_size: int) -> "
              "tuple[Tensor, Tensor | None]  # weight: [out, in], bias: [out] -> [out / n, in], [out / n]",
    reference=harness.ref_column_shard, driver=harness.drive_calls,
    hides=("reference.parallel.layers.ColumnParallelLinear",),
    cases=(
        Case("four_ranks", lambda g: calls(*_column_calls(g, 8, 5, 4, False)), Trace(Exact(), _names("[8, 5]", 4)),
             "an [8, 5] weight over 4 ranks: rank r keeps output features (rows of the torch weight) 2r and 2r + 1, "
             "whole rows, in order; no bias gives None", seed=1),
        Case("bias_follows_its_rows", lambda g: calls(*_column_calls(g, 6, 4, 3, True)),
             Trace(Exact(), _names("[6, 4] with a bias", 3)),
             "a [6, 4] weight with a bias over 3 ranks: the bias is split like the rows (rank r adds its own "
             "features' biases, so no rank adds another's)", seed=2),
        Case("one_rank_keeps_everything", lambda g: calls(*_column_calls(g, 5, 3, 1, True),
                                                           _column_calls(g, 4, 6, 2, True)[1]),
             Trace(Exact(), ("one rank", "[4, 6] with a bias, rank 1 of 2")),
             "world_size 1: the whole weight and bias; then rank 1 of 2 of a [4, 6] weight: rows 2 and 3", seed=3),
        Case("bad_splits_raise", _column_errors,
             Trace(Exact(), ("7 output features over 2 ranks", "rank 2 of 2", "rank -1 of 2", "rank 1 of 2 (fine)")),
             "7 output features do not split evenly over 2 ranks, and a rank outside [0, world_size) does not "
             "exist: both raise ValueError (a negative rank would silently slice from the end); then rank 1 of 2 "
             "of a [6, 3] weight works", seed=4),
        Case("eight_ranks", lambda g: calls(*_column_calls(g, 64, 24, 8, True)), Trace(Exact()),
             "a [64, 24] weight with a bias over 8 ranks", visible=False, seed=5),
    ),
)


def _row_calls(g: torch.Generator, out_features: int, in_features: int, world_size: int) -> list:
    weight = torch.randn(out_features, in_features, generator=g)
    return _every_rank(lambda rank: {"weight": weight, "rank": rank, "world_size": world_size}, world_size)


def _row_errors(g: torch.Generator) -> dict[str, Any]:
    odd, even = torch.randn(4, 9, generator=g), torch.randn(3, 8, generator=g)
    return calls({"weight": odd, "rank": 0, "world_size": 2}, {"weight": even, "rank": 4, "world_size": 4},
                  {"weight": even, "rank": -2, "world_size": 4}, {"weight": even, "rank": 3, "world_size": 4})


ROW_SHARD = Exercise(
    name="row_shard", symbol="row_shard", notebook=NOTEBOOK_1,
    signature="row_shard(weight: Tensor, rank: int, world_size: int) -> Tensor  # weight: [out, in] -> [out, in / n]",
    reference=harness.ref_row_shard, driver=harness.drive_calls, hides=("reference.parallel.layers.RowParallelLinear",),
    cases=(
        Case("four_ranks", lambda g: calls(*_row_calls(g, 3, 8, 4)), Trace(Exact(), _names("[3, 8]", 4)),
             "a [3, 8] weight over 4 ranks: rank r keeps input features (columns of the torch weight) 2r and "
             "2r + 1, every row", seed=11),
        Case("two_ranks_tall", lambda g: calls(*_row_calls(g, 10, 6, 2)), Trace(Exact(), _names("[10, 6]", 2)),
             "a [10, 6] weight over 2 ranks: columns 0..2 and 3..5, all 10 rows each", seed=12),
        Case("one_rank_keeps_everything", lambda g: calls(*_row_calls(g, 4, 3, 1), _row_calls(g, 2, 6, 3)[2]),
             Trace(Exact(), ("one rank", "[2, 6], rank 2 of 3")),
             "world_size 1: the whole weight; then rank 2 of 3 of a [2, 6] weight: columns 4 and 5", seed=13),
        Case("bad_splits_raise", _row_errors,
             Trace(Exact(), ("9 input features over 2 ranks", "rank 4 of 4", "rank -2 of 4", "rank 3 of 4 (fine)")),
             "9 input features do not split evenly over 2 ranks, and ranks 4 and -2 do not exist among 4: "
             "ValueError; then rank 3 of 4 of a [3, 8] weight works", seed=14),
        Case("eight_ranks", lambda g: calls(*_row_calls(g, 24, 64, 8)), Trace(Exact()),
             "a [24, 64] weight over 8 ranks", visible=False, seed=15),
    ),
)


def _column_forward_call(g: torch.Generator, x_shape: tuple, out_features: int, world_size: int,
                         bias: bool) -> dict[str, Any]:
    share = out_features // world_size
    return {"x": torch.randn(*x_shape, generator=g),
            "weight_shards": [torch.randn(share, x_shape[-1], generator=g) for _ in range(world_size)],
            "bias_shards": [torch.randn(share, generator=g) for _ in range(world_size)] if bias else None}


COLUMN_PARALLEL_FORWARD = Exercise(
    name="column_parallel_forward", symbol="column_parallel_forward", notebook=NOTEBOOK_1,
    signature="column_parallel_forward(x: Tensor, weight_shards: list[Tensor], bias_shards: list[Tensor] | None) "
              "-> Tensor  # x: [..., in], weight_shards[r]: [out / n, in] -> [..., out]",
    reference=harness.ref_column_parallel_forward, driver=harness.drive_calls,
    hides=("reference.parallel.layers.ColumnParallelLinear",),
    cases=(
        Case("two_ranks", lambda g: calls(_column_forward_call(g, (5, 6), 8, 2, False)),
             Trace(CLOSE, ("x [5, 6], 2 ranks of 4 output features",)),
             "2 ranks, no bias: each rank computes its 4 output features, and the all-gather puts the pieces side "
             "by side, rank 0's first: [5, 8]", seed=21),
        Case("three_ranks_with_bias", lambda g: calls(_column_forward_call(g, (4, 3), 6, 3, True)),
             Trace(CLOSE, ("x [4, 3], 3 ranks with biases",)),
             "3 ranks, each adding its own slice of the bias to its own features", seed=22),
        Case("leading_dimensions", lambda g: calls(_column_forward_call(g, (2, 3, 4), 6, 2, True),
                                                    _column_forward_call(g, (1, 4), 4, 1, False)),
             Trace(CLOSE, ("x [2, 3, 4] over 2 ranks", "x [1, 4] on one rank")),
             "x [2, 3, 4]: the features are the LAST dimension, so the gather joins the last dimension; then a "
             "single rank, whose output is just its own", seed=23),
        Case("eight_ranks", lambda g: calls(_column_forward_call(g, (7, 16), 32, 8, True),
                                             _column_forward_call(g, (2, 5, 8), 12, 4, False)),
             Trace(CLOSE), "8 ranks with biases, and 4 ranks on a 3-d input", visible=False, seed=24),
    ),
)


def _row_forward_call(g: torch.Generator, lead: tuple, in_features: int, out_features: int, world_size: int,
                      bias: bool) -> dict[str, Any]:
    share = in_features // world_size
    return {"x_shards": [torch.randn(*lead, share, generator=g) for _ in range(world_size)],
            "weight_shards": [torch.randn(out_features, share, generator=g) for _ in range(world_size)],
            "bias": torch.randn(out_features, generator=g) + 3.0 if bias else None}


ROW_PARALLEL_FORWARD = Exercise(
    name="row_parallel_forward", symbol="row_parallel_forward", notebook=NOTEBOOK_1,
    signature="row_parallel_forward(x_shards: list[Tensor], weight_shards: list[Tensor], bias: Tensor | None) "
              "-> Tensor  # x_shards[r]: [..., in / n], weight_shards[r]: [out, in / n], bias: [out] -> [..., out]",
    reference=harness.ref_row_parallel_forward, driver=harness.drive_calls,
    hides=("reference.parallel.layers.RowParallelLinear",),
    cases=(
        Case("two_ranks", lambda g: calls(_row_forward_call(g, (5,), 8, 3, 2, False)),
             Trace(CLOSE, ("2 ranks, no bias",)),
             "2 ranks, no bias: rank r multiplies its slice of x by its columns of the weight; the all-reduce "
             "sums the 2 partial outputs ([5, 3] each)", seed=31),
        Case("bias_added_once", lambda g: calls(_row_forward_call(g, (4,), 8, 6, 4, True)),
             Trace(CLOSE, ("4 ranks with a bias",)),
             "4 ranks and a bias (around 3): the bias is added ONCE, after the sum; added on every rank before "
             "the all-reduce it would count 4 times", seed=32),
        Case("one_rank_and_leading_dims", lambda g: calls(_row_forward_call(g, (3,), 5, 4, 1, True),
                                                           _row_forward_call(g, (2, 3), 6, 5, 3, False)),
             Trace(CLOSE, ("one rank with a bias", "x shards [2, 3, 2] over 3 ranks")),
             "one rank: an ordinary linear layer with its bias; then 3-d inputs over 3 ranks", seed=33),
        Case("eight_ranks", lambda g: calls(_row_forward_call(g, (6,), 32, 16, 8, True),
                                             _row_forward_call(g, (2, 4), 12, 7, 2, True)),
             Trace(CLOSE), "8 ranks with a bias, and 2 ranks on a 3-d input", visible=False, seed=34),
    ),
)


# ============================================================================================================
# Notebook 2: sharding attention
# ============================================================================================================


def _head_calls(num_heads: int, num_kv_heads: int, world_size: int) -> list[dict[str, Any]]:
    return _every_rank(lambda rank: {"num_heads": num_heads, "num_kv_heads": num_kv_heads, "rank": rank,
                                     "world_size": world_size}, world_size)


def _head_call(num_heads: int, num_kv_heads: int, rank: int, world_size: int) -> dict[str, Any]:
    return {"num_heads": num_heads, "num_kv_heads": num_kv_heads, "rank": rank, "world_size": world_size}


def _random_head_call(g: torch.Generator) -> dict[str, Any]:
    kv = choice(g, [1, 2, 3, 4, 8])
    heads = kv * choice(g, [1, 2, 3, 4, 6])
    world_size = choice(g, [1, 2, 3, 4, 6, 8])
    return _head_call(heads, kv, integer(g, 0, world_size), world_size)


HEAD_SHARD = Exercise(
    name="head_shard", symbol="head_shard", notebook=NOTEBOOK_2,
    signature="head_shard(num_heads: int, num_kv_heads: int, rank: int, world_size: int) -> "
              "tuple[int, int, int, int]  # (q_start, q_end, kv_start, kv_end), half-open ranges of head indices",
    reference=harness.ref_head_shard, driver=harness.drive_calls,
    hides=("reference.parallel.plan.kv_head_range", "reference.parallel.plan.check_shardable",
           "reference.parallel.plan.valid_sizes"),
    cases=(
        Case("mha_two_ranks", lambda g: calls(*_head_calls(4, 4, 2)), Trace(Exact(), _names("4 heads, 4 KV heads", 2)),
             "multi-head attention, 4 heads over 2 ranks: rank 0 keeps query and KV heads 0..1, rank 1 heads 2..3: "
             "(0, 2, 0, 2) and (2, 4, 2, 4)"),
        Case("gqa_split", lambda g: calls(*_head_calls(8, 2, 2)), Trace(Exact(), _names("8 heads, 2 KV heads", 2)),
             "8 query heads sharing 2 KV heads (query heads 0-3 read KV head 0, 4-7 KV head 1), over 2 ranks: each "
             "rank keeps 4 query heads and the one KV head they read"),
        Case("gqa_replicated", lambda g: calls(*_head_calls(8, 2, 4)),
             Trace(Exact(), _names("8 heads, 2 KV heads", 4)),
             "8 query heads and 2 KV heads over 4 ranks: fewer KV heads than ranks, so each KV head is REPLICATED on "
             "the ranks whose query heads read it: ranks 0 and 1 keep KV head 0 (0, 1), ranks 2 and 3 KV head 1 "
             "(1, 2)"),
        Case("mqa_and_one_rank", lambda g: calls(*_head_calls(4, 1, 4), _head_call(6, 2, 0, 1)),
             Trace(Exact(), _names("4 heads, 1 KV head", 4) + ("6 heads, 2 KV heads, one rank",)),
             "multi-query attention (1 KV head) over 4 ranks: every rank keeps KV head 0; then one rank keeps "
             "everything: (0, 6, 0, 2)"),
        Case("impossible_splits_raise", lambda g: calls(_head_call(9, 3, 0, 2), _head_call(9, 3, 1, 3),
                                                         _head_call(12, 4, 0, 6), _head_call(8, 2, 0, 3),
                                                         _head_call(4, 2, 2, 2), _head_call(4, 2, -1, 2)),
             Trace(Exact(), ("9 heads, 3 KV heads, rank 0 of 2", "9 heads, 3 KV heads, rank 1 of 3 (fine)",
                             "12 heads, 4 KV heads, rank 0 of 6", "8 heads, 2 KV heads, rank 0 of 3",
                             "rank 2 of 2", "rank -1 of 2")),
             "SmolLM2's 9 query heads cannot split over 2 ranks: ValueError (over 3 ranks they can); 12 query heads "
             "over 6 ranks split evenly, but 4 KV heads neither split over 6 ranks nor can be shared by whole "
             "groups (6 is not a multiple of 4): ValueError; 8 heads over 3 ranks, rank 2 of 2 and rank -1 of 2: "
             "ValueError"),
        Case("random_layouts", lambda g: random_calls(24, lambda: _random_head_call(g)), Trace(Exact()),
             "24 random head layouts, ranks and world sizes, some impossible", visible=False, seed=41),
    ),
)


# ============================================================================================================
# Notebook 3: communication cost
# ============================================================================================================


def _preset(name: str, *keys: str) -> dict[str, Any]:
    fields = ARCHITECTURES[name]
    keys = keys or ("num_hidden_layers", "hidden_size", "vocab_size", "num_attention_heads", "num_key_value_heads",
                    "intermediate_size")
    return {key: fields[key] for key in keys}


def _comm_call(config: dict[str, Any], tp_size: int, dtype_bytes: int) -> dict[str, Any]:
    return {"config": config, "tp_size": tp_size, "dtype_bytes": dtype_bytes}


def _random_comm_call(g: torch.Generator) -> dict[str, Any]:
    config = {"num_hidden_layers": choice(g, [2, 12, 24, 32, 80]), "hidden_size": choice(g, [256, 2048, 5120, 8192]),
              "vocab_size": choice(g, [1000, 32000, 49152, 128256, 151936, 50257]), "num_attention_heads": 8}
    return _comm_call(config, choice(g, [1, 2, 3, 4, 8]), choice(g, [1, 2, 4]))


COMM_BYTES_PER_TOKEN = Exercise(
    name="comm_bytes_per_token", symbol="comm_bytes_per_token", notebook=NOTEBOOK_3,
    signature="comm_bytes_per_token(config: dict, tp_size: int, dtype_bytes: int) -> dict  "
              "# {'all_reduce': int, 'all_gather': int} bytes per token of a decode step",
    reference=harness.ref_comm_bytes_per_token, driver=harness.drive_calls,
    hides=("reference.parallel.cost.collective_bytes_per_token",),
    cases=(
        Case("smollm2_three_ranks", lambda g: calls(_comm_call(_preset("smollm2-135m"), 3, 4)),
             Trace(Exact(), ("SmolLM2-135M over 3 ranks, float32",)),
             "SmolLM2-135M (30 layers, hidden 576, vocabulary 49152) over 3 ranks in float32: 2 all-reduces per "
             "layer plus the embedding's, each of hidden_size values; the LM head gathers one row of logits"),
        Case("one_rank_sends_nothing", lambda g: calls(_comm_call(_preset("qwen3-0.6b"), 1, 2),
                                                        _comm_call(_preset("qwen3-0.6b"), 2, 2)),
             Trace(Exact(), ("Qwen3-0.6B on one rank", "Qwen3-0.6B over 2 ranks, bfloat16")),
             "one rank needs no collective at all (0 and 0); Qwen3-0.6B over 2 ranks in bfloat16 does"),
        Case("padded_vocabulary", lambda g: calls(_comm_call({"num_hidden_layers": 4, "hidden_size": 64,
                                                               "vocab_size": 1001}, 4, 4)),
             Trace(Exact(), ("vocabulary 1001 over 4 ranks",)),
             "a vocabulary of 1001 over 4 ranks: each rank holds ceil(1001 / 4) = 251 rows (the last padded), so "
             "the gathered row has 1004 logits"),
        Case("llama_eight_ranks", lambda g: calls(_comm_call(_preset("llama-3-8b"), 8, 2),
                                                   _comm_call(_preset("llama-3-8b"), 4, 1)),
             Trace(Exact(), ("Llama-3-8B over 8 ranks, bfloat16", "Llama-3-8B over 4 ranks, 8-bit")),
             "Llama-3-8B (hidden 4096, 32 layers) over 8 ranks in bfloat16 and over 4 in 8-bit: the hidden size, not "
             "the MLP's intermediate size, travels"),
        Case("random_configs", lambda g: random_calls(12, lambda: _random_comm_call(g)), Trace(Exact()),
             "12 random configs, tensor-parallel sizes and dtypes", visible=False, seed=51),
    ),
)


LAB = Lab(name="lab0.4", preamble=harness.PREAMBLE, memory_mb=LAB_MEMORY_MB, exercises=(
    COLUMN_SHARD, COLUMN_PARALLEL_FORWARD, ROW_SHARD, ROW_PARALLEL_FORWARD,
    HEAD_SHARD,
    COMM_BYTES_PER_TOKEN,
))
