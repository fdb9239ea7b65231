"""Programmatic dependent launch (PDL): let a kernel start while the one before it finishes (Hopper and later).

A decode step is ~330 small kernels; each one waits for the previous to end, then pays its own launch and ramp-up
(a few microseconds) before its first load. With PDL the GPU may schedule a kernel's programs early; the kernel
then waits (`griddepcontrol.wait`) until the previous kernel has finished and its writes are visible, and only
then reads that kernel's output. Work that needs nothing from it (index math, loading weights) runs before the
wait, overlapped with the previous kernel's tail. Right after the wait each kernel allows the next one to launch.

Correctness rests on every PDL kernel waiting before it reads anything an earlier kernel wrote, and before it
writes anything: the wait covers the whole chain, since the previous kernel itself waited for its own previous.
Kernels launched without PDL (cuBLAS, torch's) are ordered as usual.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

# Off: every kernel launched as before (module-level so a benchmark can compare).
ENABLED = True


@functools.cache
def _capable(device_index: int) -> bool:
    return torch.cuda.get_device_capability(device_index)[0] >= 9


def enabled_for(device: torch.device) -> bool:
    """Whether kernels on `device` launch with PDL: CUDA, compute capability 9.0 or later, ENABLED."""
    if not ENABLED or device.type != "cuda":
        return False
    return _capable(device.index if device.index is not None else torch.cuda.current_device())


def launch_options(use_pdl: bool) -> dict:
    """Keyword arguments for a Triton launch: launch_pdl only where used (the CPU interpreter has no PDL)."""
    return {"launch_pdl": True} if use_pdl else {}


@triton.jit
def wait_for_previous_kernel(USE_PDL: tl.constexpr):
    """Block until the previous kernel's writes are visible, then let the next kernel launch (PDL only)."""
    if USE_PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
