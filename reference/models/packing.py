"""Packed projections: linears that read the same input (q/k/v, gate/up) run as one larger matrix multiply.

One GEMM over the stacked rows reads the input once and is one call (one kernel launch on a GPU) instead of
three; on the 2-core CPU VM that made SmolLM2's steps 1-2% shorter (benchmarks/RESULTS.md, issue 21): the
GEMMs were already efficient, the calls saved were what it cut. The nn.Linear layers stay, their parameters
views of the packed rows, so checkpoints, state_dict and load_state_dict keep Hugging Face's names.

On the CPU in float32 the packed matrix is also stored column-major (its [in, out] transpose contiguous, seen
as [out, in]): MKL's sgemm computed x @ W.T 1.1-2.5x faster that way at 5-45 rows, the decode steps' sizes, and
about as fast at 1 and 128 rows; the engine's throughput rose 7% (RESULTS.md, issue 21, 2026-12-01). The linears
that are not packed (o_proj, down_proj) get that layout too (use_gemm_layout). Same values, same names; only the
strides change.
Where MKL is available the CPU's GEMMs then multiply by MKL-packed copies instead (mkl_packed.py, set up by
the model's pack()), and these layouts serve as the fallback and the parameters' storage.
"""

from __future__ import annotations

import torch
from torch import nn

# Store packed weights column-major on the CPU in float32 (module-level so a benchmark can compare layouts).
COLUMN_MAJOR_ON_CPU = True


def gemm_layout(weight: torch.Tensor) -> torch.Tensor:
    """weight [out, in] laid out as this device's F.linear reads it fastest: column-major on the CPU in float32
    (see the module docstring), as it is elsewhere (a GPU's bf16 GEMM could round differently: not measured)."""
    if COLUMN_MAJOR_ON_CPU and weight.device.type == "cpu" and weight.dtype == torch.float32:
        return weight.t().contiguous().t()
    return weight


def pack_linears(linears: list[nn.Module]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Stack the weights (and biases) of linears that read the same input into one [sum of outs, in] matrix,
    and make each linear's parameters views of its rows: one copy of the weights, the same names.

    Pack once the model has its device and dtype: a later model.to(...) would give the views new storage and
    leave the packed matrix behind. Gradients do not reach the views through the packed matrix (inference only).
    """
    with torch.inference_mode(False), torch.no_grad():  # normal tensors even when called in inference mode
        weight = gemm_layout(torch.cat([linear.weight for linear in linears]))
        has_bias = linears[0].bias is not None
        bias = torch.cat([linear.bias for linear in linears]) if has_bias else None
        start = 0
        for linear in linears:
            rows = slice(start, start + linear.weight.shape[0])
            linear.weight = nn.Parameter(weight[rows], requires_grad=linear.weight.requires_grad)
            if has_bias:
                linear.bias = nn.Parameter(bias[rows], requires_grad=linear.bias.requires_grad)
            start = rows.stop
    return weight, bias


def use_gemm_layout(linear: nn.Module) -> None:
    """Give one linear's weight gemm_layout's layout (a copy on the CPU in float32; elsewhere nothing changes)."""
    with torch.inference_mode(False), torch.no_grad():
        weight = gemm_layout(linear.weight)
        if weight is not linear.weight:
            linear.weight = nn.Parameter(weight, requires_grad=linear.weight.requires_grad)


def unpack_linears(linears: list[nn.Module]) -> None:
    """Give each linear its own row-major weight again (a copy where the packed matrix was column-major), so an
    unpacked model computes exactly what it did before packing."""
    with torch.inference_mode(False), torch.no_grad():
        for linear in linears:
            if not linear.weight.is_contiguous():
                linear.weight = nn.Parameter(linear.weight.contiguous(), requires_grad=linear.weight.requires_grad)
