"""CUDA graphs for decode steps: record the whole forward pass once per batch size, then replay it.

A decode step of a small model is hundreds of tiny kernel launches; launching them from Python costs more
than running them. A CUDA graph records the launches once and replays them with one call. The price: every
tensor the graph touches must live at a fixed address with a fixed shape. So each step copies its inputs into
static buffers, a batch is padded up to the next captured size (padding rows write nothing: slot -1), and the
attention kernel is captured for the longest context (max_model_len), reading the true lengths from memory.
"""

from __future__ import annotations

import itertools

import numpy as np
import torch

from .attention import AttentionMetadata
from .kv import batched_slot_mapping, blocks_for_tokens


def capture_sizes(max_num_seqs: int) -> list[int]:
    """Batch sizes to capture: 1, 2, 4, 8, then every 16 up to max_num_seqs (which is always included)."""
    sizes = [s for s in (1, 2, 4, 8) if s < max_num_seqs] + list(range(16, max_num_seqs, 16))
    return sorted(set(sizes + [max_num_seqs]))


# Per captured row: four int64 token inputs, then (after every row's) two int32s, context length and start order.
INPUT_BYTES_PER_ROW = 4 * 8 + 2 * 4


def input_views(buffer: torch.Tensor, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A byte buffer of INPUT_BYTES_PER_ROW * rows bytes seen as int64 [4, rows] token inputs and int32 [2, rows]
    lengths and order (the same layout on the host and on the device, so one copy moves both)."""
    split = 4 * 8 * rows
    return buffer[:split].view(torch.int64).view(4, rows), buffer[split:].view(torch.int32).view(2, rows)


def warmup_lens_and_order(largest: int, device=None) -> torch.Tensor:
    """The static [context lengths; decode order] buffer as the warm-up and capture passes read it: every context
    one token long, and for every captured size the order's first `size` entries a permutation of range(size).
    The decode kernel sends program i to sequence order[i]: any other value reads and writes outside a smaller
    batch's rows (an order of all ones made the batch-of-one warm-up write a row past its output)."""
    lens_and_order = torch.ones(2, largest, dtype=torch.int32, device=device)
    lens_and_order[1] = torch.arange(largest, dtype=torch.int32, device=device)
    return lens_and_order


class DecodeGraphs:
    # Start the decode kernel's programs longest context first (AttentionMetadata.decode_order); class-level so a
    # benchmark can compare. Same outputs either way.
    longest_first = True

    def __init__(self, model, kv_caches, block_size: int, max_num_seqs: int, max_model_len: int) -> None:
        device = next(model.parameters()).device
        self.block_size = block_size
        self.sizes = capture_sizes(max_num_seqs)
        largest = self.sizes[-1]
        max_blocks = blocks_for_tokens(max_model_len, block_size)
        # Static device inputs, all in one byte buffer so that one copy fills them: int64 token ids, positions,
        # slots and pending rows, then int32 context lengths and the attention kernel's start order (longest first).
        self.inputs = torch.zeros(INPUT_BYTES_PER_ROW * largest, dtype=torch.uint8, device=device)
        self.token_inputs, self.lens_and_order = input_views(self.inputs, largest)
        self.input_ids, self.positions, self.slot_mapping, self.pending_rows = self.token_inputs.unbind(0)
        self.slot_mapping.fill_(-1)  # the warm-up and capture passes below must write no KV
        self.lens_and_order.copy_(warmup_lens_and_order(largest, device))
        self.context_lens, self.decode_order = self.lens_and_order.unbind(0)
        self.block_tables = torch.zeros(largest, max_blocks, dtype=torch.int32, device=device)
        # Every tensor a graph reads must outlive the graph: kept on self, even those our Triton decode kernel
        # never reads (FlashAttention 4 reads cu_seqlens_q; a freed buffer gets reused and replays read garbage).
        self.cu_seqlens = torch.arange(largest + 1, dtype=torch.int32, device=device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.logits: dict[int, torch.Tensor] = {}
        pool = None
        for size in reversed(self.sizes):  # largest first, so smaller graphs reuse its memory pool
            metadata = AttentionMetadata(
                cu_seqlens_q=self.cu_seqlens[: size + 1], query_lens=[1] * size,
                context_lens=self.context_lens[:size], context_lens_host=[max_model_len] * size,
                slot_mapping=self.slot_mapping[:size], block_tables=self.block_tables[:size],
                page_table=self.block_tables[:size],  # holds no -1: zeros, real ids and stale real ids
                decode_order=self.decode_order[:size] if self.longest_first else None,
            )

            def forward(size=size, metadata=metadata):
                hidden = model(self.input_ids[:size], self.positions[:size], metadata, kv_caches)
                return model.compute_logits(hidden, upcast=False)  # the samplers upcast (fast_runner)

            forward()  # warm-up outside the graph: compiles the Triton kernels, initialises cuBLAS
            torch.cuda.synchronize(device)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self.logits[size] = forward()
            pool = graph.pool()
            self.graphs[size] = graph

    def can_run(self, batch_size: int) -> bool:
        return batch_size <= self.sizes[-1]

    def run(
        self, input_ids: list[int], context_lens: list[int], block_tables: list[list[int]],
        pending_rows: list[int] | None = None, previous: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """One decode step for len(input_ids) sequences (each token at position context_len - 1); returns their
        logits [batch, vocab] (a view). pending_rows/previous: input tokens still on the device (see fill_pending)."""
        n = len(input_ids)
        size = next(s for s in self.sizes if s >= n)
        # Stage the inputs in pinned host memory, filled with numpy (far cheaper than building tensors from
        # nested lists), so the copies to the GPU are asynchronous. A fresh staging buffer each step: the host
        # plans the next step while this one may still be copying, and torch's pinned-memory cache hands a
        # buffer out again only once the copies reading it have finished.
        # Padding rows n..size-1 write nothing (slot -1) and attend over one token of block 0 (output ignored).
        host_inputs = torch.empty(self.inputs.shape, dtype=torch.uint8, pin_memory=True)
        host_tokens, host_lens_and_order = input_views(host_inputs, self.sizes[-1])
        tokens, (lens, order) = host_tokens.numpy(), host_lens_and_order.numpy()
        tokens[:, n:] = 0
        lens[:n], lens[n:], order[size:] = context_lens, 1, 0
        order[:size] = np.argsort(-lens[:size], kind="stable")  # a permutation of the graph's rows, padding last
        num_blocks = np.fromiter(map(len, block_tables), dtype=np.int64, count=n)
        width = int(num_blocks.max())
        host_tables = torch.zeros(size, width, dtype=torch.int32, pin_memory=True)
        tables = host_tables.numpy()
        tables[:n][np.arange(width) < num_blocks[:, None]] = np.fromiter(
            itertools.chain.from_iterable(block_tables), dtype=np.int32, count=int(num_blocks.sum()))
        tokens[0, :n], tokens[1, :n] = input_ids, lens[:n] - 1
        tokens[2, :n] = batched_slot_mapping(tables, np.arange(n), tokens[1, :n], self.block_size)
        tokens[2, n:size] = tokens[3, n:size] = -1
        tokens[3, :n] = -1 if pending_rows is None else pending_rows
        self.inputs.copy_(host_inputs, non_blocking=True)
        # Columns past `width` keep stale ids: the kernel reads only the blocks a row's context length covers.
        self.block_tables[:size, :width].copy_(host_tables, non_blocking=True)
        if pending_rows is not None and min(pending_rows) >= 0:  # every input is last step's token: one gather
            torch.index_select(previous, 0, self.pending_rows[:n], out=self.input_ids[:n])
        elif pending_rows is not None:
            fill_pending(self.input_ids[:size], self.pending_rows[:size], previous)
        self.graphs[size].replay()
        return self.logits[size][:n]


def fill_pending(input_ids: torch.Tensor, rows: torch.Tensor, previous: torch.Tensor) -> None:
    """In place: input_ids[i] = previous[rows[i]] where rows[i] >= 0 (a token sampled last step, still on the
    device), unchanged where rows[i] < 0. A gather and a select: no copy to the host, so no wait."""
    input_ids.copy_(torch.where(rows >= 0, previous[rows.clamp(min=0)], input_ids))
