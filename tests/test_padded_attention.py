"""The CPU's padded attention backend (attention/padded.py) equals its slow twin, torch_ref, on random inputs."""

from __future__ import annotations

import pytest
import torch

from reference.attention import build_metadata, get_backend
from reference.attention.padded import PaddedAttentionBackend
from reference.attention.torch_ref import TorchAttentionBackend
from reference.kv.layout import blocks_for_tokens

TOLERANCE = dict(atol=1e-5, rtol=1e-5)  # float32; the two paths sum in different orders


def random_step(query_lens, context_lens, heads, kv_heads, head_dim, block_size, seed=0):
    """Random q/k/v for one step, caches holding random earlier K/V, and shuffled block tables."""
    generator = torch.Generator().manual_seed(seed)
    needed = [blocks_for_tokens(n, block_size) for n in context_lens]
    num_blocks = sum(needed) + 3  # a few blocks nobody owns
    order = torch.randperm(num_blocks, generator=generator).tolist()
    block_tables, used = [], 0
    for n in needed:
        block_tables.append(order[used:used + n])
        used += n
    shape = (num_blocks, block_size, kv_heads, head_dim)
    k_cache, v_cache = (torch.randn(shape, generator=generator) for _ in range(2))
    tokens = sum(query_lens)
    q = torch.randn(tokens, heads, head_dim, generator=generator)
    k, v = (torch.randn(tokens, kv_heads, head_dim, generator=generator) for _ in range(2))
    _, metadata = build_metadata(query_lens, context_lens, block_tables, block_size, "cpu")
    return q, k, v, k_cache, v_cache, metadata


def both(query_lens, context_lens, heads, kv_heads, head_dim, block_size, seed=0):
    q, k, v, k_cache, v_cache, metadata = random_step(query_lens, context_lens, heads, kv_heads, head_dim,
                                                      block_size, seed)
    scale = head_dim**-0.5
    ref_caches = (k_cache.clone(), v_cache.clone())
    expected = TorchAttentionBackend().forward(q, k, v, *ref_caches, metadata, scale)
    got = PaddedAttentionBackend().forward(q, k, v, k_cache, v_cache, metadata, scale)
    return got, expected, (k_cache, v_cache), ref_caches


@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (6, 2), (8, 1), (9, 3)])  # MHA, GQA, MQA, SmolLM2's
@pytest.mark.parametrize("head_dim", [64, 17])
@pytest.mark.parametrize("block_size", [1, 4, 16])
def test_mixed_step_equals_torch_ref(heads, kv_heads, head_dim, block_size):
    # decodes, a fresh prefill, chunks over a cached prefix (one ending mid-block), a one-token context
    query_lens = [1, 1, 23, 5, 1, 16, 1]
    context_lens = [9, 40, 23, 37, 1, 16 + block_size * 2 + 3, 17]
    got, expected, caches, ref_caches = both(query_lens, context_lens, heads, kv_heads, head_dim, block_size)
    torch.testing.assert_close(got, expected, **TOLERANCE)
    for cache, ref_cache in zip(caches, ref_caches):
        assert torch.equal(cache, ref_cache)  # the new K/V went to the same slots


@pytest.mark.parametrize("query_lens,context_lens", [
    ([1] * 12, [3, 70, 1, 16, 17, 33, 5, 9, 64, 2, 40, 31]),  # decodes only
    ([50], [50]),  # one fresh prompt
    ([7, 30, 2], [100, 30, 2]),  # prefills only, one over a long cached prefix
    ([1, 1, 1, 12, 30], [20, 7, 48, 12, 41]),  # the engine's usual order: decodes first, then chunks (row slices)
])
def test_decode_only_and_prefill_only_steps(query_lens, context_lens):
    got, expected, _, _ = both(query_lens, context_lens, 9, 3, 64, 16, seed=1)
    torch.testing.assert_close(got, expected, **TOLERANCE)


