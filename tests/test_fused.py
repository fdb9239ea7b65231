"""The fused Triton kernels against their torch twins (llama.py / rotary.py): on CPU in the Triton interpreter
(float32, float16), on the GPU in bfloat16, to within one unit in the last place of the output dtype (RoPE
exactly, in the interpreter). tests/test_gpu.py checks the whole engine, fused kernels on, against transformers."""

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
