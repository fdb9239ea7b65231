"""Lab 0.3 (KV cache & attention): its exercises and their test cases.

Like the harness, it must not import triton (see autograder/harness/lab0_3.py): the Triton exercise's expected
values come from the PyTorch reference.
"""

from __future__ import annotations

from collections import deque
from typing import Any

import torch

from reference.attention.torch_ref import paged_attention as _paged_attention

from ..compare import Close, Exact, Trace
from ..harness import lab0_3 as harness
from ..spec import Case, Exercise, Lab
from . import LAB_MEMORY_MB
from .draw import choice, integer

NOTEBOOK_1 = "01_paged_memory.ipynb"
NOTEBOOK_2 = "02_prefix_sharing.ipynb"
NOTEBOOK_3 = "03_attention_kernels.ipynb"


# ============================================================================================================
# Notebook 1: paged memory
# ============================================================================================================


def _slot_call(block_table, positions, block_size) -> dict[str, Any]:
    return {"block_table": list(block_table), "positions": torch.tensor(positions, dtype=torch.int64),
            "block_size": block_size}


def _random_slot_calls(g: torch.Generator) -> dict[str, Any]:
    calls = []
    for block_size in (1, 4, 16, 32):
        num_blocks = integer(g, 1, 9)
        table = torch.randperm(64, generator=g)[:num_blocks].tolist()
        positions = torch.randint(0, num_blocks * block_size, (20,), generator=g)
        positions[torch.rand(20, generator=g) < 0.2] = -1
        calls.append(_slot_call(table, positions.tolist(), block_size))
    return {"calls": calls}


SLOT_MAPPING = Exercise(
    name="slot_mapping", symbol="slot_mapping", notebook=NOTEBOOK_1,
    signature="slot_mapping(block_table: list[int], positions: Tensor, block_size: int) -> Tensor  "
              "# positions: int64 [n] (-1 = padding) -> int64 [n]",
    reference=harness.ref_slot_mapping, driver=harness.drive_slot_mapping,
    hides=("reference.kv.layout.slot_mapping",),
    cases=(
        Case("one_sequence", lambda g: {"calls": [_slot_call([7, 2, 9], list(range(10)), 4)]},
             Trace(Exact(), ("table [7, 2, 9], block_size 4, positions 0..9",)),
             "positions 0..3 live in block 7 (slots 28..31), 4..7 in block 2 (slots 8..11), 8..9 in block 9"),
        Case("any_order_and_padding", lambda g: {"calls": [_slot_call([3, 0, 5], [9, -1, 0, 4, -1, 11], 4)]},
             Trace(Exact(), ("positions [9, -1, 0, 4, -1, 11]",)),
             "positions come in any order; -1 marks padding and maps to slot -1; the result is int64"),
        Case("block_size_one_and_contiguous", lambda g: {"calls": [_slot_call([4, 1, 3], [0, 1, 2], 1),
                                                                   _slot_call([2], [0, 5, 63], 64)]},
             Trace(Exact(), ("block_size 1", "one block of 64 slots (the contiguous cache's row 2)")),
             "block_size 1 (slot = block id) and one big block per sequence (lab 0.1's contiguous cache)"),
        Case("position_outside_the_table", lambda g: {"calls": [_slot_call([6, 8], [8], 4),
                                                                _slot_call([6, -1], [5], 4),
                                                                _slot_call([6, 8], [7], 4)]},
             Trace(Exact(), ("position 8 with 2 blocks of 4", "position 5 whose table entry is -1",
                             "position 7 (fits)")),
             "a position whose block is past the table's end or -1 raises ValueError; the next call still works"),
        Case("empty", lambda g: {"calls": [_slot_call([1], [], 8), _slot_call([1], [3], 8)]},
             Trace(Exact(), ("no positions", "position 3 in block 1 of 8 slots")),
             "no positions: an empty int64 tensor; then position 3 of table [1] with block_size 8: slot 11"),
        Case("random_tables", _random_slot_calls, Trace(Exact()),
             "random block tables and positions (some padding) for block sizes 1, 4, 16, 32",
             visible=False, seed=1),
    ),
)


def _ops(*items) -> list[dict[str, Any]]:
    """("allocate",), ("free", 3) ... -> op dicts."""
    return [{"op": item[0]} if len(item) == 1 else {"op": item[0], "block": item[1]} for item in items]


