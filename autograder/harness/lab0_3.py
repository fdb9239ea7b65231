"""Lab 0.3 (KV cache & attention): what runs beside learner code: the preamble, the references and the drivers.

The references are thin adapters over the `reference` engine: the paged block manager (allocation order,
reference counts), `reference.paging` (slot mapping, chained block hashes, the prefix cache) and the attention
paths (torch_ref, the Triton decode kernel, SDPA). Everything they need from `reference` is bound at import time,
so a grader that later hides those symbols from learner code does not break the stand-ins (the Triton kernel
excepted: see below; it is a stand-in for the notebook's `pick` only). The cases are in autograder/labs/lab0_3.py.

This module must not import triton: the grader's child imports it before the preamble, which sets
TRITON_INTERPRET so that the Triton exercise is graded in Triton's interpreter on every machine (CPU tensors, and
no need for the kernel's source file, which compiled Triton reads). The Triton exercise's expected values
therefore come from the PyTorch reference, and its stand-in imports the Triton kernels only when called.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from reference.attention.sdpa import fresh_prefill_attention as _fresh_prefill_attention
from reference.attention.torch_ref import paged_attention as _paged_attention
from reference.block_manager import BlockManager
from reference.paging import PrefixCache as _PrefixCache
from reference.paging import block_hashes as _block_hashes
from reference.paging import slot_mapping as _slot_mapping

# Exercise cells may rely on these imports and nothing else from their notebook.
PREAMBLE = """\
import math
import os
from collections import OrderedDict, deque
import torch
import torch.nn.functional as F
os.environ.setdefault("TRITON_INTERPRET", "1")  # graded in Triton's interpreter, on the CPU, on every machine
try:
    import triton
    import triton.language as tl
    from reference.triton_compat import patch_interpreter
    patch_interpreter()  # Triton < 3.7's interpreter under NumPy >= 2.4 (see reference/triton_compat.py)
except ImportError:  # Triton is Linux-only: stand-ins let a kernel be defined (running it then fails)
    import types
    triton, tl = types.SimpleNamespace(jit=lambda fn: fn), types.SimpleNamespace(constexpr=int)
