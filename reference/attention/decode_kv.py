"""DecodeKV: the decoding sequences' K/V kept between steps in SDPA's padded layout (attention_backend="padded").

Without it, a decode step's attention in padded.py copies every sequence's whole context out of the paged cache
into a padded [batch, kv_heads, context, head_dim] K and V, in every layer of every step, and SDPA then reads the
copy: the context crosses memory three times for one new token. Between two steps a decoding sequence's context
only grows by that token. So this keeps, per layer, a padded K and V with one row per decoding sequence: each
step appends the new K/V to the rows (the paged cache is still written, and stays the truth for everything
else), and SDPA reads rows 0..n-1 in place.

A row is trusted only while its sequence decodes in every step: a step whose decodes do not include a sequence
(finished, preempted, prefilling) drops its row, and a sequence new to the rows, or whose row lies past the n
rows in use, is copied in from the paged cache through its block table. Who is who comes from the metadata's
seq_ids; without them (a step not built by the engine's runner) nothing is kept. The rows cost memory beside
the paged cache (n x the longest context): past MAX_SHARE of the paged cache the backend gathers as before.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..kv.layout import blocks_for_tokens

MAX_SHARE = 0.5  # the kept rows may take at most half the paged cache's memory; beyond it: gather per layer


@dataclass
class DecodePlacement:
    """One step's decodes placed in the kept rows 0..n-1 (row r holds group member order[r])."""

    order: torch.Tensor | None  # int64 [n]: the group member of each row; None: row r holds member r
    refill_rows: torch.Tensor  # int64 [m]: rows copied from the paged cache this step (new or moved sequences)
    refill_blocks: torch.Tensor  # int64 [m x blocks]: their block tables, flat, cut to the longest of them
    positions: torch.Tensor  # int64 [n]: where each row's new token goes (its context - 1)
    context: int  # positions SDPA reads: the longest context, rounded up to whole blocks
    mask: torch.Tensor  # [n, 1, 1, context] additive (0 / -inf), in row order


