"""MKL-packed weights (models/mkl_packed.py): the packed product is F.linear's up to the order of the sums at every
row count, follows writes to the weight, is refused where it does not apply or does not match, and the packed
model gives the unpacked model's logits."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from reference.attention import build_metadata
from reference.models import load_model, mkl_packed

pytestmark = pytest.mark.skipif(not mkl_packed.mkl_available(), reason="torch built without MKL")

# Float32, sums of 64-1,536 products of unit-size numbers: only the summation order differs.
ATOL = 1e-4


@pytest.mark.parametrize("out_features, in_features", [(960, 576), (576, 1536), (300, 37)])
def test_packed_product_matches_f_linear_at_every_row_count(out_features, in_features):
    generator = torch.Generator().manual_seed(out_features)
    weight = torch.randn(out_features, in_features, generator=generator) / in_features**0.5
    bias = torch.randn(out_features, generator=generator)
    packed = mkl_packed.pack_weight(weight)
    assert packed is not None
    for rows in [*range(1, 50), 64, 127, 128, 129, 300]:  # packed for PACK_ROWS rows, used at any count
        x = torch.randn(rows, in_features, generator=generator)
        assert (packed(x, bias) - F.linear(x, weight, bias)).abs().max().item() < ATOL, rows
    x = torch.randn(2, 5, in_features, generator=generator)  # leading dimensions are rows too
    assert (packed(x) - F.linear(x, weight)).abs().max().item() < ATOL


def test_packed_copy_follows_in_place_writes_to_the_weight():
    weight = torch.randn(64, 32)
    packed = mkl_packed.pack_weight(weight)
    x = torch.randn(5, 32)
    weight[:10].mul_(-3.0)  # what load_state_dict does to a parameter: an in-place copy
    assert (packed(x) - F.linear(x, weight)).abs().max().item() < ATOL


def test_packing_is_refused_off_float32_and_when_the_product_does_not_match(monkeypatch):
    assert mkl_packed.pack_weight(torch.randn(64, 32, dtype=torch.bfloat16)) is None
    assert mkl_packed.pack_weight(torch.randn(64, 32, dtype=torch.float64)) is None
    monkeypatch.setattr(mkl_packed.MklPackedWeight, "__call__", lambda self, x, bias=None: x.new_zeros(1, 64))
    assert mkl_packed.pack_weight(torch.randn(64, 32)) is None
    monkeypatch.undo()
    monkeypatch.setattr(mkl_packed, "MKL_PACKED_ON_CPU", False)
    assert mkl_packed.pack_weight(torch.randn(64, 32)) is None


def test_packed_model_gives_the_unpacked_logits_and_unpacks(checkpoint_factory):
    model, _ = load_model(checkpoint_factory("llama", tie_word_embeddings=True), progress=False)
    tokens = torch.randint(0, model.config.vocab_size, (29,)).tolist()

    def logits():
        positions, metadata = build_metadata([len(tokens)], None, None, None, "cpu")
        with torch.inference_mode():
            return model.compute_logits(model(torch.tensor(tokens), positions, metadata))

    unpacked = logits()
    model.pack_projections()
    attention, mlp = model.model.layers[0].self_attn, model.model.layers[0].mlp
    twins = (attention.mkl_qkv, attention.mkl_o, mlp.mkl_gate_up, mlp.mkl_down, model.mkl_lm_head)
    assert all(twin is not None for twin in twins)
    assert (logits() - unpacked).abs().max().item() < ATOL
    model.pack_projections(False)
    assert attention.mkl_qkv is None and model.mkl_lm_head is None and torch.equal(logits(), unpacked)
