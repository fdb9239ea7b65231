"""The fused Triton kernels against their torch twins (llama.py / rotary.py): on CPU in the Triton interpreter
(float32, float16), on the GPU in bfloat16, to within one unit in the last place of the output dtype (RoPE
exactly, in the interpreter). The second round's kernel (residual add + RMSNorm) must give exactly the bits of the
kernels it replaces, composed: in the interpreter, compiled on the GPU
(the `gpu` test), and through a whole model's forward pass. tests/test_gpu.py checks the whole engine, fused
kernels on, against transformers."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")

from reference.models import fused  # noqa: E402  (after the skip: Triton is Linux-only)
from reference.models.llama import RMSNorm  # noqa: E402
from reference.models.rotary import apply_rotary  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.bfloat16] if DEVICE == "cuda" else [torch.float32, torch.float16]
ONE_ULP = {torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}


@pytest.mark.parametrize("dtype", DTYPES)
# 100: not a power of two; 1024 and 576: Qwen3-0.6B's and SmolLM2's hidden sizes.
@pytest.mark.parametrize("shape", [(5, 96), (3, 4, 64), (0, 128), (7, 100), (37, 16, 128), (9, 1024), (3, 576)])
def test_rms_norm_matches_the_torch_code(dtype, shape):
    generator = torch.Generator().manual_seed(0)
    x = (torch.randn(shape, generator=generator) * 3).to(DEVICE, dtype)
    norm = RMSNorm(shape[-1], 1e-6).to(DEVICE, dtype)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(shape[-1], generator=generator))
        expected = norm(x)
        got = fused.rms_norm(x, norm.weight, norm.eps)
    assert got.shape == expected.shape and got.dtype == dtype
    torch.testing.assert_close(got, expected, rtol=ONE_ULP[dtype], atol=ONE_ULP[dtype])


def rows_keep_their_bits_wherever_they_sit(dtype, device):
    """Short rows are normed several to a program (fused.NORM_ROW_ELEMENTS): a row's bits must not depend on where
    it falls in a program's tile, or a token's q/k-norm would differ between a decode step and a prefill."""
    generator = torch.Generator().manual_seed(9)
    for width in (128, 64, 40, 1024):  # 8, 16, 16 and 1 rows a program
        x = (torch.randn(37, width, generator=generator) * 3).to(device, dtype)
        weight = (torch.rand(width, generator=generator) + 0.5).to(device, dtype)
        whole = fused.rms_norm(x, weight, 1e-6)
        assert torch.equal(fused.rms_norm(x[5:], weight, 1e-6), whole[5:]), width  # shifted against the tiles
        assert torch.equal(fused.rms_norm(x[12:13], weight, 1e-6), whole[12:13]), width  # alone, as in decode


@pytest.mark.parametrize("dtype", DTYPES)
def test_a_rows_norm_does_not_depend_on_its_place_in_a_program(dtype):
    rows_keep_their_bits_wherever_they_sit(dtype, DEVICE)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_a_rows_norm_does_not_depend_on_its_place_in_a_program_compiled_on_the_gpu(dtype):
    rows_keep_their_bits_wherever_they_sit(dtype, "cuda")


@pytest.mark.parametrize("dtype", DTYPES)
# head_dim 24 and 96: halves that are not powers of two (the kernel masks its block down to them).
@pytest.mark.parametrize("heads, head_dim", [(4, 64), (3, 128), (2, 16), (9, 64), (6, 24), (2, 96)])
def test_rotary_matches_the_torch_code(dtype, heads, head_dim):
    generator = torch.Generator().manual_seed(1)
    num_tokens = 6
    x = torch.randn(num_tokens, heads, head_dim, generator=generator).to(DEVICE, dtype)
    angles = torch.rand(num_tokens, 1, head_dim // 2, generator=generator) * 100
    angles = torch.cat((angles, angles), dim=-1).to(DEVICE)
    expected = apply_rotary(x, angles.cos(), angles.sin())
    got = fused.apply_rotary(x, angles.cos(), angles.sin())
    if DEVICE == "cpu":
        assert torch.equal(got, expected)
    else:  # compiled for the GPU, some elements land one bfloat16 unit away (see fused.py)
        torch.testing.assert_close(got, expected, rtol=ONE_ULP[dtype], atol=ONE_ULP[dtype])


def test_rotary_rejects_an_odd_head_dim():
    with pytest.raises(ValueError, match="head_dim must be even"):
        fused.apply_rotary(torch.zeros(1, 1, 25, device=DEVICE), torch.zeros(1, 1, 25, device=DEVICE),
                           torch.zeros(1, 1, 25, device=DEVICE))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(4, 300), (2049,), (0, 8)])
def test_silu_and_mul_matches_the_torch_code(dtype, shape):
    generator = torch.Generator().manual_seed(2)
    gate = (torch.randn(shape, generator=generator) * 4).to(DEVICE, dtype)
    up = torch.randn(shape, generator=generator).to(DEVICE, dtype)
    got = fused.silu_and_mul(gate, up)
    torch.testing.assert_close(got, F.silu(gate) * up, rtol=ONE_ULP[dtype], atol=ONE_ULP[dtype])


@pytest.mark.parametrize("rows_per_program", [1, 2, 16])  # powers of two (Triton block sizes)
def test_rotary_rows_per_program_changes_the_launch_not_the_result(rows_per_program):
    # The default packs many 128-element rows into one program; any packing must give the one-row launch's bits
    # (RoPE has no reduction whose order the packing could change).
    dtype = DTYPES[0]
    generator = torch.Generator().manual_seed(3)
    x = (torch.randn(13, 5, 128, generator=generator) * 3).to(DEVICE, dtype)
    angles = torch.rand(13, 1, 64, generator=generator) * 100
    angles = torch.cat((angles, angles), dim=-1).to(DEVICE)
    one_row = fused.apply_rotary(x, angles.cos(), angles.sin(), rows_per_program=1)
    assert torch.equal(fused.apply_rotary(x, angles.cos(), angles.sin(), rows_per_program=rows_per_program), one_row)
    assert torch.equal(fused.apply_rotary(x, angles.cos(), angles.sin()), one_row)


# The second round of fusion: each new kernel must give the bits of the kernels it replaces, composed (that is
# what keeps tests/test_gpu.py's agreement with transformers), and stay close to the torch code.

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(5, 96), (3, 4, 64), (0, 128), (7, 100), (9, 1024), (3, 576)])
def test_add_rms_norm_is_the_add_then_the_rms_norm_kernel(dtype, shape):
    generator = torch.Generator().manual_seed(4)
    x = torch.randn(shape, generator=generator).to(DEVICE, dtype)
    residual = (torch.randn(shape, generator=generator) * 8).to(DEVICE, dtype)
    norm = RMSNorm(shape[-1], 1e-6).to(DEVICE, dtype)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(shape[-1], generator=generator))
        total, normed = fused.add_rms_norm(x, residual, norm.weight, norm.eps)
        assert torch.equal(total, residual + x)
        assert torch.equal(normed, fused.rms_norm(residual + x, norm.weight, norm.eps))
        torch.testing.assert_close(normed, norm(residual + x), rtol=ONE_ULP[dtype], atol=ONE_ULP[dtype])


def one_kernel_per_op_path(model):
    """Switch a fused model back to the path before this round of fusion: torch's residual add, then the norm
    kernel."""
    model.model.fused = False


# Qwen3 (q/k-norm), Qwen3 with a head_dim whose half is not a power of two, Llama (RoPE only) with Llama 3 scaling.
MODEL_CONFIGS = {
    "qwen3": ("qwen3", {}),
    "qwen3-headdim40": ("qwen3", {"head_dim": 40, "num_attention_heads": 5, "num_key_value_heads": 1}),
    "llama3-rope": ("llama", {"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                               "high_freq_factor": 4.0, "original_max_position_embeddings": 32}}),
}


def three_forwards(model, lengths):
    """The model's hidden states of one packed batch (no cache): plain torch, fused, and fused as before this round.
    Leaves the model on the old path."""
    from reference.attention import build_metadata

    device = next(model.parameters()).device
    tokens = torch.randint(0, model.config.vocab_size, (sum(lengths),)).to(device)
    positions, metadata = build_metadata(lengths, None, None, None, device)

    def forward():
        with torch.inference_mode():
            return model(tokens, positions, metadata)

    plain = forward()
    model.use_fused_kernels(True)
    fused_forward = forward()
    one_kernel_per_op_path(model)
    return plain, fused_forward, forward()


@pytest.mark.parametrize("name", MODEL_CONFIGS)
def test_fused_forward_equals_one_kernel_per_op_and_the_torch_forward(checkpoint_factory, name):
    """Float32, random checkpoints: the fused layers (add + norm) give the bits of the path they
    replace, and stay within float32 rounding of the plain torch forward (the slow twin)."""
    from reference.models import load_model

    family, overrides = MODEL_CONFIGS[name]
    model, _ = load_model(checkpoint_factory(family, **overrides), device=DEVICE, progress=False)
    plain, fused_forward, before = three_forwards(model, [9, 1, 14])
    assert torch.equal(fused_forward, before)
    torch.testing.assert_close(fused_forward, plain, rtol=1e-4, atol=1e-4)


@pytest.mark.gpu
def test_bf16_fused_forward_gives_the_bits_of_one_kernel_per_op_on_the_gpu(checkpoint_factory):
    """The whole decoder compiled on the card in bfloat16, Qwen3-0.6B's layer shapes (4 layers): the hidden states
    of the fused forward are bit for bit those of the path before this round (what tests/test_gpu.py relies on)."""
    from reference.models import load_model

    shapes = dict(hidden_size=1024, intermediate_size=3072, num_attention_heads=16, num_key_value_heads=8,
                  head_dim=128, num_hidden_layers=4)
    model, _ = load_model(checkpoint_factory("qwen3", **shapes), device="cuda", dtype=torch.bfloat16, progress=False)
    _, fused_forward, before = three_forwards(model, [300, 1, 77, 1, 1, 16])
    assert torch.equal(fused_forward, before)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("num_tokens", [1, 13, 256, 8192])  # a decode token, odd and CUDA-graph batches, a prefill
def test_new_kernels_give_the_old_kernels_bits_compiled_on_the_gpu(dtype, num_tokens):
    """Compiled code may round or sum differently from the interpreter: bit equality on the card, in Qwen3-0.6B's
    hidden size, with residuals of growing size."""
    generator = torch.Generator().manual_seed(7)
    hidden = 1024
    x = torch.randn(num_tokens, hidden, generator=generator).to("cuda", dtype)
    residual = (torch.randn(num_tokens, hidden, generator=generator) * 30).to("cuda", dtype)
    weight = torch.rand(hidden, generator=generator).to("cuda", dtype) + 0.5
    total, normed = fused.add_rms_norm(x, residual, weight, 1e-6)
    assert torch.equal(total, residual + x)
    assert torch.equal(normed, fused.rms_norm(residual + x, weight, 1e-6))


# -- third round: q and k in one launch each, read in place from the packed q/k/v output -----------------------------
def packed_qkv(num_tokens, heads, kv_heads, head_dim, dtype, device=DEVICE, seed=3):
    """q, k, v as the packed projection leaves them: [tokens, heads, head_dim] views of one [tokens, sum] matrix."""
    generator = torch.Generator().manual_seed(seed)
    sizes = [heads * head_dim, kv_heads * head_dim, kv_heads * head_dim]
    qkv = (torch.randn(num_tokens, sum(sizes), generator=generator) * 2).to(device, dtype)
    q, k, v = qkv.split(sizes, dim=-1)
    return (q.view(num_tokens, heads, head_dim), k.view(num_tokens, kv_heads, head_dim),
            v.view(num_tokens, kv_heads, head_dim))


def pair_kernels_match_single_launches_on_copies(num_tokens, heads, kv_heads, head_dim, dtype, device=DEVICE):
    generator = torch.Generator().manual_seed(5)
    q, k, _ = packed_qkv(num_tokens, heads, kv_heads, head_dim, dtype, device)
    assert not q.is_contiguous() or num_tokens <= 1
    q_weight, k_weight = ((torch.rand(head_dim, generator=generator) + 0.5).to(device, dtype) for _ in range(2))
    q_normed, k_normed = fused.rms_norm_pair(q, q_weight, k, k_weight, 1e-6)
    assert torch.equal(q_normed, fused.rms_norm(q.contiguous(), q_weight, 1e-6))
    assert torch.equal(k_normed, fused.rms_norm(k.contiguous(), k_weight, 1e-6))
    assert torch.equal(fused.rms_norm(q, q_weight, 1e-6), q_normed)  # the single kernel reads views too
    angles = torch.randn(num_tokens, 1, head_dim, generator=generator).to(device)
    cos, sin = angles.cos(), angles.sin()
    q_rotated, k_rotated = fused.apply_rotary_pair(q, k, cos, sin)  # strided inputs (Llama: no q/k-norm)
    assert torch.equal(q_rotated, fused.apply_rotary(q.contiguous(), cos, sin))
    assert torch.equal(k_rotated, fused.apply_rotary(k.contiguous(), cos, sin))
    q_rotated, k_rotated = fused.apply_rotary_pair(q_normed, k_normed, cos, sin)  # contiguous inputs (Qwen3)
    assert torch.equal(k_rotated, fused.apply_rotary(k_normed, cos, sin))
    gate_up = (torch.randn(num_tokens, 2 * 48, generator=generator) * 3).to(device, dtype)
    gate, up = gate_up.chunk(2, dim=-1)
    assert torch.equal(fused.silu_and_mul(gate, up), fused.silu_and_mul(gate.contiguous(), up.contiguous()))


@pytest.mark.parametrize("dtype", DTYPES)
# Qwen3-0.6B's q/k heads; an odd GQA group with head_dim 64; a head_dim whose half is not a power of two.
@pytest.mark.parametrize("num_tokens, heads, kv_heads, head_dim", [(7, 16, 8, 128), (3, 9, 3, 64), (5, 5, 1, 40),
                                                                    (1, 4, 2, 16), (0, 4, 2, 16)])
def test_pair_launches_and_strided_views_give_the_single_kernels_bits(dtype, num_tokens, heads, kv_heads, head_dim):
    pair_kernels_match_single_launches_on_copies(num_tokens, heads, kv_heads, head_dim, dtype)


def test_pair_kernels_refuse_mismatched_tensors():
    q, k, _ = packed_qkv(3, 4, 2, 16, torch.float32)
    with pytest.raises(ValueError, match="row length"):
        fused.rms_norm_pair(q, torch.ones(16, device=DEVICE), k[..., :8], torch.ones(8, device=DEVICE), 1e-6)
    with pytest.raises(ValueError, match="share tokens"):
        fused.apply_rotary_pair(q, k[:2], torch.ones(3, 1, 16, device=DEVICE), torch.ones(3, 1, 16, device=DEVICE))
    with pytest.raises(ValueError, match="one shape"):
        fused.silu_and_mul(torch.ones(2, 4, device=DEVICE), torch.ones(2, 3, device=DEVICE))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("num_tokens", [1, 13, 256, 8192])
def test_pair_launches_give_the_single_kernels_bits_compiled_on_the_gpu(dtype, num_tokens):
    """Compiled for the card, Qwen3-0.6B's heads (16 / 8 of 128) and SmolLM2's (9 / 3 of 64)."""
    pair_kernels_match_single_launches_on_copies(num_tokens, 16, 8, 128, dtype, "cuda")
    pair_kernels_match_single_launches_on_copies(num_tokens, 9, 3, 64, dtype, "cuda")