class DecodeKV:
    """The kept rows of every layer (found by the layer's cache tensor) and which sequence each row holds."""

    def __init__(self) -> None:
        self.layers: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # k_cache.data_ptr() -> (K rows, V rows)
        self.row_seq: list[int] = []  # the sequence in each row, rows 0..n-1 of the last step's decodes
        self.row_context: list[int] = []  # its context once that step ran (tokens its row holds)

    def place(self, seq_ids: list[int] | None, context_lens: list[int], tables: torch.Tensor, block_size: int,
              cache_bytes: int, token_bytes: int, dtype: torch.dtype) -> DecodePlacement | None:
        """Assign this step's decodes (seq_ids, context_lens after the step, block tables [n, blocks]) to rows, or
        None (and forget every row) when there are no ids or the rows would take more than MAX_SHARE of the
        paged cache (cache_bytes per layer; token_bytes: one token's K and V in one layer). Called once a step,
        with an empty list when the step has no decodes, so that rows never outlive a step they missed."""
        context = blocks_for_tokens(max(context_lens, default=0), block_size) * block_size
        if not seq_ids or len(seq_ids) * context * token_bytes > MAX_SHARE * cache_bytes:
            self.row_seq, self.row_context = [], []
            return None
        n = len(seq_ids)
        member_of = {seq: i for i, seq in enumerate(seq_ids)}
        # A row stays where it is if its sequence decodes again right after the step that filled it.
        row_member: list[int | None] = [None] * n
        for row, (seq, held) in enumerate(zip(self.row_seq[:n], self.row_context)):
            i = member_of.get(seq)
            if i is not None and held == context_lens[i] - 1:
                row_member[row] = i
        placed = {i for i in row_member if i is not None}
        newcomers = iter(i for i in range(n) if i not in placed)
        refill = [row for row in range(n) if row_member[row] is None]
        for row in refill:
            row_member[row] = next(newcomers)
        self.row_seq = [seq_ids[i] for i in row_member]
        self.row_context = [context_lens[i] for i in row_member]
        refill_blocks = blocks_for_tokens(max((self.row_context[r] for r in refill), default=0), block_size)
        key_pos = torch.arange(context)
        visible = key_pos[None, :] < torch.tensor(self.row_context)[:, None]  # [n, context], in row order
        mask = torch.zeros(visible.shape, dtype=dtype).masked_fill_(~visible, float("-inf"))[:, None, None, :]
        in_place = row_member == list(range(n))
        return DecodePlacement(
            order=None if in_place else torch.tensor(row_member),
            refill_rows=torch.tensor(refill, dtype=torch.int64),
            refill_blocks=tables[[row_member[r] for r in refill], :refill_blocks].long().clamp(min=0).flatten(),
            positions=torch.tensor(self.row_context) - 1,
            context=context,
            mask=mask.to(tables.device),
        )

    def rows_for(self, k_cache: torch.Tensor, n: int, context: int) -> tuple[torch.Tensor, torch.Tensor]:
        """This layer's K and V rows, [rows, kv_heads, positions, head_dim] with at least n rows and `context`
        positions; when a step needs more, new ones of exactly that size (place() bounded it) that keep what the
        first n rows held. Zeros where nothing was written: SDPA multiplies masked positions by 0, and 0 x NaN
        from uninitialised memory would be NaN."""
        kv_heads, head_dim = k_cache.shape[2:]
        old = self.layers.get(k_cache.data_ptr())
        if old is not None and old[0].shape[0] >= n and old[0].shape[2] >= context \
                and old[0].shape[1::2] == (kv_heads, head_dim) and old[0].dtype == k_cache.dtype:
            return old
        rows = tuple(k_cache.new_zeros(n, kv_heads, context, head_dim) for _ in range(2))
        if old is not None and old[0].shape[1::2] == (kv_heads, head_dim) and old[0].dtype == k_cache.dtype:
            keep_rows, keep_positions = min(n, old[0].shape[0]), min(context, old[0].shape[2])
            for new, held in zip(rows, old):
                new[:keep_rows, :, :keep_positions] = held[:keep_rows, :, :keep_positions]
        self.layers[k_cache.data_ptr()] = rows
        return rows

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
               v_cache: torch.Tensor, placement: DecodePlacement, scale: float) -> torch.Tensor:
        """Decode attention over the kept rows. q: [n, heads, head_dim], k, v: [n, kv_heads, head_dim], the group's
        new tokens in group order (already in the paged cache too). Returns [n, heads, head_dim], group order."""
        n, heads, head_dim = q.shape
        kv_heads = k_cache.shape[2]
        k_rows, v_rows = self.rows_for(k_cache, n, placement.context)
        if placement.order is not None:  # rows hold the members in another order: bring the queries to them
            q, k, v = q[placement.order], k[placement.order], v[placement.order]
        rows = torch.arange(n)
        for kept, cache, new in ((k_rows, k_cache, k), (v_rows, v_cache, v)):
            if len(placement.refill_rows):  # newcomers: their whole context from the paged cache
                copied = cache.index_select(0, placement.refill_blocks)
                copied = copied.view(len(placement.refill_rows), -1, kv_heads, head_dim).transpose(1, 2)
                kept[placement.refill_rows, :, : copied.shape[2]] = copied
            kept[rows, :, placement.positions] = new  # everyone's new token
        out = torch.nn.functional.scaled_dot_product_attention(
            q.view(n, kv_heads, heads // kv_heads, head_dim), k_rows[:n, :, : placement.context],
            v_rows[:n, :, : placement.context], attn_mask=placement.mask, scale=scale).view(n, heads, head_dim)
        if placement.order is None:
            return out
        in_group_order = torch.empty_like(out)
        in_group_order[placement.order] = out
        return in_group_order