def _allocator_states(num_blocks: int, ops: list[dict[str, Any]]) -> list[tuple[list[int], dict[int, int]]]:
    """The state before each op (the free queue, front first; the allocated blocks' ref counts), replaying the
    exercise's rules (tests/test_mutants.py checks the replay against the reference's trace)."""
    queue, refs = deque(range(num_blocks)), [0] * num_blocks
    states = []
    for op in ops:
        states.append((list(queue), {block: count for block, count in enumerate(refs) if count}))
        block = op.get("block")
        valid = block is not None and 0 <= block < num_blocks and refs[block] > 0
        if op["op"] == "allocate" and queue:
            refs[queue.popleft()] = 1
        elif op["op"] == "share" and valid:
            refs[block] += 1
        elif op["op"] == "free" and valid:
            refs[block] -= 1
            if not refs[block]:
                queue.append(block)
    return states


def _allocator_names(num_blocks: int, ops: list[dict[str, Any]]) -> tuple[str, ...]:
    """Step labels that also name the state before each step; for visible cases only (hidden ones get "step i")."""
    return tuple(f"step {i} of {len(ops)}, {op['op']}({op.get('block', '')}), when the free queue is {queue} (front "
                 f"first) and the allocated blocks' ref counts are {held}"
                 for i, (op, (queue, held)) in enumerate(zip(ops, _allocator_states(num_blocks, ops)), 1))


_FIFO_OPS = _ops(("allocate",), ("allocate",), ("allocate",), ("num_free",), ("free", 1), ("free", 0),
                 ("allocate",), ("allocate",), ("allocate",), ("allocate",), ("num_free",))
_SHARE_OPS = _ops(("allocate",), ("allocate",), ("share", 0), ("share", 0), ("ref_count", 0), ("free", 0),
                  ("num_free",), ("free", 0), ("ref_count", 0), ("free", 0), ("num_free",), ("allocate",))
_ERROR_OPS = _ops(("allocate",), ("free", 0), ("free", 0), ("share", 0), ("free", 7), ("ref_count", -1),
                  ("allocate",), ("allocate",), ("allocate",), ("num_free",), ("free", 1), ("allocate",))


def _random_allocator_ops(g: torch.Generator) -> dict[str, Any]:
    kinds = ("allocate", "allocate", "free", "free", "share", "ref_count", "num_free")
    ops = []
    for _ in range(120):
        kind = choice(g, kinds)
        ops.append({"op": kind} if kind in ("allocate", "num_free")
                   else {"op": kind, "block": integer(g, 0, 8)})
    return {"num_blocks": 6, "ops": ops}


BLOCK_ALLOCATOR = Exercise(
    name="block_allocator", symbol="BlockAllocator", notebook=NOTEBOOK_1,
    signature="class BlockAllocator: __init__(self, num_blocks); allocate() -> int; share(block_id) -> int; "
              "free(block_id) -> bool; ref_count(block_id) -> int; num_free -> int",
    reference=harness.ReferenceBlockAllocator, driver=harness.drive_block_allocator,
    hides=("reference.kv.block_manager.BlockManager",),
    cases=(
        Case("free_queue_order", lambda g: {"num_blocks": 4, "ops": _FIFO_OPS}, Trace(Exact(), _allocator_names(4, _FIFO_OPS)),
             "allocate hands out the block that has been free the longest: 0, 1, 2, then 3; blocks freed "
             "(1, then 0) join the back of the queue; a fifth allocate from an empty pool raises RuntimeError"),
        Case("shared_blocks_stay_out_of_the_pool", lambda g: {"num_blocks": 3, "ops": _SHARE_OPS},
             Trace(Exact(), _allocator_names(3, _SHARE_OPS)),
             "share adds a user (ref count 3 after two shares); free returns False and keeps the block out "
             "of the pool until its last user frees it; freeing a free block is an error"),
        Case("bad_calls_raise_value_error", lambda g: {"num_blocks": 3, "ops": _ERROR_OPS},
             Trace(Exact(), _allocator_names(3, _ERROR_OPS)),
             "double free, sharing a free block and ids outside [0, num_blocks) raise ValueError and change "
             "nothing: the pool keeps working"),
        Case("random_ops", _random_allocator_ops, Trace(Exact()),
             "120 random operations on 6 blocks (ids up to 7, so some are invalid)", visible=False, seed=2),
    ),
)


