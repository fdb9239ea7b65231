"""Paged attention kernels on one GPU: check them against torch_ref, then time them against two yardsticks.

    python benchmarks/attention_kernels.py [--quick] [--no-sweep] [--prefill-sweep]

1. Correctness (bfloat16): store, decode (with and without splits) and prefill against torch_ref.
2. Copy bandwidth: a large device-to-device copy, bytes read + bytes written over time. Decode is memory
   bound (each K/V byte is used by a handful of multiply-adds), so this is its practical ceiling.
3. Decode at Qwen3-0.6B's attention shape (16 query heads, 8 KV heads, head_dim 128, bf16) through a shuffled
   paged cache, next to torch's scaled_dot_product_attention on the same data laid out contiguously.
   Achieved bandwidth = (K + V of every context + Q + output bytes) / time, and its fraction of the copy.
4. A sweep of the decode kernel's tile configuration (TILE_N, num_warps, num_stages) at batch 256 x 1024.
5. Prefill (causal, fresh prompts and a chunk over a cached prefix) next to SDPA's causal path, and with
   --prefill-sweep a few prefill tile configurations.
Where FlashAttention 4 runs (`flash-attn-4` installed, a Hopper or datacenter Blackwell GPU), it is checked too and
gets rows in the decode and prefill tables, on the same paged data as our kernels: what the engine's
attention_backend="flash-attn" calls. Its decode rows are timed as CUDA-graph replays, as the engine runs decode
steps (its Python wrapper costs more host time per call than the kernel takes at small shapes), and once eager.

Times are CUDA-event medians over many iterations after a warm-up. Prints tables; copy them into
benchmarks/RESULTS.md with the card, date and command.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from reference.attention import flash_attn_pkg, torch_ref  # noqa: E402
from reference.attention import triton_ops  # noqa: E402

HEADS, KV_HEADS, HEAD_DIM = 16, 8, 128  # Qwen3-0.6B
DTYPE = torch.bfloat16


def time_ms(fn, warmup: int = 5, samples: int = 15, calls: int = 20) -> float:
    """Milliseconds per fn() call: the median over `samples` of (CUDA-event time of `calls` back-to-back
    calls) / calls, after `warmup` calls. Back-to-back calls keep the GPU busy while Python launches the next
    one, so the host's launch overhead stays out of the number, but only while one call's GPU work outlasts
    its launch: for calls shorter than that (small batches, ~0.13 ms on the H200 VM) this measures the host."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(samples):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(calls):
            fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / calls)
    return statistics.median(times)


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual.double() - expected.double()).norm() / expected.double().norm()).item()


