"""Packed projections (models/packing.py): q/k/v and gate/up as one matrix multiply each give the unpacked
model's logits, keep Hugging Face's parameter names and a single copy of the weights, and the engine with them
generates transformers' greedy tokens."""

from __future__ import annotations

import pytest
import torch

from exactness import assert_greedy_agree, hf_greedy, hf_next_token_logits
from reference import LLM, SamplingParams
from reference.attention import build_metadata
from reference.models import load_model

# Float32 on the CPU: one wider GEMM sums each output in the same order as the narrow ones, up to blocking.
ATOL = 1e-5
# family, overrides: GQA ratio 3 (the default), MQA with tied embeddings, Qwen2's q/k/v biases with ratio 5,
# Qwen3's q/k norms with head_dim 40 and one KV head.
CONFIGS = {
    "llama-gqa3": ("llama", {}),
    "llama-mqa-tied": ("llama", {"num_attention_heads": 4, "num_key_value_heads": 1, "tie_word_embeddings": True}),
    "qwen2-bias-gqa5": ("qwen2", {"num_attention_heads": 10, "num_key_value_heads": 2, "head_dim": 12}),
    "qwen3-qknorm-headdim40": ("qwen3", {"head_dim": 40, "num_attention_heads": 5, "num_key_value_heads": 1}),
}


def checkpoint(checkpoint_factory, name: str):
    family, overrides = CONFIGS[name]
    return checkpoint_factory(family, **overrides)


def our_logits(model, token_ids: list[int]) -> torch.Tensor:
    positions, metadata = build_metadata([len(token_ids)], None, None, None, "cpu")
    with torch.inference_mode():
        return model.compute_logits(model(torch.tensor(token_ids), positions, metadata))


def layer0(model):
    return model.model.layers[0].self_attn, model.model.layers[0].mlp


@pytest.mark.parametrize("name", CONFIGS)
def test_packed_forward_matches_unpacked(checkpoint_factory, name):
    model, _ = load_model(checkpoint(checkpoint_factory, name), progress=False)
    tokens = torch.randint(0, model.config.vocab_size, (37,)).tolist()
    unpacked = our_logits(model, tokens)
    model.pack_projections()
    attention, mlp = layer0(model)
    assert attention.packed_qkv is not None and mlp.packed_gate_up is not None
    assert (our_logits(model, tokens) - unpacked).abs().max().item() < ATOL
    model.pack_projections(False)  # back to the three and two nn.Linear layers
    assert attention.packed_qkv is None and torch.equal(our_logits(model, tokens), unpacked)


def test_packing_keeps_names_values_and_one_copy_of_the_weights(checkpoint_factory):
    model, _ = load_model(checkpoint(checkpoint_factory, "qwen2-bias-gqa5"), progress=False)
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    model.pack_projections()
    after = model.state_dict()
    assert list(after) == list(before)
    assert all(torch.equal(after[name], before[name]) for name in before)
    attention, mlp = layer0(model)
    weight, bias = attention.packed_qkv
    # q/k/v's parameters are views of the packed rows (no second copy), in that order.
    assert attention.q_proj.weight.data_ptr() == weight.data_ptr()
    assert attention.v_proj.bias.data_ptr() == bias.data_ptr() + (bias.numel() - attention.v_proj.bias.numel()) * 4
    assert mlp.up_proj.weight.data_ptr() == mlp.packed_gate_up[0][mlp.gate_proj.weight.shape[0]:].data_ptr()


def test_load_state_dict_into_a_packed_model_reaches_the_packed_matrices(checkpoint_factory):
    """Copying weights in by name (load_state_dict, the loader) writes through the views into the packed GEMM."""
    family, overrides = CONFIGS["qwen2-bias-gqa5"]
    first, _ = load_model(checkpoint_factory(family, **overrides), progress=False)
    other, _ = load_model(checkpoint_factory(family, seed=1, **overrides), progress=False)
    tokens = torch.randint(0, first.config.vocab_size, (21,)).tolist()
    expected = our_logits(other, tokens)
    first.pack_projections()
    first.load_state_dict(other.state_dict())
    assert (our_logits(first, tokens) - expected).abs().max().item() < ATOL


def test_engine_with_packed_projections_generates_transformers_greedy_tokens(hf_twin_factory):
    path, hf = hf_twin_factory("qwen2", num_attention_heads=10, num_key_value_heads=2, head_dim=12)
    generator = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, 512, (n,), generator=generator).tolist() for n in (5, 17, 40, 9, 26, 12)]
    reference = [hf_greedy(hf, prompt, 12) for prompt in prompts]
    # A small budget chunks the prompts: prefill chunks and decodes run through the packed GEMMs together.
    llm = LLM(str(path), device="cpu", max_num_seqs=4, max_num_batched_tokens=16, max_model_len=128,
              pack_projections=True)
    assert llm.engine.runner.pack_projections and layer0(llm.engine.model)[0].packed_qkv is not None
    outputs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=12), use_tqdm=False)
    ours = [out.outputs[0].token_ids for out in outputs]
    assert_greedy_agree(prompts, ours, reference, hf_next_token_logits(hf))


def test_packing_defaults_on_for_the_cpu_and_can_be_switched_off(checkpoint_factory):
    path = checkpoint(checkpoint_factory, "llama-gqa3")
    assert LLM(str(path), device="cpu", max_model_len=64).engine.runner.pack_projections
    off = LLM(str(path), device="cpu", max_model_len=64, pack_projections=False)
    assert not off.engine.runner.pack_projections and layer0(off.engine.model)[0].packed_qkv is None


def test_cpu_float32_packing_stores_every_projection_column_major(checkpoint_factory):
    """On the CPU in float32 the packed matrices and o_proj / down_proj are column-major (MKL's faster layout at
    decode sizes); unpacking gives row-major weights with the same values back."""
    model, _ = load_model(checkpoint(checkpoint_factory, "llama-gqa3"), progress=False)
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    model.pack_projections()
    attention, mlp = layer0(model)
    for linear in (attention.q_proj, attention.v_proj, attention.o_proj, mlp.up_proj, mlp.down_proj):
        assert linear.weight.stride(0) == 1 and not linear.weight.is_contiguous()
    assert attention.packed_qkv[0].t().is_contiguous() and mlp.packed_gate_up[0].t().is_contiguous()
    model.pack_projections(False)
    after = model.state_dict()
    assert all(after[name].is_contiguous() and torch.equal(after[name], before[name]) for name in before)
