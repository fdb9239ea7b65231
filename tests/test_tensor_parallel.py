"""Tensor parallelism on the CPU (gloo, one process per rank): a model split over 2 or 4 ranks computes the logits
of the unsplit model, each rank holds and reads only its slices, and a model that cannot split says which sizes
can."""

from __future__ import annotations

import pytest
import torch

from reference.attention import build_metadata
from reference.config import ModelConfig
from reference.models import load_model
from reference.parallel.group import TensorParallel
from reference.parallel.launch import run_ranks
from reference.parallel.plan import check_shardable, valid_sizes

ATOL = 1e-5
# family, config overrides: GQA split evenly (8 heads, 2 KV heads over 2 ranks) and replicated (over 4 ranks), a
# vocabulary that 4 does not divide, tied embeddings, q/k/v biases, an MLP bias, Qwen3's q/k norms.
CONFIGS = {
    "llama-gqa4-mlp-bias": ("llama", {"num_attention_heads": 8, "num_key_value_heads": 2, "head_dim": 12,
                                      "mlp_bias": True, "vocab_size": 515}),
    "qwen2-mha-bias-tied": ("qwen2", {"num_attention_heads": 4, "num_key_value_heads": 4, "head_dim": 24,
                                      "tie_word_embeddings": True}),
    "qwen3-qknorm-gqa4": ("qwen3", {"num_attention_heads": 8, "num_key_value_heads": 2, "head_dim": 16,
                                    "vocab_size": 513}),
}
PROMPT = [3, 17, 250, 99, 7, 401, 12, 12, 5, 300, 77, 1]


def logits_on_rank(tp: TensorParallel, paths: list[str], token_ids: list[int], cuda: bool = False) -> list[dict]:
    """For each model: rank 0's logits of the prompt, the parameters this rank holds, its q_proj rows."""
    found = []
    device = f"cuda:{tp.rank}" if cuda else "cpu"
    for path in paths:
        model, _ = load_model(path, device=device, tp=tp)
        positions, metadata = build_metadata([len(token_ids)], None, None, None, device)
        with torch.inference_mode():
            logits = model.compute_logits(model(torch.tensor(token_ids, device=device), positions, metadata))
        found.append({"logits": logits.cpu() if tp.rank == 0 else None,
                      "parameters": sum(p.numel() for p in model.parameters()),
                      "q_rows": model.model.layers[0].self_attn.q_proj.weight.shape[0]})
    return found


@pytest.mark.slow
def test_logits_over_2_and_4_ranks_equal_one_rank(checkpoint_factory):
    paths = [str(checkpoint_factory(family, **overrides)) for family, overrides in CONFIGS.values()]
    single = logits_on_rank(TensorParallel(), paths, PROMPT)
    for size in (2, 4):
        ranks = run_ranks(logits_on_rank, size, paths, PROMPT, backend="gloo")  # one spawn for every model
        for i, (name, path) in enumerate(zip(CONFIGS, paths)):
            config = ModelConfig.from_dir(path)
            diff = (ranks[0][i]["logits"] - single[i]["logits"]).abs().max().item()
            assert diff < ATOL, f"{name} over {size} ranks: max abs logit diff {diff:.2e}"
            assert torch.equal(ranks[0][i]["logits"].argmax(-1), single[i]["logits"].argmax(-1))
            # each rank holds its share of the query heads, and much less than the whole model
            assert all(r[i]["q_rows"] == config.num_attention_heads // size * config.head_dim for r in ranks)
            assert all(r[i]["parameters"] < single[i]["parameters"] * 0.75 for r in ranks)


@pytest.mark.slow
def test_random_preset_weights_do_not_depend_on_the_number_of_ranks():
    """random:<arch> draws the whole model, then splits it: the same model whatever the rank count."""
    one = logits_on_rank(TensorParallel(), ["random:smollm2-135m"], PROMPT)[0]["logits"]
    three = run_ranks(logits_on_rank, 3, ["random:smollm2-135m"], PROMPT, backend="gloo")[0][0]["logits"]
    assert (three - one).abs().max().item() < 1e-4  # 9 query heads and 3 KV heads, split over 3 ranks


def test_a_model_that_does_not_split_names_the_sizes_that_do():
    config = ModelConfig(model_type="llama", vocab_size=100, hidden_size=72, intermediate_size=96,
                         num_hidden_layers=1, num_attention_heads=9, num_key_value_heads=3, head_dim=8)
    assert valid_sizes(config) == [1, 3]
    with pytest.raises(ValueError, match=r"9 query heads, 3 key/value heads.*use one of \[1, 3\]"):
        check_shardable(config, 2)
    check_shardable(config, 3)


def test_a_failing_rank_is_reported_with_its_traceback_and_the_others_stopped():
    with pytest.raises(RuntimeError, match=r"rank \d of 2 failed:(.|\n)*does not split evenly"):
        run_ranks(_fails_to_split, 2, backend="gloo")


def _fails_to_split(tp: TensorParallel) -> None:
    torch.distributed.barrier()
    tp.split(7)


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_logits_over_2_gpus_with_nccl_equal_one_gpu(checkpoint_factory):
    paths = [str(checkpoint_factory(family, **overrides)) for family, overrides in CONFIGS.values()]
    single = logits_on_rank(TensorParallel(), paths, PROMPT, True)
    ranks = run_ranks(logits_on_rank, 2, paths, PROMPT, True, backend="nccl")
    for i, name in enumerate(CONFIGS):
        diff = (ranks[0][i]["logits"] - single[i]["logits"]).abs().max().item()
        assert diff < 1e-3, f"{name} over 2 GPUs: max abs logit diff {diff:.2e}"
        assert torch.equal(ranks[0][i]["logits"].argmax(-1), single[i]["logits"].argmax(-1))