@pytest.mark.parametrize("seed", range(5))
def test_random_batches(seed):
    generator = torch.Generator().manual_seed(100 + seed)
    batch = int(torch.randint(1, 20, (), generator=generator))
    query_lens = [int(x) if x > 0 else 1 for x in torch.randint(-8, 40, (batch,), generator=generator)]
    context_lens = [n + int(torch.randint(0, 60, (), generator=generator)) for n in query_lens]
    got, expected, _, _ = both(query_lens, context_lens, 6, 2, 32, 8, seed=seed)
    torch.testing.assert_close(got, expected, **TOLERANCE)


def test_the_plan_is_built_once_per_step():
    q, k, v, k_cache, v_cache, metadata = random_step([1, 3], [5, 3], 4, 2, 16, 4)
    backend = PaddedAttentionBackend()
    backend.forward(q, k, v, k_cache, v_cache, metadata, 0.25)
    plan = backend._plan_of[1]
    backend.forward(q, k, v, k_cache, v_cache, metadata, 0.25)  # the next layer of the same step
    assert backend._plan_of[1] is plan
    _, next_metadata = build_metadata([1, 1], [6, 4], [[0, 1], [2]], 4, "cpu")
    backend.forward(q[:2], k[:2], v[:2], k_cache, v_cache, next_metadata, 0.25)
    assert backend._plan_of[1] is not plan and [g.batch for g in backend._plan_of[1].groups] == [2]


def test_auto_picks_padded_on_the_cpu_and_torch_stays_available():
    assert get_backend("auto", "cpu").name == "padded"
    assert get_backend("torch", "cpu").name == "torch"
    assert get_backend("padded", "cpu").name == "padded"


def test_padding_slots_are_skipped_like_torch_ref():
    q, k, v, k_cache, v_cache, metadata = random_step([1, 4, 1], [6, 9, 3], 6, 2, 16, 4, seed=3)
    metadata.slot_mapping[2] = -1  # a padding token: its K/V must not be written anywhere
    ref_caches = (k_cache.clone(), v_cache.clone())
    expected = TorchAttentionBackend().forward(q, k, v, *ref_caches, metadata, 0.25)
    got = PaddedAttentionBackend().forward(q, k, v, k_cache, v_cache, metadata, 0.25)
    torch.testing.assert_close(got, expected, **TOLERANCE)
    assert torch.equal(k_cache, ref_caches[0]) and torch.equal(v_cache, ref_caches[1])


def test_consecutive_rows_are_slices_and_the_mask_is_additive():
    """A group whose queries are consecutive rows of the step reads them as a view; the mask SDPA gets is the
    float form (0 / -inf) of the causal mask, made once a step instead of once a layer."""
    q, k, v, k_cache, v_cache, metadata = random_step([1, 1, 5, 3], [9, 4, 5, 10], 6, 2, 16, 4)
    backend = PaddedAttentionBackend()
    backend.forward(q, k, v, k_cache, v_cache, metadata, 0.25)
    decodes, prefills = backend._plan_of[1].groups
    assert decodes.rows == slice(0, 2) and prefills.rows == slice(2, 10)
    assert decodes.mask.dtype == q.dtype and set(decodes.mask.unique().tolist()) == {0.0, float("-inf")}
    # the decode of a 9-token context sees keys 0..8 of its padded 12 (three blocks of 4)
    assert (decodes.mask[0, 0, 0] == 0).tolist() == [True] * 9 + [False] * 3


