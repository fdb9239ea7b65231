"""Lab 0.2 (Prefill vs decode): its exercises, their trusted references and their test cases.

Exercise signatures below are frozen once published: the notebooks' skeletons, the self-check cells and the
grader all depend on them. The references are thin adapters over the `reference` engine: the cost model of
reference/costs.py (notebook 1). Everything the references need from `reference` is bound at import time, so
a grader that later hides those symbols from learner code does not break the stand-ins.
"""

from __future__ import annotations

from typing import Any

import torch

from reference import costs
from reference.config import ModelConfig

from ..compare import Close, Exact
from ..spec import Case, Exercise, Lab

NOTEBOOK_1 = "01_two_phases.ipynb"

# Exercise cells may rely on these imports and nothing else from their notebook.
PREAMBLE = """\
import math
from collections import deque
import torch
"""

_step_flops, _step_bytes, _flops_per_token = costs.step_flops, costs.step_bytes, costs.flops_per_token


# ============================================================================================================
# Notebook 1: the two phases
# ============================================================================================================


def _model_config(config: dict[str, Any]) -> ModelConfig:
    return ModelConfig.from_hf_dict({"model_type": "llama", **config})


def ref_flops_per_token(config: dict[str, Any], context_len: int) -> int:
    return _flops_per_token(_model_config(config), context_len)


def ref_arithmetic_intensity(config: dict[str, Any], query_lens: list[int], context_lens: list[int],
                             dtype_bytes: int) -> float:
    model_config = _model_config(config)
    return _step_flops(model_config, query_lens, context_lens) / _step_bytes(model_config, query_lens, context_lens,
                                                                            dtype_bytes)


SMOLLM2 = {"vocab_size": 49152, "hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30,
           "num_attention_heads": 9, "num_key_value_heads": 3, "head_dim": 64}
QWEN3_06B = {"vocab_size": 151936, "hidden_size": 1024, "intermediate_size": 3072, "num_hidden_layers": 28,
             "num_attention_heads": 16, "num_key_value_heads": 8, "head_dim": 128}
LLAMA2_7B = {"vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
             "num_attention_heads": 32}  # no head_dim, no num_key_value_heads: the defaults apply


def _pick(generator: torch.Generator, options: list) -> Any:
    return options[int(torch.randint(0, len(options), (1,), generator=generator))]


def _random_config(generator: torch.Generator) -> dict[str, Any]:
    heads = _pick(generator, [4, 8, 12, 16])
    config = {"vocab_size": _pick(generator, [1000, 32000, 50257]), "num_hidden_layers": _pick(generator, [2, 12, 24]),
              "num_attention_heads": heads, "hidden_size": heads * _pick(generator, [32, 64]),
              "intermediate_size": _pick(generator, [512, 1536, 2816])}
    if _pick(generator, [True, False]):
        config["num_key_value_heads"] = _pick(generator, [h for h in (1, 2, 4) if heads % h == 0])
    if _pick(generator, [True, False]):
        config["head_dim"] = _pick(generator, [32, 64, 128])
    return config


def _random_step(generator: torch.Generator, num_seqs: int) -> tuple[list[int], list[int]]:
    query_lens, context_lens = [], []
    for _ in range(num_seqs):
        query_len = _pick(generator, [1, 1, 1, 7, 33])
        query_lens.append(query_len)
        context_lens.append(query_len + int(torch.randint(0, 300, (1,), generator=generator)))
    return query_lens, context_lens


FLOPS_PER_TOKEN = Exercise(
    name="flops_per_token", symbol="flops_per_token", notebook=NOTEBOOK_1,
    signature="flops_per_token(config: dict, context_len: int) -> int",
    reference=ref_flops_per_token,
    hides=("reference.costs.flops_per_token", "reference.costs.linear_params", "reference.costs.step_flops"),
    cases=(
        Case("smollm2_first_token", lambda g: {"config": SMOLLM2, "context_len": 1}, Exact(),
             "SmolLM2-135M, a token that attends only to itself: 2 FLOPs per linear weight (LM head included) plus "
             "4 x layers x heads x head_dim for one key"),
        Case("smollm2_long_context", lambda g: {"config": SMOLLM2, "context_len": 2048}, Exact(),
             "SmolLM2-135M at 2048 keys: the attention term grows linearly with the context"),
        Case("qwen3_explicit_head_dim", lambda g: {"config": QWEN3_06B, "context_len": 100}, Exact(),
             "Qwen3-0.6B: head_dim 128 is given, and heads x head_dim (2048) differs from hidden_size (1024)"),
        Case("defaults_multi_head", lambda g: {"config": LLAMA2_7B, "context_len": 4096}, Exact(),
             "Llama-2-7B's config has no head_dim and no num_key_value_heads: head_dim = hidden // heads, "
             "KV heads = heads"),
        Case("random_configs", lambda g: {"config": _random_config(g),
                                          "context_len": int(torch.randint(1, 5000, (1,), generator=g))},
             Exact(), "a random Llama-style config and context", visible=False, seed=1),
    ),
)

ARITHMETIC_INTENSITY = Exercise(
    name="arithmetic_intensity", symbol="arithmetic_intensity", notebook=NOTEBOOK_1,
    signature="arithmetic_intensity(config: dict, query_lens: list[int], context_lens: list[int], dtype_bytes: int) "
              "-> float",
    reference=ref_arithmetic_intensity, uses=("flops_per_token",),
    hides=("reference.costs.arithmetic_intensity", "reference.costs.step_bytes", "reference.costs.kv_bytes_per_token"),
    cases=(
        Case("one_decode_float32", lambda g: {"config": SMOLLM2, "query_lens": [1], "context_lens": [100],
                                              "dtype_bytes": 4},
             Close(0.0, 1e-9), "SmolLM2, one sequence decoding its 100th token in float32: the weights are read for "
                               "a single token, so the intensity is about 2 FLOPs / 4 bytes"),
        Case("prefill_bfloat16", lambda g: {"config": SMOLLM2, "query_lens": [256], "context_lens": [256],
                                            "dtype_bytes": 2},
             Close(0.0, 1e-9), "a 256-token prefill in bfloat16: token j attends to j + 1 keys, and all 256 tokens "
                               "share one read of the weights"),
        Case("decode_batch", lambda g: {"config": QWEN3_06B, "query_lens": [1] * 8,
                                        "context_lens": [40, 90, 200, 500, 1000, 1000, 3000, 4000],
                                        "dtype_bytes": 2},
             Close(0.0, 1e-9), "Qwen3-0.6B, a decode step of 8 sequences with different contexts: each reads its "
                               "own K/V"),
        Case("mixed_chunk_and_decodes", lambda g: {"config": SMOLLM2, "query_lens": [64, 1, 1],
                                                   "context_lens": [192, 30, 31], "dtype_bytes": 4},
             Close(0.0, 1e-9), "a chunked-prefill step: 64 tokens of a prompt whose first 128 are cached already "
                               "(its keys 129..192), beside two decodes"),
        Case("random_steps", lambda g: {"config": _random_config(g), "query_lens": (step := _random_step(g, 6))[0],
                                        "context_lens": step[1], "dtype_bytes": _pick(g, [1, 2, 4])},
             Close(0.0, 1e-9), "random configs and steps", visible=False, seed=2),
    ),
)


LAB = Lab(
    name="lab0.2",
    folder="lab0.2",
    preamble=PREAMBLE,
    exercises=(FLOPS_PER_TOKEN, ARITHMETIC_INTENSITY),
)
