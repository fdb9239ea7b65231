"""Lab 0.4 (Scaling out): its grading power and the count its notebook 3 teaches.

- The classic mistakes fail a visible case that names them (the whole catalogue, tests/mutants/lab0_4.py, is
  graded by tests/test_mutants.py like every lab's).
- reference/parallel/cost.py (the exercise comm_bytes_per_token's reference) counts exactly the bytes that the
  parallel layers hand to their collectives, on models split with the engine's own `parallelize`.
The notebooks themselves run in tests/test_notebooks.py, which takes every lab of autograder.labs.
"""

from __future__ import annotations

import pytest
import torch

from mutants import load_catalogue, mutant_source, run_cell, solution_cells
from reference.attention import build_metadata
from reference.config import ModelConfig
from reference.models.llama import LlamaForCausalLM
from reference.models.rotary import RotaryEmbedding
from reference.parallel.cost import collective_bytes_per_token
from reference.parallel.group import TensorParallel
from reference.parallel.plan import parallelize

LAB = "lab0.4"


def test_the_classic_mistakes_fail_a_visible_case_that_names_them():
    """The mistakes the notebooks warn about are caught by the self-check, not only by hidden cases."""
    cells = solution_cells(LAB)
    expected = {("row_parallel_forward", "bias_on_every_rank"): "bias_added_once",
                ("column_parallel_forward", "no_all_gather"): "two_ranks",
                ("head_shard", "round_robin_replication"): "gqa_replicated",
                ("head_shard", "nothing_checked"): "impossible_splits_raise",
                ("comm_bytes_per_token", "all_gather_forgotten"): "smollm2_three_ranks",
                ("column_shard", "inclusive_end"): "four_ranks"}
    catalogue = load_catalogue(LAB)
    for (exercise, name), case in expected.items():
        (mutant,) = [m for m in catalogue[exercise] if m.name == name]
        result = run_cell(LAB, exercise, mutant_source(mutant, cells[exercise][2]))
        failed = {c.case for c in result.cases if not c.passed}
        assert case in failed, (exercise, name, failed)


class CountingParallel(TensorParallel):
    """Rank 0 of `size`, alone: each collective adds its result's bytes to `counted` instead of communicating."""

    counted: dict[str, int] = {}

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        CountingParallel.counted["all_reduce"] += x.numel() * x.element_size()
        return x

    def all_gather_last(self, x: torch.Tensor) -> torch.Tensor:
        gathered = torch.cat([x] * self.size, dim=-1)
        CountingParallel.counted["all_gather"] += gathered.numel() * gathered.element_size()
        return gathered


@pytest.mark.parametrize("overrides, size, dtype", [
    ({}, 2, torch.float32),
    ({"vocab_size": 1001, "tie_word_embeddings": True}, 4, torch.float32),  # a padded last slice, tied head
    ({"num_key_value_heads": 1, "attention_bias": True, "mlp_bias": True}, 4, torch.bfloat16),  # KV replicated
])
def test_collective_bytes_per_token_are_what_the_parallel_layers_send(overrides, size, dtype):
    fields = dict(model_type="llama", vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=16)
    config = ModelConfig(**{**fields, **overrides})
    with torch.device("meta"):
        model = parallelize(LlamaForCausalLM(config), CountingParallel(0, size))
    model = model.to_empty(device="cpu").to(dtype)
    model.model.rotary = RotaryEmbedding(config)
    model.tie_weights()
    for param in model.parameters():
        torch.nn.init.normal_(param, std=0.02)
    batch = 5
    CountingParallel.counted = {"all_reduce": 0, "all_gather": 0}
    positions, metadata = build_metadata([1] * batch, None, None, None, "cpu")  # a decode step of 5 sequences
    with torch.inference_mode():
        model.compute_logits(model(torch.randint(0, config.vocab_size, (batch,)), positions, metadata))
    per_token = {kind: total // batch for kind, total in CountingParallel.counted.items()}
    assert per_token == collective_bytes_per_token(config, size, torch.empty((), dtype=dtype).element_size())
    assert collective_bytes_per_token(config, 1, 2) == {"all_reduce": 0, "all_gather": 0}