def test_one_backend_over_steps_of_every_size_reuses_its_gather_buffers_correctly():
    """The gather buffers outlive a step: steps that need more, fewer, or differently shaped blocks than the last
    (another model's cache) still equal torch_ref, and a buffer large enough is kept, not reallocated."""
    backend = PaddedAttentionBackend()
    steps = [([1] * 3, [5, 9, 2], 9, 3, 64, 4), ([1] * 12 + [20], [40] * 12 + [60], 9, 3, 64, 4),
             ([1, 4], [3, 4], 9, 3, 64, 4), ([1, 1], [17, 30], 6, 2, 32, 8), ([2, 1], [2, 33], 9, 3, 64, 4)]
    for seed, (query_lens, context_lens, heads, kv_heads, head_dim, block_size) in enumerate(steps):
        q, k, v, k_cache, v_cache, metadata = random_step(query_lens, context_lens, heads, kv_heads, head_dim,
                                                          block_size, seed)
        ref_caches = (k_cache.clone(), v_cache.clone())
        expected = TorchAttentionBackend().forward(q, k, v, *ref_caches, metadata, head_dim**-0.5)
        kept = backend.buffers.k
        got = backend.forward(q, k, v, k_cache, v_cache, metadata, head_dim**-0.5)
        torch.testing.assert_close(got, expected, **TOLERANCE)
        if seed == 2:  # fewer blocks than the step before: the same buffer
            assert backend.buffers.k is kept


def run_engine_like_steps(steps: int, seed: int, block_size: int = 4, heads: int = 6, kv_heads: int = 2,
                          head_dim: int = 16, num_blocks: int = 64):
    """Random steps of an engine over one paged cache, run by one padded backend and by torch_ref (on its own
    copy of the cache); yields (got, expected) per step. Sequences join (prefilled in chunks), decode, skip
    steps, change order, finish, and get preempted: their blocks go back to the free list, other sequences
    reuse them, and they are prefilled again with NEW random K/V (a recomputation)."""
    generator = torch.Generator().manual_seed(seed)
    rand = lambda high: int(torch.randint(0, high, (), generator=generator))  # noqa: E731
    shape = (num_blocks, block_size, kv_heads, head_dim)
    caches = [torch.randn(shape, generator=generator) for _ in range(2)]
    ref_caches = [c.clone() for c in caches]
    free, seqs, next_id = list(range(num_blocks)), {}, 0  # seqs: id -> [prompt_len, computed, blocks]
    backend = PaddedAttentionBackend()
    for _ in range(steps):
        while len(seqs) < 6:  # new arrivals
            seqs[next_id] = [1 + rand(20), 0, []]
            next_id += 1
        chosen = [s for s in seqs if rand(5) > 0]  # some sit this step out
        chosen = [chosen[i] for i in torch.randperm(len(chosen), generator=generator).tolist()]
        query_lens, context_lens, tables = [], [], []
        for s in chosen:
            prompt, computed, blocks = seqs[s]
            n = 1 if computed >= prompt else min(prompt - computed, 1 + rand(8))
            needed = blocks_for_tokens(computed + n, block_size) - len(blocks)
            if needed > len(free):
                continue
            blocks.extend(free.pop(rand(len(free))) for _ in range(needed))
            seqs[s][1] = computed + n
            query_lens.append(n), context_lens.append(computed + n), tables.append(list(blocks))
        if not query_lens:
            continue
        tokens = sum(query_lens)
        q = torch.randn(tokens, heads, head_dim, generator=generator)
        k, v = (torch.randn(tokens, kv_heads, head_dim, generator=generator) for _ in range(2))
        _, metadata = build_metadata(query_lens, context_lens, tables, block_size, "cpu")
        got = backend.forward(q, k, v, *caches, metadata, head_dim**-0.5)
        yield got, TorchAttentionBackend().forward(q, k, v, *ref_caches, metadata, head_dim**-0.5)
        for s in list(seqs):
            prompt, computed, blocks = seqs[s]
            if computed >= prompt + 12 or rand(12) == 0:  # finished, or preempted (recomputed from scratch later)
                free.extend(blocks)
                if computed >= prompt + 12:
                    del seqs[s]
                else:
                    seqs[s] = [computed, 0, []]


@pytest.mark.parametrize("seed", range(3))
def test_one_backend_over_engine_like_steps_equals_torch_ref(seed):
    """The state a backend keeps between steps (its plan, its gather buffers) never leaks into the next step."""
    for got, expected in run_engine_like_steps(60, seed):
        torch.testing.assert_close(got, expected, **TOLERANCE)