# ============================================================================================================
# Notebook 2: prefix sharing
# ============================================================================================================


_SYSTEM = [1, 415, 2683, 314, 253, 5356, 11173, 30, 2]  # a made-up system prompt's token ids


def _shared_prompts(g: torch.Generator) -> dict[str, Any]:
    lists = []
    for _ in range(6):
        suffix = torch.randint(0, 5, (integer(g, 0, 12),), generator=g).tolist()
        lists.append(_SYSTEM + suffix)
    return {"token_lists": lists, "block_size": 4}


_HASH_NAMES = ("; the check numbers distinct hashes 0, 1, 2, ... in order of first appearance, so 'expected 3, got 1' "
               "means your block repeats the hash first named 1 where a new one was due")

BLOCK_HASHES = Exercise(
    name="block_hashes", symbol="block_hashes", notebook=NOTEBOOK_2,
    signature="block_hashes(token_ids: list[int], block_size: int) -> list[int]  # one int per FULL block",
    reference=harness.ref_block_hashes, driver=harness.drive_block_hashes,
    hides=("reference.kv.prefix_cache.block_hashes",),
    cases=(
        Case("full_blocks_only", lambda g: {"token_lists": [[5, 6, 7, 8, 9, 10, 11], [5, 6, 7]],
                                            "block_size": 3},
             Exact(), "7 tokens in blocks of 3 have 2 full blocks (the 7th token's block is not full: no hash); "
                      "3 tokens have 1, equal to the first list's first block"),
        Case("chained_not_per_block", lambda g: {"token_lists": [[1, 2, 3, 4], [9, 9, 3, 4], [1, 2, 3, 4]],
                                                 "block_size": 2},
             Exact(), "block [3, 4] after [1, 2] and after [9, 9] must get DIFFERENT hashes (a hash names the "
                      "whole prefix); the same list hashed twice gives the same hashes" + _HASH_NAMES),
        Case("same_block_twice_in_one_list", lambda g: {"token_lists": [[7, 7, 7, 7, 7, 7]], "block_size": 2},
             Exact(), "[7, 7] three times in a row: three different hashes, since each has a different prefix"
                      + _HASH_NAMES),
        Case("shared_system_prompt", _shared_prompts, Exact(),
             "six prompts that start with the same 9-token system prompt (block_size 4): their first two blocks "
             "hash alike, later ones only where the prompts agree" + _HASH_NAMES, seed=3),
        Case("short_and_empty", lambda g: {"token_lists": [[], [4, 2], [4, 2, 0, 1], [5, 2, 0, 1, 3]],
                                           "block_size": 4},
             Exact(), "an empty list and a list shorter than one block have no full block: []; [4, 2, 0, 1] and "
                      "[5, 2, 0, 1, 3] have one full block each, with different hashes" + _HASH_NAMES),
        Case("block_size_one", lambda g: {"token_lists": [[3, 1, 4, 1, 5], [3, 1, 4, 1, 6], [1, 4]],
                                          "block_size": 1},
             Exact(), "block_size 1: one hash per token, each naming the prefix up to that token", visible=False),
        Case("random_lists", lambda g: {"token_lists": [torch.randint(0, 3, (int(n),), generator=g).tolist()
                                                        for n in torch.randint(0, 40, (12,), generator=g)],
                                        "block_size": 2},
             Exact(), "12 random lists over a 3-token alphabet (many shared prefixes)", visible=False, seed=4),
    ),
)


def _insert(tokens, blocks):
    return {"op": "insert", "tokens": list(tokens), "blocks": list(blocks)}


def _lookup(tokens):
    return {"op": "lookup", "tokens": list(tokens)}


def _evict(block):
    return {"op": "evict", "block": block}


