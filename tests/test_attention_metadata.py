"""build_metadata's vectorised positions and slot mapping equal the definition, computed token by token."""

from __future__ import annotations

import random

import torch

from reference.attention import build_metadata


def test_positions_and_slots_follow_the_definition():
    rng = random.Random(0)
    for _ in range(50):
        block_size = rng.choice([1, 2, 4, 16])
        batch = rng.randint(1, 6)
        context_lens = [rng.randint(1, 70) for _ in range(batch)]
        query_lens = [rng.randint(1, c) for c in context_lens]
        ids = list(range(1000))
        rng.shuffle(ids)
        tables = [[ids.pop() for _ in range(-(-c // block_size))] for c in context_lens]
        positions, metadata = build_metadata(query_lens, context_lens, tables, block_size, "cpu")
        expected_positions, expected_slots = [], []
        for n, ctx, table in zip(query_lens, context_lens, tables):
            for pos in range(ctx - n, ctx):
                expected_positions.append(pos)
                expected_slots.append(table[pos // block_size] * block_size + pos % block_size)
        assert positions.tolist() == expected_positions and positions.dtype == torch.int64
        assert metadata.slot_mapping.tolist() == expected_slots and metadata.slot_mapping.dtype == torch.int64
        assert metadata.context_lens.tolist() == context_lens and metadata.context_lens.dtype == torch.int32
        assert metadata.cu_seqlens_q.dtype == torch.int32
        assert metadata.cu_seqlens_q.tolist() == [sum(query_lens[:i]) for i in range(batch + 1)]
        assert metadata.block_tables.dtype == torch.int32 and metadata.block_tables.shape[0] == batch
        assert all(row[len(t):] == [-1] * (len(row) - len(t)) for row, t in zip(metadata.block_tables.tolist(), tables))
        # the page table for kernels that read past a sequence's blocks: the same, with block 0 for each -1
        assert metadata.page_table.dtype == torch.int32
        assert metadata.page_table.tolist() == [[max(b, 0) for b in row] for row in metadata.block_tables.tolist()]


def test_without_cache_positions_restart_at_zero():
    positions, metadata = build_metadata([3, 1, 2], None, None, None, "cpu")
    assert positions.tolist() == [0, 1, 2, 0, 0, 1]
    assert not metadata.uses_cache