def paged_data(batch: int, context_len: int, block_size: int, q_len: int = 1):
    """Random bf16 K/V for `batch` sequences of `context_len` tokens in a paged cache with shuffled blocks."""
    blocks_per_seq = -(-context_len // block_size)
    num_blocks = batch * blocks_per_seq
    shape = (num_blocks, block_size, KV_HEADS, HEAD_DIM)
    k_cache = torch.randn(shape, device="cuda", dtype=DTYPE)
    v_cache = torch.randn(shape, device="cuda", dtype=DTYPE)
    block_tables = torch.randperm(num_blocks, device="cuda").to(torch.int32).view(batch, blocks_per_seq)
    context_lens = torch.full((batch,), context_len, dtype=torch.int32, device="cuda")
    q = torch.randn(batch * q_len, HEADS, HEAD_DIM, device="cuda", dtype=DTYPE)
    return q, k_cache, v_cache, block_tables, context_lens


def contiguous_kv(cache: torch.Tensor, block_tables: torch.Tensor, context_len: int) -> torch.Tensor:
    """The same K (or V) as SDPA wants it: [batch, kv_heads, context_len, head_dim], contiguous."""
    batch = block_tables.shape[0]
    gathered = cache[block_tables.long()].reshape(batch, -1, KV_HEADS, HEAD_DIM)[:, :context_len]
    return gathered.transpose(1, 2).contiguous()


def sdpa_variants():
    """torch's SDPA with its automatic choice, and forced onto each fused backend (where it accepts GQA)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    yield "sdpa (auto)", None
    for name, backend in [("sdpa flash", SDPBackend.FLASH_ATTENTION), ("sdpa cudnn", SDPBackend.CUDNN_ATTENTION),
                          ("sdpa mem-efficient", SDPBackend.EFFICIENT_ATTENTION)]:
        yield name, (sdpa_kernel, backend)


def run_sdpa(context, q, k, v, causal):
    if context is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=True)
    manager, backend = context
    with manager(backend):
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=True)


def flash_attn_usable() -> bool:
    """FlashAttention 4 is installed and reads a paged cache on this card (flash_attn_pkg.unusable_reason)."""
    return flash_attn_pkg.unusable_reason(torch.device("cuda"), DTYPE) is None


def flash_attn_fn(q, k_cache, v_cache, block_tables, context_lens, q_len: int):
    """A call of FlashAttention 4 over the paged cache for `q_len` new tokens per sequence (the engine's flash-attn
    backend without its store); block_tables hold no -1 here, so they are the page table as they are."""
    cu = torch.arange(0, block_tables.shape[0] + 1, device="cuda", dtype=torch.int32) * q_len
    return lambda: flash_attn_pkg.paged_attention(q, k_cache, v_cache, block_tables, cu, context_lens, q_len,
                                                  HEAD_DIM**-0.5)


def graphed(fn):
    """fn recorded in a CUDA graph (after a warm-up call that compiles it): returns the replay. Raises what
    capture raises, e.g. for a kernel that synchronises with the host."""
    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def check_flash_attn() -> None:
    """FlashAttention 4 against torch_ref: decode and a mixed prefill, block sizes 16, 128 (one key tile) and 256."""
    print("== correctness of flash-attn-4 against torch_ref (bf16, relative error) ==")
    scale = HEAD_DIM**-0.5
    for block_size in (16, 128, 256):
        torch.manual_seed(0)
        q, k_cache, v_cache, block_tables, _ = paged_data(8, 1500, block_size)
        context_lens = torch.tensor([1, 15, 16, 17, 300, 999, 1024, 1500], dtype=torch.int32, device="cuda")
        cu = torch.arange(9, dtype=torch.int32, device="cuda")
        expected = torch_ref.paged_attention(q, k_cache, v_cache, block_tables, cu, context_lens, scale)
        decode = relative_error(flash_attn_fn(q, k_cache, v_cache, block_tables, context_lens, 1)(), expected)
        query_lens = [1, 15, 16, 17, 300, 200, 1024, 500]
        cu = torch.tensor([0] + query_lens, device="cuda").cumsum(0).to(torch.int32)
        qp = torch.randn(int(cu[-1]), HEADS, HEAD_DIM, device="cuda", dtype=DTYPE)
        expected = torch_ref.paged_attention(qp, k_cache, v_cache, block_tables, cu, context_lens, scale)
        out = flash_attn_pkg.paged_attention(qp, k_cache, v_cache, block_tables, cu, context_lens, 1024, scale)
        prefill = relative_error(out, expected)
        print(f"flash-attn-4 block_size {block_size:3d}: decode {decode:.2e}, prefill {prefill:.2e}")
        if max(decode, prefill) > 1e-2:
            raise SystemExit(f"flash-attn-4 relative error above 1e-2 at block_size {block_size}")


def flash_attn_decode_rows(data, copy_gbps: float, batch: int, context_len: int, block_size: int) -> list[tuple]:
    """FlashAttention 4's decode rows for one shape: as a CUDA-graph replay (how the engine runs decode), and eager."""
    fn = flash_attn_fn(*data, q_len=1)
    rows = []
    for name, timed in (("graph", lambda: graphed(fn)), ("eager", lambda: fn)):
        try:
            ms = time_ms(timed())
        except Exception as error:  # noqa: BLE001 - report a capture failure, keep the other rows
            print(f"  flash-attn-4 bs={block_size} {name}: failed ({type(error).__name__}: {str(error)[:120]})")
            continue
        gbps = decode_bytes(batch, context_len) / (ms * 1e-3) / 1e9
        rows.append((f"flash-attn-4 bs={block_size}, {name}", batch, context_len, "-", ms, gbps, gbps / copy_gbps))
    return rows


# ---------------------------------------------------------------------------------------------------------


def check_correctness() -> None:
    print("== correctness against torch_ref (bf16, relative error ||out - ref|| / ||ref||) ==")
    torch.manual_seed(0)
    scale = HEAD_DIM**-0.5
    worst = 0.0
    for block_size in (16, 256):
        q, k_cache, v_cache, block_tables, _ = paged_data(8, 1500, block_size)
        context_lens = torch.tensor([1, 15, 16, 17, 300, 999, 1024, 1500], dtype=torch.int32, device="cuda")
        cu = torch.arange(9, dtype=torch.int32, device="cuda")
        expected = torch_ref.paged_attention(q, k_cache, v_cache, block_tables, cu, context_lens, scale)
        for splits in (None, 1, 6):
            out = triton_ops.paged_decode_attention(q, k_cache, v_cache, block_tables, context_lens, scale,
                                                    num_splits=splits)
            err = relative_error(out, expected)
            worst = max(worst, err)
            print(f"decode   block_size {block_size:3d} splits {splits!s:>4}: {err:.2e}")
        query_lens = [1, 15, 16, 17, 300, 200, 1024, 500]
        cu = torch.tensor([0] + query_lens, device="cuda").cumsum(0).to(torch.int32)
        qp = torch.randn(int(cu[-1]), HEADS, HEAD_DIM, device="cuda", dtype=DTYPE)
        expected = torch_ref.paged_attention(qp, k_cache, v_cache, block_tables, cu, context_lens, scale)
        out = triton_ops.paged_prefill_attention(qp, k_cache, v_cache, block_tables, cu, context_lens, scale)
        err = relative_error(out, expected)
        worst = max(worst, err)
        print(f"prefill  block_size {block_size:3d}: {err:.2e}")
        k = torch.randn(64, KV_HEADS, HEAD_DIM, device="cuda", dtype=DTYPE)
        slots = torch.randperm(k_cache.shape[0] * block_size, device="cuda")[:64]
        slots[::7] = -1
        ref_k, ref_v = k_cache.clone(), v_cache.clone()
        torch_ref.store_kvcache(k, k, ref_k, ref_v, slots)
        triton_ops.store_kvcache(k, k, k_cache, v_cache, slots)
        exact = torch.equal(ref_k, k_cache) and torch.equal(ref_v, v_cache)
        print(f"store    block_size {block_size:3d}: {'exact' if exact else 'MISMATCH'}")
        if not exact:
            raise SystemExit("store_kvcache disagrees with torch_ref")
    if worst > 1e-2:
        raise SystemExit(f"relative error {worst:.2e} above 1e-2: not timing a wrong kernel")


def copy_bandwidth() -> float:
    """Device-to-device copy of 4 GiB: (bytes read + bytes written) / time, in GB/s."""
    src = torch.randn(1 << 30, device="cuda")  # 4 GiB of float32
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), warmup=3, samples=10, calls=5)
    del src, dst
    return 2 * (1 << 32) / (ms * 1e-3) / 1e9