def _cache_names(block_size: int, ops: list[dict[str, Any]], labels: tuple[str, ...]) -> tuple[str, ...]:
    """The labels, each followed by what is registered before that step (block id: its tokens, and where they sit
    in their sequence), replaying the exercise's rules with the reference's block hashes; visible cases only."""
    registered: dict[int, tuple[int, tuple[int, ...], int]] = {}  # block id -> (hash, its tokens, first position)
    names = []
    for label, op in zip(labels, ops):
        held = ", ".join(f"block {block} = {list(tokens)} at positions {start}..{start + len(tokens) - 1}"
                         for block, (_, tokens, start) in registered.items())
        names.append(f"{label} (registered before it: {held or 'nothing'})")
        if op["op"] == "insert":
            hashes = {h for h, _, _ in registered.values()}
            for j, (h, block) in enumerate(zip(harness.ref_block_hashes(op["tokens"], block_size), op["blocks"])):
                if h not in hashes and block not in registered:
                    registered[block] = (h, tuple(op["tokens"][j * block_size : (j + 1) * block_size]), j * block_size)
                    hashes.add(h)
        elif op["op"] == "evict":
            registered.pop(op["block"], None)
    return tuple(names)


_HIT_OPS = [_insert(range(10), [4, 9, 2]), _lookup(range(10)), _lookup([0, 1, 2, 3, 4, 5, 60, 61, 8, 9]),
            _lookup(range(9)), _lookup(range(5)), _lookup([0, 1, 2, 3, 9, 9, 9, 9, 9])]
_STOP_OPS = [_insert([1, 2, 3, 4, 5, 6, 7, 8], [0, 1]), _lookup([1, 2, 3, 4, 5, 6, 7, 8, 9]),
             _lookup([1, 2, 3, 4, 5, 6, 7, 8]), _lookup([1, 2, 3, 0, 5, 6, 7, 8, 9]),
             _insert([1, 2, 3, 4, 5, 6, 7, 8], [6, 7]), _insert([1, 2, 3, 4, 9, 9, 9, 9], [0, 3]),
             _lookup([1, 2, 3, 4, 9, 9, 9, 9, 1])]
_EVICT_OPS = [_insert([5] * 12, [3, 1, 4]), _evict(1), _lookup([5] * 13), _evict(1), _evict(8),
              _insert([5] * 12, [3, 2, 4]), _lookup([5] * 13)]
_ONE_PER_BLOCK_OPS = [_insert([1, 2, 3, 4, 5, 6, 7, 8], [0, 1]), _insert([9, 9, 9, 9], [1]), _lookup([9, 9, 9, 9, 0]),
                      _evict(1), _insert([9, 9, 9, 9], [1]), _lookup([9, 9, 9, 9, 0]),
                      _lookup([1, 2, 3, 4, 5, 6, 7, 8, 0])]
_COLLISION_OPS = [_insert([-1, 10, 11, -2, 12, 13], [0, 1]), _lookup([-2, 10, 11, 0]), _lookup([-1, 10, 11, 0]),
                  _lookup([-1, 10, 11, -1, 12, 13, 0])]


