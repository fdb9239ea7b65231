"""MKL's packed weights: CPU float32 GEMMs that read a weight laid out once for MKL's kernel, not once a call.

Before it multiplies, an sgemm call copies ("packs") its weight into the blocked order its kernel reads; with a
decode step's few rows that copy moves as many bytes as the product itself. MKL can pack a matrix once
(cblas_sgemm_pack) and multiply by the packed copy any number of times (cblas_sgemm_compute); torch exposes the
pair as torch.ops.mkl._mkl_reorder_linear_weight and torch.ops.mkl._mkl_linear, the ops torch.compile's freezing
pass uses on the CPU. On the 2-core VM that made SmolLM2's decode-only steps 14% shorter (22% on one thread)
and the engine 7% faster on issue 21's workload (RESULTS.md, issue 21, sixth session). The cost is a second copy
of the weights in memory (SmolLM2 in float32: 0.5 GB more): the packed one is in MKL's opaque format, and the
model keeps its own weights for state_dict, the GPU and every other path.

Two things the ops leave to their caller:
- _mkl_linear multiplies by the packed copy only when the input's row count equals the `batch_size` argument
  (else it runs F.linear on the plain weight); we pass each input's own row count. MKL sizes a packed weight by
  its own dimensions alone, not by the row count it was packed for, and `pack_weight` checks the product against
  F.linear at two row counts before it keeps a packed copy.
- A packed copy does not see later writes to its weight (load_state_dict copies in place), so it is packed again
  when the weight's version counter has moved.
Where MKL is missing (e.g. torch on an ARM Mac) nothing is packed and every linear stays F.linear.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# Pack CPU float32 weights for MKL (module-level so a benchmark can compare with and without).
MKL_PACKED_ON_CPU = True

PACK_ROWS = 64  # the row count MKL is told at packing: a hint for its blocking, not a limit (see the docstring)
CHECK_ROWS = (1, 37)  # row counts the packed product is compared with F.linear at, before it is used


def _version(weight: torch.Tensor) -> int:
    return 0 if weight.is_inference() else weight._version  # inference tensors keep no version counter


class MklPackedWeight:
    """A linear's weight [out, in] with its MKL-packed copy; call it as F.linear(x, weight, bias) would be."""

    def __init__(self, weight: torch.Tensor) -> None:
        self.weight = weight
        self.repack()

    def repack(self) -> None:
        with torch.inference_mode(False), torch.no_grad():
            self.packed = torch.ops.mkl._mkl_reorder_linear_weight(self.weight.detach().contiguous(), PACK_ROWS)
        self.version = _version(self.weight)

    def __call__(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """x: [..., in] float32 -> [..., out]."""
        if _version(self.weight) != self.version:  # written to since it was packed
            self.repack()
        return torch.ops.mkl._mkl_linear(x, self.packed, self.weight, bias, x.numel() // x.shape[-1])


def mkl_available() -> bool:
    if not torch.backends.mkl.is_available():
        return False
    try:
        torch.ops.mkl._mkl_linear, torch.ops.mkl._mkl_reorder_linear_weight  # noqa: B018 (a build may lack them)
    except (AttributeError, RuntimeError):
        return False
    return True


def pack_weight(weight: torch.Tensor) -> MklPackedWeight | None:
    """weight's MKL-packed twin, or None where it does not apply (not CPU float32, no MKL) or does not give
    F.linear's product."""
    if not (MKL_PACKED_ON_CPU and weight.device.type == "cpu" and weight.dtype == torch.float32 and mkl_available()):
        return None
    packed = MklPackedWeight(weight)
    with torch.no_grad():
        for rows in CHECK_ROWS:
            x = torch.randn(rows, weight.shape[1], generator=torch.Generator().manual_seed(rows))
            expected = F.linear(x, weight)
            # Only the order of the sums may differ (MKL's small-row kernels are not the packed one).
            tolerance = 1e-4 * (x.abs() @ weight.detach().abs().t()).max().item() + 1e-6
            if not torch.allclose(packed(x), expected, rtol=0, atol=tolerance):
                return None
    return packed


def pack_linear(linear: nn.Module) -> MklPackedWeight | None:
    """pack_weight of a plain nn.Linear's weight; None for any other module (a tensor-parallel layer's forward
    does more than the product)."""
    return pack_weight(linear.weight) if type(linear) is nn.Linear else None


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
           packed: MklPackedWeight | None) -> torch.Tensor:
    """F.linear(x, weight, bias), through weight's packed twin when there is one."""
    return F.linear(x, weight, bias) if packed is None else packed(x, bias)
