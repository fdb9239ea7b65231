"""The stand-alone rules lab 0.3 asks for (reference.paging's names, code in reference/kv/) agree with the engine that
applies them."""

from __future__ import annotations

import random

import pytest
import torch

from reference.attention import build_metadata
from reference.block_manager import BlockManager
from reference.paging import PrefixCache, block_hashes, slot_mapping
from reference.sampling import SamplingParams
from reference.sequence import Sequence


def test_slot_mapping_matches_build_metadata_for_a_prefill_chunk():
    table, block_size = [7, 2, 9, 4], 4
    positions, metadata = build_metadata([6], [14], [table], block_size, "cpu")
    assert torch.equal(slot_mapping(table, positions, block_size), metadata.slot_mapping)
    assert slot_mapping(table, torch.tensor([0, 3, 4, 13]), block_size).tolist() == [28, 31, 8, 17]


def test_slot_mapping_keeps_padding_and_rejects_positions_outside_the_table():
    assert slot_mapping([5], torch.tensor([-1, 1, -1]), 2).tolist() == [-1, 11, -1]
    with pytest.raises(ValueError):
        slot_mapping([5, 6], torch.tensor([4]), 2)  # block 2 of a 2-block table
    with pytest.raises(ValueError):
        slot_mapping([5, -1], torch.tensor([2]), 2)  # an unused (-1) entry


def test_block_hashes_are_the_hashes_the_block_manager_gives_full_blocks():
    manager = BlockManager(16, 4)
    tokens = list(range(100, 111))  # 2 full blocks and 3 tokens
    seq = Sequence("r", tokens, SamplingParams())
    manager.allocate(seq, len(tokens))
    table = manager.block_table(seq)
    assert block_hashes(tokens, 4) == [manager.prefix_cache.hash_of[b] for b in table[:2]]
    assert table[2] not in manager.prefix_cache.hash_of  # partly filled: not named


def test_block_hashes_chain_so_equal_blocks_after_different_prefixes_differ():
    a = block_hashes([1, 2, 3, 4, 5, 6], 3)
    b = block_hashes([9, 9, 9, 4, 5, 6], 3)
    assert len(a) == 2 and a[0] != b[0] and a[1] != b[1]
    assert block_hashes([1, 2, 3, 4, 5], 3) == a[:1]


def test_prefix_cache_lookup_matches_the_block_manager_on_random_prompts():
    rng = random.Random(0)
    manager = BlockManager(200, 4)
    cache = PrefixCache(4)
    for _ in range(60):
        prompt = [rng.randint(0, 2) for _ in range(rng.randint(1, 20))]
        seq = Sequence("r", prompt, SamplingParams())
        expected = manager.cached_prefix_len(seq)
        assert len(cache.lookup(prompt)) * 4 == expected
        if not manager.can_allocate(seq, len(prompt) - expected):
            break
        manager.allocate(seq, len(prompt) - expected)
        table = manager.block_table(seq)
        assert cache.lookup(prompt) == table[: expected // 4]
        cache.insert(prompt, table)


def test_prefix_cache_verifies_tokens_and_forgets_evicted_blocks():
    cache = PrefixCache(2)
    assert cache.insert([-1, 5, 6], [3, 4]) == 1  # one full block
    assert hash((None, (-1, 5))) == hash((None, (-2, 5)))  # CPython: hash(-1) == hash(-2)
    assert cache.lookup([-2, 5, 7]) == []  # same hash, other tokens: no hit
    assert cache.lookup([-1, 5, 7]) == [3]
    assert cache.evict(3) and not cache.evict(3)
    assert cache.lookup([-1, 5, 7]) == []


def _attention_benchmark():
    """benchmarks/attention_kernels.py as a module (lab 0.3's notebook 3 loads it the same way)."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "benchmarks" / "attention_kernels.py"
    spec = importlib.util.spec_from_file_location("attention_kernels", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.gpu
def test_attention_benchmark_functions_that_notebook_3_calls_run_and_report_bandwidth():
    bench = _attention_benchmark()
    copy_gbps = bench.copy_bandwidth()
    rows = bench.bench_decode(copy_gbps, [(8, 256, 16)])
    assert copy_gbps > 100 and rows
    for name, batch, context_len, _, ms, gbps, fraction in rows:
        assert (batch, context_len) == (8, 256) and ms > 0 and gbps > 0 and fraction == pytest.approx(gbps / copy_gbps)
    q, k_cache, v_cache, tables, lens = bench.paged_data(4, 100, 16)
    assert tables.shape == (4, 7) and lens.tolist() == [100] * 4 and q.shape == (4, bench.HEADS, bench.HEAD_DIM)
    assert bench.decode_bytes(4, 100) == 2 * 4 * 100 * bench.KV_HEADS * bench.HEAD_DIM * 2 + 2 * 4 * bench.HEADS * bench.HEAD_DIM * 2
    assert bench.time_ms(lambda: torch.ones(1, device="cuda"), warmup=1, samples=2, calls=2) > 0