def decode_bytes(batch: int, context_len: int) -> int:
    element = torch.empty((), dtype=DTYPE).element_size()
    kv = 2 * batch * context_len * KV_HEADS * HEAD_DIM * element
    q_and_out = 2 * batch * HEADS * HEAD_DIM * element
    return kv + q_and_out


def bench_decode(copy_gbps: float, shapes) -> list[tuple]:
    rows = []
    scale = HEAD_DIM**-0.5
    for batch, context_len, block_size in shapes:
        torch.manual_seed(0)
        q, k_cache, v_cache, block_tables, context_lens = paged_data(batch, context_len, block_size)
        out = torch.empty_like(q)
        splits = triton_ops.choose_num_splits(batch, KV_HEADS, context_len, q.device)
        fn = lambda: triton_ops.paged_decode_attention(  # noqa: E731
            q, k_cache, v_cache, block_tables, context_lens, scale, out=out, max_context_len=context_len)
        ms = time_ms(fn)
        gbps = decode_bytes(batch, context_len) / (ms * 1e-3) / 1e9
        rows.append((f"triton paged bs={block_size}", batch, context_len, splits, ms, gbps, gbps / copy_gbps))
        if flash_attn_usable():
            rows += flash_attn_decode_rows((q, k_cache, v_cache, block_tables, context_lens), copy_gbps, batch,
                                           context_len, block_size)
        if splits > 1:  # what the splits buy: the same kernel with one program per (sequence, kv_head)
            ms = time_ms(lambda: triton_ops.paged_decode_attention(
                q, k_cache, v_cache, block_tables, context_lens, scale, out=out, num_splits=1))
            gbps = decode_bytes(batch, context_len) / (ms * 1e-3) / 1e9
            rows.append(("  same, no split", batch, context_len, 1, ms, gbps, gbps / copy_gbps))

        if block_size == 16:  # one SDPA baseline per shape: its layout has no blocks
            k = contiguous_kv(k_cache, block_tables, context_len)
            v = contiguous_kv(v_cache, block_tables, context_len)
            q4 = q.view(batch, HEADS, 1, HEAD_DIM)
            expected = None
            for name, context in sdpa_variants():
                try:
                    result = run_sdpa(context, q4, k, v, causal=False)
                    if expected is None:
                        expected = result
                    ms = time_ms(lambda: run_sdpa(context, q4, k, v, causal=False))  # noqa: B023
                except RuntimeError as error:
                    print(f"  {name}: not available for this shape ({str(error).splitlines()[0][:80]})")
                    continue
                gbps = decode_bytes(batch, context_len) / (ms * 1e-3) / 1e9
                rows.append((f"{name}, contiguous", batch, context_len, "-", ms, gbps, gbps / copy_gbps))
            fn()
            torch.cuda.synchronize()
            print(f"  batch {batch} ctx {context_len}: triton vs sdpa relative difference "
                  f"{relative_error(out, expected.view_as(out)):.2e}")
            del k, v
        torch.cuda.empty_cache()
    return rows


