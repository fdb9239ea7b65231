"""Another version of the paged prefill kernel against this tree's: their outputs, and their time.

    git show 00adf02:reference/attention/triton_ops.py > /tmp/old_triton_ops.py
    python benchmarks/prefill_kernel_ab.py /tmp/old_triton_ops.py [--quick]

The other module is loaded from its file as a sibling of this tree's (its relative imports resolve here). Cases
at Qwen3-0.6B's attention shape (16 query heads, 8 KV heads, head_dim 128, bf16, block size 16), each compared
bit for bit between the two kernels (a restructured loop may round differently once compiled: the compiler
contracts multiply-adds its own way) and against torch_ref (max absolute difference), then timed as CUDA-graph
replays: fresh prompts, chunks over a cached prefix, and a prompt-running step as the engine runs them (8,192
tokens: a few prompt chunks beside 240 one-token decodes). On the CPU (TRITON_INTERPRET=1) --quick checks the
bits on small cases and times nothing.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from decode_gemms import graph_ms  # noqa: E402 (this folder is on the path when run as a script)
from reference.attention import torch_ref, triton_ops  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
HEADS, KV_HEADS, HEAD_DIM, BLOCK = 16, 8, 128, 16


def load_other(path: str):
    spec = importlib.util.spec_from_file_location("reference.attention.other_triton_ops", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def make_case(query_lens: list[int], context_lens: list[int], dtype: torch.dtype, heads: int = HEADS,
              kv_heads: int = KV_HEADS, head_dim: int = HEAD_DIM, seed: int = 0):
    """Packed queries and a paged cache with shuffled blocks; query b is the last query_lens[b] of its context."""
    generator = torch.Generator().manual_seed(seed)
    blocks = [-(-n // BLOCK) for n in context_lens]
    order = torch.randperm(sum(blocks), generator=generator)
    width = max(blocks)
    tables = torch.zeros(len(blocks), width, dtype=torch.int32)
    start = 0
    for row, n in enumerate(blocks):
        tables[row, :n] = order[start:start + n]
        start += n
    shape = (sum(blocks), BLOCK, kv_heads, head_dim)
    k = torch.randn(shape, generator=generator).to(dtype)
    v = torch.randn(shape, generator=generator).to(dtype)
    q = torch.randn(sum(query_lens), heads, head_dim, generator=generator).to(dtype)
    cu = torch.tensor([0] + query_lens).cumsum(0).to(torch.int32)
    lens = torch.tensor(context_lens, dtype=torch.int32)
    return [t.to(DEVICE) for t in (q, k, v, tables, cu, lens)] + [head_dim**-0.5, max(query_lens)]


def run(module, case) -> torch.Tensor:
    *tensors, scale, max_query_len = case
    return module.paged_prefill_attention(*tensors, scale, max_query_len=max_query_len)


def engine_step(seed: int = 0) -> tuple[list[int], list[int]]:
    """A prompt-running step as the engine packs one: 240 decodes, then prompt chunks filling 8,192 tokens, the
    first of them over a cached prefix."""
    generator = torch.Generator().manual_seed(seed)
    decode_contexts = torch.randint(100, 1500, (240,), generator=generator).tolist()
    chunks, contexts, left = [], [], 8192 - 240
    while left > 0:
        n = min(left, int(torch.randint(100, 1024, (1,), generator=generator)))
        prefix = 300 if not chunks else 0
        chunks.append(n)
        contexts.append(prefix + n)
        left -= n
    return [1] * 240 + chunks, decode_contexts + contexts


def flops(query_lens: list[int], context_lens: list[int]) -> float:
    """Causal attention's multiply-adds x 2 x (QK^T and PV): query i of a chunk sees prefix + i + 1 keys."""
    keys = sum(q * (c - q) + q * (q + 1) / 2 for q, c in zip(query_lens, context_lens))
    return 4 * HEADS * HEAD_DIM * keys


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("other", help="another triton_ops.py")
    parser.add_argument("--quick", action="store_true", help="small cases, bits only (for the interpreter)")
    args = parser.parse_args()
    other = load_other(args.other)
    if args.quick:
        cases = {"fresh, GQA 2": ([5, 33, 70], [5, 33, 70], torch.float16, {}),
                 "chunks over prefixes, GQA 3": ([1, 40, 17], [90, 100, 17], torch.float32,
                                                  dict(heads=6, kv_heads=2, head_dim=80))}
    else:
        cases = {"8 fresh prompts of 2,048": ([2048] * 8, [2048] * 8, torch.bfloat16, {}),
                 "8 chunks of 512 over 3,584": ([512] * 8, [4096] * 8, torch.bfloat16, {}),
                 "an engine step of 8,192 tokens": (*engine_step(), torch.bfloat16, {})}
    print("| case | bits equal | max abs diff to torch_ref | other ms | this tree ms | this tree TFLOP/s |\n"
          "|---|---|---|---|---|---|")
    for name, (query_lens, context_lens, dtype, shape) in cases.items():
        case = make_case(query_lens, context_lens, dtype, **shape)
        ours, theirs = run(triton_ops, case), run(other, case)
        *tensors, scale, _ = case
        expected = torch_ref.paged_attention(*tensors, scale)
        diff = (ours.float() - expected.float()).abs().max().item()
        timing = "| - | - | -"
        if DEVICE == "cuda":
            ms = [graph_ms(lambda m=m: run(m, case)) for m in (other, triton_ops)]
            timing = f"| {ms[0]:.3f} | {ms[1]:.3f} | {flops(query_lens, context_lens) / ms[1] / 1e9:.0f}"
        print(f"| {name} | {torch.equal(ours, theirs)} | {diff:.2e} {timing} |")


if __name__ == "__main__":
    main()