"""


def _error(exc: BaseException) -> dict[str, str]:
    return {"error": f"{type(exc).__name__}: {exc}"}


# ============================================================================================================
# Notebook 1: paged memory
# ============================================================================================================


def ref_slot_mapping(block_table: list[int], positions: torch.Tensor, block_size: int) -> torch.Tensor:
    return _slot_mapping(block_table, positions, block_size)


def drive_slot_mapping(fn, inputs: dict[str, Any]) -> list[Any]:
    """One trace entry per call: the slots, or {"error": ...} when the call raised (NotImplementedError passes)."""
    trace = []
    for call in inputs["calls"]:
        try:
            trace.append(fn(call["block_table"], call["positions"], call["block_size"]))
        except NotImplementedError:
            raise
        except Exception as exc:
            trace.append(_error(exc))
    return trace


class ReferenceBlockAllocator:
    """The reference for exercise block_allocator: the engine's BlockManager pool behind the exercise's interface."""

    def __init__(self, num_blocks: int) -> None:
        self._manager = BlockManager(num_blocks, 1, enable_prefix_caching=False)

    def _block(self, block_id: int):
        if not 0 <= block_id < self._manager.num_blocks:
            raise ValueError(f"block {block_id} does not exist (blocks 0..{self._manager.num_blocks - 1})")
        return self._manager.blocks[block_id]

    def allocate(self) -> int:
        if not self._manager.num_free_blocks:
            raise RuntimeError("out of KV blocks")
        return self._manager.allocate_block()

    def share(self, block_id: int) -> int:
        block = self._block(block_id)
        if block.ref_count == 0:
            raise ValueError(f"block {block_id} is free: allocate it before sharing it")
        self._manager.share_block(block_id)
        return block.ref_count

    def free(self, block_id: int) -> bool:
        block = self._block(block_id)
        if block.ref_count == 0:
            raise ValueError(f"block {block_id} is already free (double free)")
        self._manager.release_block(block_id)
        return block.ref_count == 0

    def ref_count(self, block_id: int) -> int:
        return self._block(block_id).ref_count

    @property
    def num_free(self) -> int:
        return self._manager.num_free_blocks


def drive_block_allocator(cls: type, inputs: dict[str, Any]) -> list[Any]:
    """Build the allocator with inputs["num_blocks"], replay inputs["ops"]; one trace entry per op.

    allocate -> block id; share -> new ref count; free -> bool (back in the pool?); ref_count -> int;
    num_free -> int; an op that raises -> {"error": "Type: message"} (NotImplementedError propagates).
    """
    allocator = cls(inputs["num_blocks"])
    trace: list[Any] = []
    for op in inputs["ops"]:
        try:
            name = op["op"]
            if name == "allocate":
                trace.append(allocator.allocate())
            elif name == "num_free":
                trace.append(allocator.num_free)
            else:
                trace.append(getattr(allocator, name)(op["block"]))
        except NotImplementedError:
            raise
        except Exception as exc:
            trace.append(_error(exc))
    return trace


# ============================================================================================================
# Notebook 2: prefix sharing
# ============================================================================================================


def ref_block_hashes(token_ids: list[int], block_size: int) -> list[int]:
    return _block_hashes(token_ids, block_size)


def drive_block_hashes(fn, inputs: dict[str, Any]) -> list[Any]:
    """Hash every token list, then name each distinct hash by its order of first appearance (0, 1, 2, ...).

    Python's hash of None, hence of a chain that starts from None, differs between processes, so the grader
    compares which blocks got EQUAL names, not the numbers themselves: any chained hash that gives equal
    names exactly to equal prefixes passes. Hashes must be plain ints.
    """
    names: dict[int, int] = {}
    trace: list[Any] = []
    for tokens in inputs["token_lists"]:
        hashes = fn(list(tokens), inputs["block_size"])
        row: list[Any] = []
        for h in hashes:
            if type(h) is not int:
                row.append(f"a {type(h).__name__} (hashes must be Python ints)")
            else:
                row.append(names.setdefault(h, len(names)))
        trace.append(row)
    return trace


class ReferencePrefixCache(_PrefixCache):
    """The reference for exercise prefix_cache: reference.paging.PrefixCache (the block manager's rules)."""


def drive_prefix_cache(cls: type, inputs: dict[str, Any]) -> list[Any]:
    """Build the cache with inputs["block_size"], replay inputs["ops"]; one trace entry per op.

    insert -> int (blocks newly registered); lookup -> list of block ids; evict -> bool.
    """
    cache = cls(inputs["block_size"])
    trace: list[Any] = []
    for op in inputs["ops"]:
        try:
            if op["op"] == "insert":
                trace.append(cache.insert(list(op["tokens"]), list(op["blocks"])))
            elif op["op"] == "lookup":
                trace.append(list(cache.lookup(list(op["tokens"]))))
            else:
                trace.append(cache.evict(op["block"]))
        except NotImplementedError:
            raise
        except Exception as exc:
            trace.append(_error(exc))
    return trace


# ============================================================================================================
# Notebook 3: attention kernels
# ============================================================================================================


def ref_paged_attention_torch(q, k_cache, v_cache, block_tables, cu_seqlens_q, context_lens, scale):
    return _paged_attention(q, k_cache, v_cache, block_tables, cu_seqlens_q, context_lens, scale)


def ref_paged_decode_triton(q, k_cache, v_cache, block_tables, context_lens, scale):
    from reference.attention import triton_ops  # only now: see the module docstring

    return triton_ops.paged_decode_attention(q, k_cache, v_cache, block_tables, context_lens, scale)


def drive_paged_decode_triton(fn, inputs: dict[str, Any]) -> torch.Tensor:
    """Call the learner's launcher; on a GPU with compiled Triton (the notebook there), on CUDA copies.

    The grader's child always runs Triton's interpreter (the preamble sets TRITON_INTERPRET before triton is
    imported), which takes CPU tensors and needs no kernel source file.
    """
    args = list(inputs.values())
    if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        args = [a.cuda() if isinstance(a, torch.Tensor) else a for a in args]
        return fn(*args).cpu()
    return fn(*args)


def ref_sdpa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    return _fresh_prefill_attention(q, k, v, torch.tensor([0, q.shape[0]], dtype=torch.int32), [q.shape[0]],
                                         scale)