def sweep_decode(copy_gbps: float, batch: int = 256, context_len: int = 1024, block_size: int = 16):
    """Time every decode tile configuration at one shape; return them sorted, fastest first."""
    torch.manual_seed(0)
    q, k_cache, v_cache, block_tables, context_lens = paged_data(batch, context_len, block_size)
    out = torch.empty_like(q)
    scale = HEAD_DIM**-0.5
    results = []
    for tile_n in (32, 64, 128):
        for num_warps in (4, 8):
            for num_stages in (1, 2, 3):
                def fn(tile_n=tile_n, num_warps=num_warps, num_stages=num_stages):
                    # the launcher behind paged_decode_attention, with the tile configuration made explicit
                    return triton_ops._launch_decode(
                        q, k_cache, v_cache, block_tables, context_lens, scale, out,
                        num_splits=1, tile_n=tile_n, num_warps=num_warps, num_stages=num_stages)
                try:
                    ms = time_ms(fn, warmup=3, samples=10, calls=10)
                except Exception as error:  # noqa: BLE001 - a config may not compile (shared memory)
                    print(f"  TILE_N {tile_n} warps {num_warps} stages {num_stages}: "
                          f"failed ({type(error).__name__})")
                    continue
                gbps = decode_bytes(batch, context_len) / (ms * 1e-3) / 1e9
                results.append((ms, gbps / copy_gbps, tile_n, num_warps, num_stages))
    results.sort()
    return results


def sweep_prefill(batch: int = 8, q_len: int = 2048):
    """Time a few prefill tile configurations on fresh prompts; return them sorted, fastest first."""
    torch.manual_seed(0)
    q, k_cache, v_cache, block_tables, context_lens = paged_data(batch, q_len, 16, q_len=q_len)
    cu = torch.arange(0, batch + 1, device="cuda", dtype=torch.int32) * q_len
    out = torch.empty_like(q)
    flops = 4 * HEADS * HEAD_DIM * batch * q_len * (q_len + 1) / 2
    results = []
    configs = [(64, 64, 4, 2), (64, 64, 4, 3), (128, 64, 8, 2), (128, 64, 8, 3), (128, 128, 8, 2),
               (64, 128, 4, 2), (128, 32, 4, 3), (128, 64, 4, 3)]
    for tile_m, tile_n, num_warps, num_stages in configs:
        def fn(tile_m=tile_m, tile_n=tile_n, num_warps=num_warps, num_stages=num_stages):
            return triton_ops._launch_prefill(
                q, k_cache, v_cache, block_tables, cu, context_lens, HEAD_DIM**-0.5, out, q_len,
                tile_m=tile_m, tile_n=tile_n, num_warps=num_warps, num_stages=num_stages)
        try:
            ms = time_ms(fn, warmup=3, samples=10, calls=5)
        except Exception as error:  # noqa: BLE001 - a config may not compile (shared memory)
            print(f"  prefill {tile_m}x{tile_n} warps {num_warps} stages {num_stages}: "
                  f"failed ({type(error).__name__})")
            continue
        results.append((ms, flops / (ms * 1e-3) / 1e12, tile_m, tile_n, num_warps, num_stages))
    results.sort()
    return results


