"""Does FlashAttention 4 (`pip install flash-attn-4`, module flash_attn.cute) run on this GPU, on our cache layout?

One call of its paged varlen forward per case (decode, fresh prefill, a chunk over a cached prefix; page sizes 16
to 256; GQA with head_dim 128 and 64), each compared with a float32 einsum over the gathered pages, then the
time of a few large shapes. Prints one line per case: OK with the largest error, or FAIL with the reason.
Run it before trusting attention_backend="flash-attn" on a new card:

    python benchmarks/flash_attn_probe.py

Each new shape class compiles a kernel on its first call (seconds, printed as `first`); later calls are cached.
"""

from __future__ import annotations

import time

import torch


def reference(q, k_cache, v_cache, cu_q, context_lens, tables, page, scale):
    """Plain float32 attention of each sequence's new queries over its gathered pages (bottom-right causal)."""
    outs = []
    for b, n in enumerate(context_lens):
        queries = q[cu_q[b]:cu_q[b + 1]].float()  # [new, heads, dim]
        pages = tables[b][: -(-n // page)]
        keys = k_cache[pages].flatten(0, 1)[:n].float()  # [n, kv_heads, dim]
        values = v_cache[pages].flatten(0, 1)[:n].float()
        group = queries.shape[1] // keys.shape[1]
        keys, values = keys.repeat_interleave(group, 1), values.repeat_interleave(group, 1)
        scores = torch.einsum("qhd,khd->hqk", queries, keys) * scale
        query_pos = torch.arange(n - len(queries), n, device=q.device)[:, None]
        scores = scores.masked_fill(torch.arange(n, device=q.device)[None, :] > query_pos, float("-inf"))
        outs.append(torch.einsum("hqk,khd->qhd", scores.softmax(-1), values))
    return torch.cat(outs).to(q.dtype)


def paged_inputs(query_lens, context_lens, heads, kv_heads, dim, page, dtype):
    """Random queries and a paged cache whose pages are shuffled; unused page-table entries point at page 0."""
    torch.manual_seed(0)
    pages_per_seq = [-(-n // page) for n in context_lens]
    num_pages = sum(pages_per_seq) + 8
    k_cache = torch.randn(num_pages, page, kv_heads, dim, device="cuda", dtype=dtype)
    v_cache = torch.randn_like(k_cache)
    shuffled = (torch.randperm(num_pages - 1) + 1).int().tolist()
    tables = torch.zeros(len(context_lens), max(pages_per_seq), dtype=torch.int32)
    for b, count in enumerate(pages_per_seq):
        tables[b, :count] = torch.tensor(shuffled[:count], dtype=torch.int32)
        shuffled = shuffled[count:]
    q = torch.randn(sum(query_lens), heads, dim, device="cuda", dtype=dtype)
    cu_q = torch.tensor([0] + query_lens, dtype=torch.int32).cumsum(0, dtype=torch.int32)
    return q, k_cache, v_cache, cu_q.cuda(), tables.cuda()


def case(name, query_lens, context_lens, heads, kv_heads, dim, page, dtype=torch.bfloat16, check=True,
         time_it=False):
    from flash_attn.cute import flash_attn_varlen_func

    q, k_cache, v_cache, cu_q, tables = paged_inputs(query_lens, context_lens, heads, kv_heads, dim, page, dtype)
    used = torch.tensor(context_lens, dtype=torch.int32, device="cuda")
    scale = dim**-0.5

    def run():
        out = flash_attn_varlen_func(q, k_cache, v_cache, cu_seqlens_q=cu_q, max_seqlen_q=max(query_lens),
                                     seqused_k=used, page_table=tables, softmax_scale=scale, causal=True)
        return out[0] if isinstance(out, tuple) else out

    label = f"{name:28s} page={page:4d} dim={dim} heads={heads}/{kv_heads}"
    try:
        start = time.perf_counter()
        out = run()
        torch.cuda.synchronize()
        first = time.perf_counter() - start
        line = f"OK   {label} first={first:5.2f}s"
        if check:
            ref = reference(q, k_cache, v_cache, cu_q.tolist(), context_lens, tables.tolist(), page, scale)
            line += f" max_err={(out.float() - ref.float()).abs().max().item():.2e}"
        if time_it:
            ms = time_ms(run)
            kv_bytes = sum(context_lens) * kv_heads * dim * 2 * k_cache.element_size()
            line += f" {ms:.3f} ms, {kv_bytes / ms / 1e6:.0f} GB/s of KV"
        print(line, flush=True)
    except Exception as error:  # a probe reports and goes on to the next case
        print(f"FAIL {label}: {type(error).__name__}: {str(error)[:300]}", flush=True)


def time_ms(fn, warmup=3, repeats=20):
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeats * 1e3


def main():
    print("torch", torch.__version__, "CUDA", torch.version.cuda, torch.cuda.get_device_name(), flush=True)
    start = time.perf_counter()
    import flash_attn.cute  # noqa: F401  (its import loads the CuTe DSL's compiler: seconds)

    print(f"import flash_attn.cute {time.perf_counter() - start:.1f}s", flush=True)
    for dim, heads, kv_heads in [(128, 16, 8), (64, 9, 3)]:
        for page in [16, 64, 128, 256]:
            case("decode b=5", [1] * 5, [1, 17, 300, 64, 1000], heads, kv_heads, dim, page)
            case("prefill fresh", [7, 100, 33], [7, 100, 33], heads, kv_heads, dim, page)
            case("chunk over cached prefix", [50, 1, 128], [300, 65, 1000], heads, kv_heads, dim, page)
    for page in [16, 128, 256]:
        case("time decode 256 x 1024", [1] * 256, [1024] * 256, 16, 8, 128, page, check=False, time_it=True)
        case("time decode 256 x 4096", [1] * 256, [4096] * 256, 16, 8, 128, page, check=False, time_it=True)
        case("time prefill 8 x 1024", [1024] * 8, [1024] * 8, 16, 8, 128, page, check=False, time_it=True)
    case("decode float16", [1] * 5, [1, 17, 300, 64, 1000], 16, 8, 128, 16, dtype=torch.float16)


if __name__ == "__main__":
    main()
