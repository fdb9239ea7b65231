"""The Triton kernels compute what torch_ref computes, on random paged caches, for every layout we support.

Without CUDA the kernels run under Triton's interpreter (TRITON_INTERPRET=1, set below before the kernels are
imported), so this file also runs on the CPU; shapes stay small because the interpreter is slow. bfloat16
arithmetic is wrong in the interpreter, so bfloat16 cases are GPU-only. On a GPU every case runs compiled.

Tolerances (|triton - torch_ref| <= atol + rtol * |torch_ref|, both equal to the value below):
float32 1e-5 (the kernels' float32 dots are exact-precision, not tf32), float16 2e-3, bfloat16 2e-2.
"""

from __future__ import annotations

import itertools
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede the kernels' import (their @triton.jit)
pytest.importorskip("triton")

from reference.attention import build_metadata, torch_ref  # noqa: E402
from reference.attention import triton_ops  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}


def assert_matches(actual: torch.Tensor, expected: torch.Tensor) -> None:
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    tol = TOLERANCE[expected.dtype]
    torch.testing.assert_close(actual.float(), expected.float(), atol=tol, rtol=tol)


def random_paged_cache(context_lens, kv_heads, head_dim, block_size, dtype, spare_blocks=3):
    """Random K/V caches and block tables: shuffled block ids, a -1 column past the longest sequence.

    Every slot (also the unused ones) holds random values, so reading a wrong block changes the result.
    """
    blocks_needed = [-(-n // block_size) for n in context_lens]
    num_blocks = sum(blocks_needed) + spare_blocks
    shape = (num_blocks, block_size, kv_heads, head_dim)
    k_cache = torch.randn(shape, device=DEVICE).to(dtype)
    v_cache = torch.randn(shape, device=DEVICE).to(dtype)
    ids = torch.randperm(num_blocks).tolist()
    width = max(blocks_needed) + 1
    tables = []
    for n in blocks_needed:
        tables.append(ids[:n] + [-1] * (width - n))
        ids = ids[n:]
    block_tables = torch.tensor(tables, dtype=torch.int32, device=DEVICE)
    return k_cache, v_cache, block_tables, torch.tensor(context_lens, dtype=torch.int32, device=DEVICE)


def decode_case(context_lens, heads, kv_heads, head_dim, block_size, dtype):
    k_cache, v_cache, block_tables, lens = random_paged_cache(context_lens, kv_heads, head_dim, block_size, dtype)
    q = torch.randn(len(context_lens), heads, head_dim, device=DEVICE).to(dtype)
    cu_seqlens = torch.arange(len(context_lens) + 1, dtype=torch.int32, device=DEVICE)
    expected = torch_ref.paged_attention(q, k_cache, v_cache, block_tables, cu_seqlens, lens, head_dim**-0.5)
    return (q, k_cache, v_cache, block_tables, lens, head_dim**-0.5), expected


def prefill_case(query_lens, context_lens, heads, kv_heads, head_dim, block_size, dtype):
    k_cache, v_cache, block_tables, lens = random_paged_cache(context_lens, kv_heads, head_dim, block_size, dtype)
    q = torch.randn(sum(query_lens), heads, head_dim, device=DEVICE).to(dtype)
    cu = torch.tensor([0] + query_lens, device=DEVICE).cumsum(0).to(torch.int32)
    expected = torch_ref.paged_attention(q, k_cache, v_cache, block_tables, cu, lens, head_dim**-0.5)
    return (q, k_cache, v_cache, block_tables, cu, lens, head_dim**-0.5), expected


def edge_lengths(block_size: int) -> list[int]:
    """One token, a block minus one, exactly a block, a block plus one, several blocks."""
    return [1, block_size - 1, block_size, block_size + 1, 3 * block_size + 5]


# GQA ratios 1, 2, 3, 4, 8 and multi-query (one KV head).
HEAD_LAYOUTS = [(4, 4), (4, 2), (6, 2), (8, 2), (16, 2), (4, 1)]


# ---------------------------------------------------------------------------------------------------------
# store_kvcache
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("block_size, head_dim", [(16, 64), (32, 128), (16, 80)])
def test_store_writes_each_token_to_its_slot_and_skips_minus_one(dtype, block_size, head_dim):
    kv_heads, num_blocks = 2, 4
    k_cache = torch.randn(num_blocks, block_size, kv_heads, head_dim, device=DEVICE).to(dtype)
    v_cache = torch.randn_like(k_cache)
    slots = torch.randperm(num_blocks * block_size, device=DEVICE)[:7]
    slots[[1, 4]] = -1  # padding tokens
    k = torch.randn(7, kv_heads, head_dim, device=DEVICE).to(dtype)
    v = torch.randn_like(k)
    expected_k, expected_v = k_cache.clone(), v_cache.clone()
    torch_ref.store_kvcache(k, v, expected_k, expected_v, slots)

    triton_ops.store_kvcache(k, v, k_cache, v_cache, slots)
    assert torch.equal(k_cache, expected_k) and torch.equal(v_cache, expected_v)  # a copy: exact


def test_store_casts_to_the_cache_dtype_and_reads_strided_inputs():
    k_cache = torch.zeros(2, 16, 2, 64, dtype=torch.float16, device=DEVICE)
    v_cache = torch.zeros_like(k_cache)
    kv = torch.randn(5, 2, 2, 64, device=DEVICE)  # k and v as strided views of one tensor
    slots = torch.tensor([3, 17, -1, 0, 31], device=DEVICE)
    triton_ops.store_kvcache(kv[:, 0], kv[:, 1], k_cache, v_cache, slots)
    flat_k, flat_v = k_cache.view(-1, 2, 64), v_cache.view(-1, 2, 64)
    for token, slot in enumerate(slots.tolist()):
        if slot >= 0:
            assert torch.equal(flat_k[slot], kv[token, 0].half())
            assert torch.equal(flat_v[slot], kv[token, 1].half())
    assert int((flat_k != 0).any(dim=(1, 2)).sum()) == 4  # nothing else written


# ---------------------------------------------------------------------------------------------------------
# Decode
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("heads, kv_heads", HEAD_LAYOUTS)
def test_decode_matches_reference_for_each_gqa_ratio(heads, kv_heads, dtype):
    args, expected = decode_case(edge_lengths(16), heads, kv_heads, 64, 16, dtype)
    assert_matches(triton_ops.paged_decode_attention(*args), expected)


@pytest.mark.parametrize("block_size", [16, 32])
@pytest.mark.parametrize("head_dim", [64, 128, 96, 40])
def test_decode_matches_reference_for_block_sizes_and_head_dims(block_size, head_dim):
    args, expected = decode_case(edge_lengths(block_size), 6, 2, head_dim, block_size, torch.float32)
    assert_matches(triton_ops.paged_decode_attention(*args), expected)


@pytest.mark.parametrize("num_splits", [1, 2, 5])
def test_decode_splits_merge_to_the_same_result(num_splits):
    # With 5 splits the short contexts leave some splits empty; their weight must be zero.
    args, expected = decode_case([1, 20, 100, 170], 8, 2, 64, 16, torch.float32)
    assert_matches(triton_ops.paged_decode_attention(*args, num_splits=num_splits), expected)


@pytest.mark.parametrize("num_splits", [1, 3])
def test_decode_in_any_start_order_gives_the_same_bits(num_splits):
    # seq_order only changes which program starts first (longest context first, in the engine's CUDA graphs).
    args, expected = decode_case([7, 150, 1, 64, 33], 4, 2, 64, 16, torch.float32)
    in_batch_order = triton_ops.paged_decode_attention(*args, num_splits=num_splits)
    order = torch.tensor([1, 3, 4, 0, 2], dtype=torch.int32, device=DEVICE)
    assert torch.equal(triton_ops.paged_decode_attention(*args, num_splits=num_splits, seq_order=order),
                       in_batch_order)
    assert_matches(in_batch_order, expected)
    with pytest.raises(ValueError, match="permutation"):
        triton_ops.paged_decode_attention(*args, seq_order=order[:3])


@pytest.mark.parametrize("num_splits", [1, 3])
@pytest.mark.parametrize("heads, kv_heads", [(4, 2), (6, 3)])
def test_decode_grid_in_either_order_gives_the_same_bits(num_splits, heads, kv_heads):
    # The grid (kv_heads, batch, splits) only changes which programs run side by side; a split program must still
    # find its row of the partial outputs (it counts the KV heads on the grid's first axis, not its second).
    args, expected = decode_case([7, 150, 1, 64, 33], heads, kv_heads, 64, 16, torch.float32)
    tile_n, warps, stages = triton_ops._decode_launch_config(torch.float32, 64, num_splits)
    outputs = [triton_ops._launch_decode(*args, torch.empty_like(args[0]), num_splits=num_splits, tile_n=tile_n,
                                         num_warps=warps, num_stages=stages, heads_first=heads_first)
               for heads_first in (True, False)]
    assert torch.equal(outputs[0], outputs[1])
    assert_matches(outputs[0], expected)


def test_a_split_decode_launch_reads_wider_tiles():
    # Measured on an H200 (RESULTS.md, seventeenth session): a split launch's short slices run faster in longer tiles.
    for dtype in (torch.float32, torch.bfloat16):
        whole, split = (triton_ops._decode_launch_config(dtype, 128, n)[0] for n in (1, 4))
        assert split == triton_ops.SPLIT_TILE_FACTOR * whole


def test_cuda_graph_warmup_order_keeps_each_captured_size_inside_its_rows():
    # DecodeGraphs warms up and captures every size from one static [lengths; order] buffer, sliced to the size.
    # The kernel sends program i to sequence order[i], so each slice must be a permutation of its rows: an order
    # of all ones wrote the batch-of-one output's second row (past its end; on the card an illegal address).
    from reference.cuda_graphs import capture_sizes, warmup_lens_and_order

    sizes = capture_sizes(20)
    lens_and_order = warmup_lens_and_order(sizes[-1], DEVICE)
    k_cache, v_cache, _, _ = random_paged_cache([1], 2, 32, 16, torch.float32)
    for size in sizes:
        lens, order = lens_and_order[:, :size]
        assert sorted(order.tolist()) == list(range(size)) and lens.tolist() == [1] * size
        q = torch.randn(size, 4, 32, device=DEVICE)
        tables = torch.zeros(size, 4, dtype=torch.int32, device=DEVICE)  # the warm-up's: block 0 everywhere
        guarded = torch.full((size + 1, 4, 32), 7.0, device=DEVICE)  # one row past the output, a guard
        triton_ops.paged_decode_attention(q, k_cache, v_cache, tables, lens, 32**-0.5, out=guarded[:size],
                                          seq_order=order)
        cu_seqlens = torch.arange(size + 1, dtype=torch.int32, device=DEVICE)
        assert_matches(guarded[:size], torch_ref.paged_attention(q, k_cache, v_cache, tables, cu_seqlens, lens,
                                                                 32**-0.5))
        assert torch.all(guarded[size] == 7.0), f"batch of {size}: the kernel wrote past its output"


def test_cuda_graph_inputs_share_one_byte_buffer_without_overlap():
    # DecodeGraphs moves a step's token inputs (int64) and lengths / order (int32) in one copy of one byte buffer:
    # the views must tile it exactly, rows where the graph reads them, and a write to one never shows in another.
    from reference.cuda_graphs import INPUT_BYTES_PER_ROW, input_views

    rows = 5
    buffer = torch.zeros(INPUT_BYTES_PER_ROW * rows, dtype=torch.uint8)
    tokens, lens_and_order = input_views(buffer, rows)
    assert tokens.shape == (4, rows) and tokens.dtype == torch.int64
    assert lens_and_order.shape == (2, rows) and lens_and_order.dtype == torch.int32
    tokens.copy_(torch.arange(4 * rows).view(4, rows) - 2**40)  # every byte of the int64s non-zero-ish
    lens_and_order.copy_(torch.arange(2 * rows, dtype=torch.int32).view(2, rows) + 7)
    assert torch.equal(tokens, torch.arange(4 * rows).view(4, rows) - 2**40)
    assert torch.equal(lens_and_order, torch.arange(2 * rows, dtype=torch.int32).view(2, rows) + 7)
    copy = buffer.clone()  # the device's side of the one copy sees the same values through the same views
    assert torch.equal(input_views(copy, rows)[0], tokens) and torch.equal(input_views(copy, rows)[1], lens_and_order)


def test_decode_block_larger_than_tile_and_odd_block_size():
    # One block per sequence (the contiguous cache's layout): a tile covers only part of a block.
    for block_size in (128, 100):
        args, expected = decode_case([1, 70, 100], 4, 2, 64, block_size, torch.float16)
        assert_matches(triton_ops.paged_decode_attention(*args), expected)


def test_decode_writes_into_out_and_reads_strided_q():
    args, expected = decode_case([5, 33], 6, 2, 64, 16, torch.float32)
    q = args[0]
    qkv = torch.randn(2, 10, 64, device=DEVICE)
    qkv[:, 2:8] = q  # q as a strided view, like a slice of a fused qkv projection
    out = torch.full_like(q, float("nan"))
    result = triton_ops.paged_decode_attention(qkv[:, 2:8], *args[1:], out=out)
    assert result is out
    assert_matches(out, expected)  # also: no element left as NaN


def test_choose_num_splits_adapts_to_batch_and_context():
    device = torch.device("cuda" if DEVICE == "cuda" else "cpu")
    many_programs = 1024
    assert triton_ops.choose_num_splits(many_programs, 8, 4096, device) == 1
    few = triton_ops.choose_num_splits(1, 2, 1 << 16, device)
    assert few > 1
    assert few >= triton_ops.choose_num_splits(4, 2, 1 << 16, device)  # fewer sequences: at least as many
    short = triton_ops.choose_num_splits(1, 2, 300, device)
    assert short <= 2  # no split shorter than MIN_TOKENS_PER_SPLIT


# ---------------------------------------------------------------------------------------------------------
# Prefill
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("heads, kv_heads", HEAD_LAYOUTS)
def test_prefill_matches_reference_with_and_without_cached_prefix(heads, kv_heads, dtype):
    # Packed chunk: a fresh prompt (q_len == context), a chunk after a cached prefix, a single token, and a
    # prompt long enough to need several query tiles and KV tiles.
    query_lens = [17, 9, 1, 40]
    context_lens = [17, 9 + 23, 12, 40]
    args, expected = prefill_case(query_lens, context_lens, heads, kv_heads, 64, 16, dtype)
    assert_matches(triton_ops.paged_prefill_attention(*args), expected)


@pytest.mark.parametrize("block_size", [16, 32])
@pytest.mark.parametrize("head_dim", [64, 128, 96])
def test_prefill_matches_reference_for_block_sizes_and_head_dims(block_size, head_dim):
    query_lens = [block_size + 1, 3, block_size - 1]
    context_lens = [block_size + 1, 2 * block_size + 3, block_size - 1]
    args, expected = prefill_case(query_lens, context_lens, 6, 2, head_dim, block_size, torch.float32)
    assert_matches(triton_ops.paged_prefill_attention(*args, max_query_len=max(query_lens)), expected)


def test_prefill_writes_into_out():
    args, expected = prefill_case([4, 6], [4, 10], 4, 2, 64, 16, torch.float16)
    out = torch.full_like(args[0], float("nan"))
    assert triton_ops.paged_prefill_attention(*args, out=out) is out
    assert_matches(out, expected)


# ---------------------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------------------


def test_bad_inputs_raise_clear_errors():
    args, _ = decode_case([3], 6, 2, 64, 16, torch.float32)
    q, k_cache, v_cache, block_tables, lens, scale = args
    with pytest.raises(ValueError, match="multiple of kv_heads"):
        triton_ops.paged_decode_attention(q[:, :5], k_cache, v_cache, block_tables, lens, scale)
    with pytest.raises(TypeError, match="cast one to match"):
        triton_ops.paged_decode_attention(q.half(), k_cache, v_cache, block_tables, lens, scale)
    with pytest.raises(ValueError, match="int32"):
        triton_ops.paged_decode_attention(q, k_cache, v_cache, block_tables.long(), lens, scale)
    with pytest.raises(ValueError, match="head_dim"):
        big = torch.zeros(1, 16, 1, 512, device=DEVICE)
        triton_ops.store_kvcache(torch.zeros(1, 1, 512, device=DEVICE), torch.zeros(1, 1, 512, device=DEVICE),
                                 big, big.clone(), torch.zeros(1, dtype=torch.int64, device=DEVICE))


# ---------------------------------------------------------------------------------------------------------
# bfloat16 (GPU only: the interpreter's bfloat16 arithmetic is wrong)
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("block_size", [16, 32, 64])
@pytest.mark.parametrize("heads, kv_heads", HEAD_LAYOUTS + [(16, 8)])
def test_bf16_decode_and_prefill_match_reference(block_size, heads, kv_heads):
    lengths = edge_lengths(block_size) + [1000]
    args, expected = decode_case(lengths, heads, kv_heads, 128, block_size, torch.bfloat16)
    assert_matches(triton_ops.paged_decode_attention(*args), expected)
    assert_matches(triton_ops.paged_decode_attention(*args, num_splits=7), expected)
    query_lens = [block_size + 1, 5, 300]
    args, expected = prefill_case(query_lens, [block_size + 1, 700, 300], heads, kv_heads, 128, block_size,
                                  torch.bfloat16)
    assert_matches(triton_ops.paged_prefill_attention(*args), expected)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("head_dim", [64, 80, 128, 256])
def test_gpu_long_contexts_and_head_dims(dtype, head_dim):
    args, expected = decode_case([4096, 1, 2049, 513], 16, 8, head_dim, 16, dtype)
    assert_matches(triton_ops.paged_decode_attention(*args), expected)
    args, expected = prefill_case([512, 64], [512, 3000], 16, 8, head_dim, 16, dtype)
    assert_matches(triton_ops.paged_prefill_attention(*args), expected)


# ---------------------------------------------------------------------------------------------------------
# The backend inside a real (tiny, random) model
# ---------------------------------------------------------------------------------------------------------


def run_steps(model, backend, steps, kv_caches, block_size):
    """Run the model through `steps` [(query tokens per sequence, context lens, block tables)]; return the
    last-token logits of every step."""
    model.set_attention_backend(backend)
    logits = []
    for new_tokens, context_lens, tables in steps:
        query_lens = [len(t) for t in new_tokens]
        positions, metadata = build_metadata(query_lens, context_lens, tables, block_size, DEVICE)
        input_ids = torch.tensor([t for seq in new_tokens for t in seq], device=DEVICE)
        hidden = model(input_ids, positions, metadata, kv_caches)
        logits.append(model.compute_logits(hidden[metadata.cu_seqlens_q[1:].long() - 1]))
    return logits


@pytest.fixture(scope="module")
def tiny_qwen3(checkpoint_factory):
    from reference.models import load_model

    model, _ = load_model(checkpoint_factory("qwen3"), device=DEVICE, progress=False)
    return model


def paged_caches(model, num_blocks, block_size):
    config = model.config
    shape = (num_blocks, block_size, config.num_key_value_heads, config.head_dim)
    return [(torch.zeros(shape, device=DEVICE), torch.zeros(shape, device=DEVICE))
            for _ in range(config.num_hidden_layers)]


@torch.inference_mode()
def test_backend_matches_torch_backend_on_a_tiny_model_with_the_contiguous_cache(tiny_qwen3):
    from reference.kv_cache import ContiguousKVCache

    model = tiny_qwen3
    prompts = [[5, 9, 14, 2, 77], [3, 1, 4, 1, 5, 9, 2, 6, 5]]
    max_len = 13  # not a power of two: the contiguous cache's one block per row is max_len long
    results = []
    for backend in (torch_ref.TorchAttentionBackend(), triton_ops.TritonAttentionBackend()):
        cache = ContiguousKVCache(model.config, len(prompts), max_len, torch.float32, DEVICE)
        tables = [cache.block_table(i) for i in range(len(prompts))]
        steps = [(prompts, [len(p) for p in prompts], tables)]
        for step in range(3):  # teacher-forced decode: the same fixed tokens for both backends
            steps.append(([[10 + step], [20 + step]], [len(p) + step + 1 for p in prompts], tables))
        results.append(run_steps(model, backend, steps, cache.layers, cache.block_size))
    for expected, actual in zip(*results):
        torch.testing.assert_close(actual, expected, atol=1e-4, rtol=1e-4)


@torch.inference_mode()
def test_backend_matches_torch_backend_with_paged_blocks_and_a_mixed_batch(tiny_qwen3):
    model = tiny_qwen3
    block_size = 16
    tables = [[7, 2, 9], [4, 0]]
    chunk = list(range(30, 50))
    steps = [
        ([chunk[:12]], [12], tables[:1]),  # first chunk of sequence 0
        ([chunk[12:]], [20], tables[:1]),  # second chunk, over a cached prefix (crosses a block)
        ([[3], list(range(60, 78))], [21, 18], tables),  # a decode packed with a new prompt: prefill kernel
        ([[4], [5]], [22, 19], tables),  # pure decode: decode kernel
    ]
    results = [
        run_steps(model, backend, steps, paged_caches(model, 10, block_size), block_size)
        for backend in (torch_ref.TorchAttentionBackend(), triton_ops.TritonAttentionBackend())
    ]
    for expected, actual in zip(*results):
        torch.testing.assert_close(actual, expected, atol=1e-4, rtol=1e-4)


@torch.inference_mode()
def test_flash_backend_matches_torch_backend_on_fresh_mixed_and_decode_steps(tiny_qwen3):
    """The "flash" backend: a step of fresh prompts alone goes to FlashAttention (SDPA per sequence off the GPU),
    every other step to the paged kernels; the logits are the torch backend's at every step."""
    from reference.attention import FlashPrefillBackend

    model = tiny_qwen3
    block_size = 16
    tables = [[7, 2, 9], [4, 0], [5], [6]]
    chunk = list(range(30, 50))
    steps = [
        ([chunk[:12], list(range(60, 78))], [12, 18], tables[:2]),  # two fresh prompts: FlashAttention
        ([chunk[12:], [3]], [20, 19], tables[:2]),  # a chunk over a cached prefix and a decode: paged
        ([[4], [5], list(range(80, 87)), list(range(90, 95))], [21, 20, 7, 5], tables),  # mixed: paged
        ([[6], [7], [8], [9]], [22, 21, 8, 6], tables),  # pure decode
    ]
    results = [
        run_steps(model, backend, steps, paged_caches(model, 10, block_size), block_size)
        for backend in (torch_ref.TorchAttentionBackend(), FlashPrefillBackend(triton_ops.TritonAttentionBackend()))
    ]
    for expected, actual in zip(*results):
        torch.testing.assert_close(actual, expected, atol=1e-4, rtol=1e-4)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("heads, kv_heads, head_dim", [(16, 8, 128), (14, 2, 64), (12, 4, 80)])
def test_gpu_fresh_prefills_in_one_flash_launch(dtype, heads, kv_heads, head_dim):
    """sdpa.fresh_prefill_attention's one variable-length FlashAttention launch (grouped-query heads, packed
    sequences of uneven lengths) against torch_ref, sequence by sequence."""
    from reference.attention import fresh_prefill_attention
    from reference.attention.sdpa import flash_varlen_usable

    query_lens = [1, 300, 17, 129, 2]
    tokens = sum(query_lens)
    q = torch.randn(tokens, heads, head_dim, device=DEVICE).to(dtype)
    assert flash_varlen_usable(q)
    k, v = (torch.randn(tokens, kv_heads, head_dim, device=DEVICE).to(dtype) for _ in range(2))
    cu = torch.tensor([0] + list(itertools.accumulate(query_lens)), dtype=torch.int32, device=DEVICE)
    expected = torch_ref.varlen_attention(q, k, v, cu, head_dim**-0.5)
    assert_matches(fresh_prefill_attention(q, k, v, cu, query_lens, head_dim**-0.5), expected)


@torch.inference_mode()
def test_backend_without_cache_falls_back_to_varlen_attention(tiny_qwen3):
    model = tiny_qwen3
    positions, metadata = build_metadata([4, 6], None, None, None, DEVICE)
    input_ids = torch.arange(10, device=DEVICE)
    model.set_attention_backend(torch_ref.TorchAttentionBackend())
    expected = model(input_ids, positions, metadata, None)
    model.set_attention_backend(triton_ops.TritonAttentionBackend())
    actual = model(input_ids, positions, metadata, None)
    model.set_attention_backend(torch_ref.TorchAttentionBackend())
    assert torch.equal(actual, expected)


OLD_INTERPRETER_PROBE = r'''
import os
os.environ["TRITON_INTERPRET"] = "1"
import numpy, torch, triton, triton.language as tl
from triton.runtime import interpreter
from reference.triton_compat import patch_interpreter

newer = interpreter._patch_lang_tensor
def like_triton_3_6(tensor, scope):  # what Triton < 3.7 does: int() of a one-element array
    newer(tensor, scope)
    scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data))
interpreter._patch_lang_tensor = like_triton_3_6

@triton.jit
def count_blocks(n_ptr, out_ptr):
    acc = tl.zeros([1], tl.float32)
    for j in range(0, tl.cdiv(tl.load(n_ptr), 4)):
        acc += 1.0
    tl.store(out_ptr + tl.arange(0, 1), acc)

def run():
    out = torch.zeros(1)
    count_blocks[(1,)](torch.tensor([9], dtype=torch.int32), out)
    return out.item()

try:
    before = run()
except Exception as error:
    before = type(error).__name__
patch_interpreter()
print(numpy.__version__, before, run())
'''


def test_patch_interpreter_fixes_loaded_loop_bounds_of_older_tritons():
    """Triton 3.6 (torch 2.11's) under NumPy >= 2.4 fails every kernel whose loop bound is loaded; the patch
    (reference/triton_compat.py) makes the same kernel count 9 tokens in 3 blocks of 4."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", OLD_INTERPRETER_PROBE], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    numpy_version, before, after = done.stdout.split()
    assert float(after) == 3.0
    if tuple(int(part) for part in numpy_version.split(".")[:2]) >= (2, 4):
        assert before == "InterpreterError"  # the emulated old interpreter really fails without the patch