def bench_prefill() -> list[tuple]:
    rows = []
    scale = HEAD_DIM**-0.5
    for batch, q_len, context_len in ((8, 2048, 2048), (8, 512, 4096)):
        torch.manual_seed(0)
        q, k_cache, v_cache, block_tables, context_lens = paged_data(batch, context_len, 16, q_len=q_len)
        cu = torch.arange(0, batch + 1, device="cuda", dtype=torch.int32) * q_len
        out = torch.empty_like(q)
        # causal FLOPs: QK^T and PV, 2 FLOPs per multiply-add, each query sees (prefix + its own position) keys
        keys_seen = batch * (q_len * (context_len - q_len) + q_len * (q_len + 1) / 2)
        flops = 4 * HEADS * HEAD_DIM * keys_seen
        ms = time_ms(lambda: triton_ops.paged_prefill_attention(
            q, k_cache, v_cache, block_tables, cu, context_lens, scale, out=out, max_query_len=q_len))
        rows.append(("triton paged bs=16", batch, q_len, context_len, ms, flops / (ms * 1e-3) / 1e12))
        if flash_attn_usable():  # its causal mask is bottom-right aligned: chunks over a prefix too
            ms = time_ms(flash_attn_fn(q, k_cache, v_cache, block_tables, context_lens, q_len))
            rows.append(("flash-attn-4 paged bs=16", batch, q_len, context_len, ms, flops / (ms * 1e-3) / 1e12))
        if q_len == context_len:  # SDPA's causal mask is top-left aligned: compare only fresh prompts
            k = contiguous_kv(k_cache, block_tables, context_len)
            v = contiguous_kv(v_cache, block_tables, context_len)
            q4 = q.view(batch, q_len, HEADS, HEAD_DIM).transpose(1, 2)
            ms = time_ms(lambda: run_sdpa(None, q4, k, v, causal=True))
            rows.append(("sdpa (auto), contiguous", batch, q_len, context_len, ms, flops / (ms * 1e-3) / 1e12))
        torch.cuda.empty_cache()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="only batch 256 x 1024, block sizes 16 and 256")
    parser.add_argument("--no-sweep", action="store_true", help="skip the decode tile-configuration sweep")
    parser.add_argument("--prefill-sweep", action="store_true", help="also sweep prefill tile configurations")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("this benchmark needs a CUDA GPU")
    import triton

    print(f"card: {torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}")
    check_correctness()
    if flash_attn_usable():
        check_flash_attn()
    else:
        print(f"flash-attn-4: no rows (attention_backend='flash-attn' "
              f"{flash_attn_pkg.unusable_reason(torch.device('cuda'), DTYPE)})")
    copy_gbps = copy_bandwidth()
    print(f"device-to-device copy: {copy_gbps:.0f} GB/s (read + write)")

    shapes = [(256, 1024, 16), (256, 1024, 256)]
    if not args.quick:
        shapes += [(256, 1024, 128), (256, 4096, 16), (256, 4096, 256), (16, 4096, 16), (4, 8192, 16)]
    rows = bench_decode(copy_gbps, shapes)
    print("\n== decode (one query token per sequence), bf16, 16 q heads / 8 kv heads / head_dim 128 ==")
    print(f"| {'kernel':<28} | batch | context | splits |     ms |   GB/s | of copy |")
    print(f"|{'-' * 30}|-------|---------|--------|--------|--------|---------|")
    for name, batch, context_len, splits, ms, gbps, fraction in rows:
        print(f"| {name:<28} | {batch:5d} | {context_len:7d} | {splits!s:>6} | {ms:6.3f} | {gbps:6.0f} | "
              f"{fraction:6.1%} |")

    if not args.no_sweep:
        results = sweep_decode(copy_gbps)
        print("\n== decode tile sweep, batch 256 x ctx 1024, block_size 16 (fastest first) ==")
        print("| TILE_N | num_warps | num_stages |     ms | of copy |")
        print("|--------|-----------|------------|--------|---------|")
        for ms, fraction, tile_n, num_warps, num_stages in results[:8]:
            print(f"| {tile_n:6d} | {num_warps:9d} | {num_stages:10d} | {ms:6.3f} | {fraction:6.1%} |")
        print(f"(default config: {triton_ops._decode_launch_config(DTYPE, HEAD_DIM)})")

    rows = bench_prefill()
    print("\n== prefill (causal), bf16, same heads ==")
    print(f"| {'kernel':<28} | batch | new tokens | context |     ms | TFLOP/s |")
    print(f"|{'-' * 30}|-------|------------|---------|--------|---------|")
    for name, batch, q_len, context_len, ms, tflops in rows:
        print(f"| {name:<28} | {batch:5d} | {q_len:10d} | {context_len:7d} | {ms:6.3f} | {tflops:7.1f} |")

    if args.prefill_sweep:
        results = sweep_prefill()
        print("\n== prefill tile sweep, 8 fresh prompts x 2048 tokens, block_size 16 (fastest first) ==")
        print("| TILE_M | TILE_N | num_warps | num_stages |     ms | TFLOP/s |")
        print("|--------|--------|-----------|------------|--------|---------|")
        for ms, tflops, tile_m, tile_n, num_warps, num_stages in results:
            print(f"| {tile_m:6d} | {tile_n:6d} | {num_warps:9d} | {num_stages:10d} | {ms:6.3f} | {tflops:7.1f} |")
        print(f"(default config: {triton_ops._prefill_launch_config(DTYPE, HEAD_DIM)})")


if __name__ == "__main__":
    main()
