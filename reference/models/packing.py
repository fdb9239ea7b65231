"""Packed projections: linears that read the same input (q/k/v, gate/up) run as one larger matrix multiply.

One GEMM over the stacked rows reads the input once and is one call (one kernel launch on a GPU) instead of
three; on the 2-core CPU VM that made SmolLM2's steps 1-2% shorter (benchmarks/RESULTS.md, issue 21): the
GEMMs were already efficient, the calls saved were what it cut. The nn.Linear layers stay, their parameters
views of the packed rows, so checkpoints, state_dict and load_state_dict keep Hugging Face's names.
"""

from __future__ import annotations

import torch
from torch import nn


def pack_linears(linears: list[nn.Module]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Stack the weights (and biases) of linears that read the same input into one [sum of outs, in] matrix,
    and make each linear's parameters views of its rows: one copy of the weights, the same names.

    Pack once the model has its device and dtype: a later model.to(...) would give the views new storage and
    leave the packed matrix behind. Gradients do not reach the views through the packed matrix (inference only).
    """
    with torch.inference_mode(False), torch.no_grad():  # normal tensors even when called in inference mode
        weight = torch.cat([linear.weight for linear in linears])
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
