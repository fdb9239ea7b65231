"""Our decoder's logits equal transformers' on the same weights (float32, max abs diff < 1e-4)."""

from __future__ import annotations

import pytest
import torch

from reference.attention import build_metadata
from reference.config import ModelConfig
from reference.models import load_model

ATOL = 1e-4

# family, config overrides: odd GQA ratios (3, MQA, MHA), head_dim not hidden/heads, biases, tying, llama3 RoPE.
CONFIGS = {
    "llama-gqa3": ("llama", {}),
    "llama-mqa-tied": ("llama", {"num_attention_heads": 4, "num_key_value_heads": 1, "tie_word_embeddings": True}),
    "llama-mha-llama3-rope": ("llama", {
        "num_attention_heads": 4, "num_key_value_heads": 4,
        "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 32},
    }),
    "qwen2-bias-gqa3": ("qwen2", {}),
    "qwen3-qknorm-headdim40": ("qwen3", {"head_dim": 40, "num_attention_heads": 5, "num_key_value_heads": 1}),
    "qwen3-gqa4-tied": ("qwen3", {"num_attention_heads": 8, "num_key_value_heads": 2, "head_dim": 16,
                                  "tie_word_embeddings": True}),
}


def our_logits(model, token_ids: list[int]) -> torch.Tensor:
    positions, metadata = build_metadata([len(token_ids)], None, None, None, "cpu")
    with torch.inference_mode():
        return model.compute_logits(model(torch.tensor(token_ids), positions, metadata))


def hf_logits(hf_model, token_ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return hf_model(torch.tensor([token_ids])).logits[0].float()


@pytest.mark.parametrize("name", CONFIGS)
def test_random_checkpoint_logits_match_transformers(hf_twin_factory, name):
    family, overrides = CONFIGS[name]
    path, hf = hf_twin_factory(family, **overrides)
    ours, _ = load_model(path)
    tokens = torch.randint(0, ours.config.vocab_size, (200,)).tolist()  # long enough to exercise llama3 bands
    diff = (our_logits(ours, tokens) - hf_logits(hf, tokens)).abs().max().item()
    assert diff < ATOL, f"{name}: max abs logit diff {diff:.2e}"


def test_config_reads_family_specifics(checkpoint_factory):
    qwen2 = ModelConfig.from_dir(checkpoint_factory("qwen2"))
    qwen3 = ModelConfig.from_dir(checkpoint_factory("qwen3", head_dim=40, num_attention_heads=5, num_key_value_heads=1))
    assert qwen2.attention_bias and not qwen2.qk_norm
    assert qwen3.qk_norm and qwen3.head_dim == 40 and qwen3.num_key_value_heads == 1


def test_sharded_checkpoint_loads_same_weights(tmp_path, checkpoint_factory):
    from transformers import AutoModelForCausalLM

    path = checkpoint_factory("qwen3")
    hf = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
    hf.save_pretrained(str(tmp_path), max_shard_size="100KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    whole, _ = load_model(path)
    sharded, _ = load_model(tmp_path)
    for (name, a), (_, b) in zip(whole.named_parameters(), sharded.named_parameters()):
        assert torch.equal(a, b), name


def test_packed_batch_equals_each_sequence_alone(checkpoint_factory):
    """Packing sequences into one forward pass must not let them see each other."""
    model, _ = load_model(checkpoint_factory("llama"))
    seqs = [torch.randint(0, 512, (n,)).tolist() for n in (7, 1, 19, 4)]
    positions, metadata = build_metadata([len(s) for s in seqs], None, None, None, "cpu")
    with torch.inference_mode():
        packed = model.compute_logits(model(torch.tensor(sum(seqs, [])), positions, metadata))
    alone = torch.cat([our_logits(model, s) for s in seqs])
    assert (packed - alone).abs().max().item() < 1e-5


def test_cached_chunks_equal_one_full_forward(checkpoint_factory):
    """Prefill in two chunks then decode token by token through the cache gives the full-forward logits."""
    from reference.kv_cache import ContiguousKVCache

    model, _ = load_model(checkpoint_factory("qwen3"))
    tokens = torch.randint(0, 512, (30,)).tolist()
    full = our_logits(model, tokens)
    cache = ContiguousKVCache(model.config, max_batch=2, max_len=40, dtype=torch.float32, device="cpu")
    row = 1  # use the second row so a wrong block table would read zeros
    pieces, done = [], 0
    for chunk in (12, 10, 1, 1, 1, 1, 1, 1, 1, 1):
        positions, metadata = build_metadata([chunk], [done + chunk], [cache.block_table(row)], cache.block_size, "cpu")
        with torch.inference_mode():
            pieces.append(model.compute_logits(
                model(torch.tensor(tokens[done:done + chunk]), positions, metadata, cache.layers)))
        done += chunk
    assert (torch.cat(pieces) - full).abs().max().item() < 1e-5


@pytest.mark.slow
def test_smollm2_logits_match_transformers_gguf_load(smollm2, smollm2_hf):
    """Both sides loaded from the same GGUF: ours via gguf + our conversion, theirs via transformers."""
    model, model_dir = smollm2
    from reference.tokenizer import Tokenizer

    tokenizer = Tokenizer(model_dir)
    for text in ("The capital of France is", "def fibonacci(n):\n    return", "Hello, my name is"):
        tokens = tokenizer.encode(text)
        diff = (our_logits(model, tokens) - hf_logits(smollm2_hf, tokens)).abs().max().item()
        assert diff < ATOL, f"{text!r}: max abs logit diff {diff:.2e}"