def _random_cache_ops(g: torch.Generator) -> dict[str, Any]:
    ops, next_block = [], 0
    for _ in range(60):
        kind = integer(g, 0, 3)
        tokens = torch.randint(0, 2, (integer(g, 1, 14),), generator=g).tolist()
        if kind == 0:
            blocks = list(range(next_block, next_block + len(tokens) // 3 + 1))
            next_block += len(blocks)
            ops.append(_insert(tokens, blocks))
        elif kind == 1:
            ops.append(_lookup(tokens))
        else:
            ops.append(_evict(integer(g, 0, max(1, next_block))))
    return {"block_size": 3, "ops": ops}


PREFIX_CACHE = Exercise(
    name="prefix_cache", symbol="PrefixCache", notebook=NOTEBOOK_2,
    signature="class PrefixCache: __init__(self, block_size); insert(token_ids, block_ids) -> int; "
              "lookup(token_ids) -> list[int]; evict(block_id) -> bool",
    reference=harness.ReferencePrefixCache, driver=harness.drive_prefix_cache, uses=("block_hashes",),
    hides=("reference.kv.prefix_cache.PrefixCache",),
    cases=(
        Case("hits_stop_at_the_first_miss", lambda g: {"block_size": 4, "ops": _HIT_OPS},
             Trace(Exact(), _cache_names(4, _HIT_OPS, (
                 "insert 10 tokens in blocks [4, 9, 2]", "lookup the same 10 tokens", "lookup: second block differs",
                 "lookup 9 tokens", "lookup 5 tokens", "lookup: same first block, then different"))),
             "the 10-token sequence registers its 2 full blocks (the third is partial); a lookup returns the "
             "leading cached blocks and stops at the first block that is not cached; store each block's tokens to "
             "compare them on lookup"),
        Case("last_token_is_never_cached", lambda g: {"block_size": 4, "ops": _STOP_OPS},
             Trace(Exact(), _cache_names(4, _STOP_OPS, (
                 "insert 8 tokens", "lookup 9 tokens", "lookup the same 8 tokens", "lookup: first block differs",
                 "insert the same tokens again in other blocks", "insert: first block shared, second new",
                 "lookup the new second block"))),
             "a lookup of exactly the cached 8 tokens finds only 1 block: the last token must be computed; the "
             "first block to register a prefix keeps it (a second insert adds nothing for it)"),
        Case("evict_forgets_a_block", lambda g: {"block_size": 4, "ops": _EVICT_OPS},
             Trace(Exact(), _cache_names(4, _EVICT_OPS, (
                 "insert 3 blocks", "evict block 1", "lookup after the eviction", "evict 1 again",
                 "evict a block never cached", "re-insert with block 2 in the middle", "lookup"))),
             "after evict(1) a lookup stops before the evicted block, even though the block after it is still "
             "cached; evicting an unknown block returns False"),
        Case("one_registration_per_block", lambda g: {"block_size": 4, "ops": _ONE_PER_BLOCK_OPS},
             Trace(Exact(), _cache_names(4, _ONE_PER_BLOCK_OPS, (
                 "insert 8 tokens in blocks [0, 1]", "insert [9, 9, 9, 9] in block 1 (still registered)",
                 "lookup [9, 9, 9, 9, 0]", "evict block 1", "insert [9, 9, 9, 9] in block 1 again",
                 "lookup [9, 9, 9, 9, 0]", "lookup the first 8 tokens and one more"))),
             "a physical block holds one registered block at a time: while block 1 holds [5, 6, 7, 8], inserting "
             "[9, 9, 9, 9] into it registers nothing; once evicted, it can be registered for the new tokens (and the "
             "old prefix then stops at block 0)"),
        Case("hash_collision_is_verified", lambda g: {"block_size": 3, "ops": _COLLISION_OPS},
             Trace(Exact(), _cache_names(3, _COLLISION_OPS, (
                 "insert [-1, 10, 11, -2, 12, 13]", "lookup [-2, 10, 11, 0]", "lookup [-1, 10, 11, 0]",
                 "lookup 7 tokens"))),
             "in CPython hash(-1) == hash(-2), so blocks [-1, 10, 11] and [-2, 10, 11] share a hash: a lookup "
             "must compare the stored tokens and treat the collision as a miss"),
        Case("random_ops", _random_cache_ops, Trace(Exact()),
             "60 random inserts, lookups and evictions over a 2-token alphabet", visible=False, seed=5),
    ),
)


# ============================================================================================================
# Notebook 3: attention kernels
# ============================================================================================================


def _paged_inputs(g: torch.Generator, query_lens: list[int], context_lens: list[int], heads: int, kv_heads: int,
                  head_dim: int, block_size: int, spare_blocks: int = 3, dtype=torch.float32) -> dict[str, Any]:
    """A shuffled paged cache holding each sequence's context, and packed queries for its last query_lens tokens."""
    blocks_per_seq = [-(-c // block_size) for c in context_lens]
    num_blocks = sum(blocks_per_seq) + spare_blocks
    order = torch.randperm(num_blocks, generator=g).tolist()
    width = max(blocks_per_seq, default=0) + 1  # one -1 column at least, as the engine pads
    tables, start = [], 0
    for n in blocks_per_seq:
        tables.append(order[start : start + n] + [-1] * (width - n))
        start += n
    shape = (num_blocks, block_size, kv_heads, head_dim)
    return {
        "q": torch.randn(sum(query_lens), heads, head_dim, generator=g).to(dtype),
        "k_cache": torch.randn(shape, generator=g).to(dtype),
        "v_cache": torch.randn(shape, generator=g).to(dtype),
        "block_tables": torch.tensor(tables, dtype=torch.int32).reshape(len(context_lens), width),
        "cu_seqlens_q": torch.tensor([0] + query_lens, dtype=torch.int64).cumsum(0).to(torch.int32),
        "context_lens": torch.tensor(context_lens, dtype=torch.int32),
        "scale": head_dim ** -0.5,
    }


PAGED_ATTENTION_TORCH = Exercise(
    name="paged_attention_torch", symbol="paged_attention_torch", notebook=NOTEBOOK_3,
    signature="paged_attention_torch(q, k_cache, v_cache, block_tables, cu_seqlens_q, context_lens, scale) -> Tensor  "
              "# q: [num_tokens, heads, head_dim]; caches: [num_blocks, block_size, kv_heads, head_dim]",
    reference=harness.ref_paged_attention_torch,
    hides=("reference.attention.torch_ref.paged_attention", "reference.attention.torch_ref.gather_context"),
    cases=(
        Case("decode_batch", lambda g: _paged_inputs(g, [1, 1, 1], [5, 1, 12], 4, 4, 16, 4), Close(1e-5, 1e-5),
             "3 decoding sequences (one query each) with contexts 5, 1 and 12 in shuffled blocks of 4; a decode "
             "token is the LAST of its context_lens[b] tokens and sees all of them", seed=10),
        Case("prefill_over_a_cached_prefix", lambda g: _paged_inputs(g, [6], [14], 2, 2, 8, 4), Close(1e-5, 1e-5),
             "6 new tokens at positions 8..13 of a 14-token context (context_lens counts them: new token i is at "
             "context_len - q_len + i): causal, each sees keys 0..its position, so the first one sees 9 keys",
             seed=11),
        Case("mixed_batch_gqa", lambda g: _paged_inputs(g, [3, 1, 7], [3, 9, 7], 6, 2, 16, 2), Close(1e-5, 1e-5),
             "a fresh prefill, a decode and another prefill together; 6 query heads share 2 KV heads (GQA: "
             "head h reads KV head h // 3)", seed=12),
        Case("given_scale", lambda g: {**_paged_inputs(g, [3, 1], [7, 10], 2, 2, 8, 4), "scale": 0.5},
             Close(1e-5, 1e-5), "scale 0.5, not 1/sqrt(head_dim): multiply q . k by the scale you are given", seed=16),
        Case("one_big_block_per_sequence", lambda g: _paged_inputs(g, [2, 1], [20, 33], 2, 1, 8, 64),
             Close(1e-5, 1e-5), "block_size 64 (the contiguous cache's layout): one block each, MQA", seed=13),
        Case("wider", lambda g: _paged_inputs(g, [4, 1, 16, 1], [40, 50, 16, 3], 8, 2, 32, 8), Close(1e-5, 1e-5),
             "four sequences, GQA 4, head_dim 32", visible=False, seed=14),
        Case("float16_cache", lambda g: {**_paged_inputs(g, [1, 40], [300, 40], 4, 2, 16, 4, dtype=torch.float16),
                                         "scale": 1.0},
             Close(2e-3, 2e-3), "float16 queries and cache, result in float16 (computed in float32)", visible=False,
             seed=15),
    ),
)


def _decode_inputs(g: torch.Generator, context_lens: list[int], heads: int, kv_heads: int, head_dim: int,
                   block_size: int) -> dict[str, Any]:
    inputs = _paged_inputs(g, [1] * len(context_lens), context_lens, heads, kv_heads, head_dim, block_size)
    del inputs["cu_seqlens_q"]
    return {name: inputs[name] for name in ("q", "k_cache", "v_cache", "block_tables", "context_lens", "scale")}


def _decode_expected(inputs: dict[str, Any]) -> torch.Tensor:
    batch = inputs["q"].shape[0]
    cu = torch.arange(batch + 1, dtype=torch.int32)
    return _paged_attention(inputs["q"], inputs["k_cache"], inputs["v_cache"], inputs["block_tables"], cu,
                                      inputs["context_lens"], inputs["scale"])


PAGED_DECODE_TRITON = Exercise(
    name="paged_decode_triton", symbol="paged_decode_triton", notebook=NOTEBOOK_3,
    signature="paged_decode_triton(q, k_cache, v_cache, block_tables, context_lens, scale) -> Tensor  "
              "# q: [batch, heads, head_dim] -> [batch, heads, head_dim]; a Triton kernel inside",
    reference=harness.ref_paged_decode_triton, driver=harness.drive_paged_decode_triton,
    hides=("reference.attention.triton_ops.paged_decode_attention",),
    cases=(
        Case("one_sequence_one_block", lambda g: _decode_inputs(g, [3], 2, 2, 16, 4), Close(1e-4, 1e-4),
             "one sequence, 3 tokens in one block of 4 (the 4th slot must be ignored)", expected=_decode_expected,
             seed=20),
        Case("several_blocks", lambda g: _decode_inputs(g, [9, 4, 1], 2, 2, 16, 4), Close(1e-4, 1e-4),
             "contexts 9, 4 and 1 in shuffled blocks of 4: the online softmax runs over several blocks; masked "
             "rows of the last block need score -inf, not 0",
             expected=_decode_expected, seed=21),
        Case("gqa", lambda g: _decode_inputs(g, [6, 11], 4, 1, 16, 8), Close(1e-4, 1e-4),
             "4 query heads sharing 1 KV head (query head h reads KV head h // 4), blocks of 8",
             expected=_decode_expected, seed=22),
        Case("larger_values", lambda g: {**_decode_inputs(g, [7, 13], 2, 2, 32, 4), "scale": 2.0},
             Close(1e-4, 1e-4), "scale 2.0 makes scores large: subtract the running max before exponentiating, and "
             "when a block raises the max, rescale the running sum and output by exp(m_old - m_new) (with small "
             "scores a missing rescale can go unnoticed)",
             expected=_decode_expected, seed=23),
        Case("longer_contexts", lambda g: _decode_inputs(g, [30, 17, 2, 25], 4, 2, 16, 4), Close(1e-4, 1e-4),
             "four sequences, up to 8 blocks each, GQA 2", expected=_decode_expected, visible=False, seed=24),
    ),
)


def _sdpa_inputs(g: torch.Generator, seq_len: int, heads: int, kv_heads: int, head_dim: int,
                 scale: float | None = None) -> dict[str, Any]:
    return {"q": torch.randn(seq_len, heads, head_dim, generator=g),
            "k": torch.randn(seq_len, kv_heads, head_dim, generator=g),
            "v": torch.randn(seq_len, kv_heads, head_dim, generator=g),
            "scale": head_dim ** -0.5 if scale is None else scale}


SDPA_ATTENTION = Exercise(
    name="sdpa_attention", symbol="sdpa_attention", notebook=NOTEBOOK_3,
    signature="sdpa_attention(q, k, v, scale) -> Tensor  # q: [seq, heads, head_dim], k, v: [seq, kv_heads, "
              "head_dim] -> [seq, heads, head_dim], causal, through F.scaled_dot_product_attention",
    reference=harness.ref_sdpa_attention,
    hides=("reference.attention.sdpa.fresh_prefill_attention",),
    cases=(
        Case("multi_head", lambda g: _sdpa_inputs(g, 7, 4, 4, 16), Close(1e-5, 1e-5),
             "7 tokens, 4 heads of 16: causal (token i sees tokens 0..i); SDPA wants [batch, heads, seq, dim]",
             seed=30),
        Case("gqa", lambda g: _sdpa_inputs(g, 5, 6, 2, 8), Close(1e-5, 1e-5),
             "6 query heads over 2 KV heads: query head h uses KV head h // 3 (enable_gqa=True, or "
             "repeat_interleave on the heads dimension; repeat gives h % 2)", seed=31),
        Case("explicit_scale", lambda g: _sdpa_inputs(g, 4, 2, 1, 8, scale=0.05), Close(1e-5, 1e-5),
             "scale 0.05 instead of 1/sqrt(head_dim): pass it on", seed=32),
        Case("heads_not_equal_to_seq", lambda g: _sdpa_inputs(g, 3, 9, 3, 64), Close(1e-5, 1e-5),
             "SmolLM2's heads (9 query, 3 KV, head_dim 64) on 3 tokens", visible=False, seed=33),
        Case("one_token", lambda g: _sdpa_inputs(g, 1, 2, 2, 4), Close(1e-6, 1e-6),
             "a single token attends only to itself: the output is its value", visible=False, seed=34),
    ),
)


LAB = Lab(name="lab0.3", preamble=harness.PREAMBLE, memory_mb=LAB_MEMORY_MB, exercises=(
    SLOT_MAPPING, BLOCK_ALLOCATOR,
    BLOCK_HASHES, PREFIX_CACHE,
    PAGED_ATTENTION_TORCH, PAGED_DECODE_TRITON, SDPA_ATTENTION,
))
