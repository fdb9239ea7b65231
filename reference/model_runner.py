"""ModelRunner: one scheduled step on the model, eager and synchronous: pack, run, sample, return the tokens.

The runner to read after lab 0.3. Each step it
1. applies the KV manager's block copies (copy-on-write, forks) to the cache tensors;
2. packs the new tokens of every scheduled sequence into one batch, with positions, cache slots and block
   tables (attention.build_metadata);
3. runs the model once over the batch, which writes the new K/V into the paged cache and reads the old;
4. computes logits only for sequences whose last uncomputed token ran this step (a prefill chunk that stops
   mid-prompt samples nothing), and samples their next tokens.
It reads sequence state and returns the sampled tokens; the engine and scheduler record them. Its fast twin,
fast_runner.py (async scheduling, CUDA graphs), gives the same tokens (tests/test_runners.py).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np
import torch

from .attention import build_metadata, get_backend
from .kv import KVCacheManager, allocate_kv_caches, kv_caches_bytes
from .models import LlamaForCausalLM
from .models.llama import fused_available
from .sampled_tokens import SampledToken, sample_tokens, sampled_tokens
from .scheduler import ScheduledBatch


@dataclass
class StepInputs:
    """One step's batch as flat lists, read from the sequences before they advance."""

    input_ids: list[int]  # every scheduled sequence's new tokens, concatenated
    query_lens: list[int]  # new tokens per sequence
    context_lens: list[int]  # tokens per sequence in the cache once this step has run
    block_tables: list[list[int]]
    sampling: list[int]  # rows of batch.seqs that sample: every one of their tokens is computed after this step

    @classmethod
    def of(cls, batch: ScheduledBatch, kv: KVCacheManager) -> "StepInputs":
        inputs = cls([], list(batch.num_tokens), [], [kv.block_table(s) for s in batch.seqs], [])
        for row, (seq, n) in enumerate(zip(batch.seqs, batch.num_tokens)):
            start = seq.num_computed_tokens
            inputs.input_ids.extend(seq.token_ids[start : start + n])
            inputs.context_lens.append(start + n)
            if start + n == seq.num_tokens:
                inputs.sampling.append(row)
        return inputs

    def last_token_rows(self) -> list[int]:
        """Rows of the packed batch holding the last new token of each sampling sequence."""
        ends = list(itertools.accumulate(self.query_lens))
        return [ends[row] - 1 for row in self.sampling]


def int64_tensor(values: list[int]) -> torch.Tensor:
    """torch.tensor(values, dtype=torch.int64) on the host, through numpy: 10x faster for a step's 8,192 token ids
    (torch converts a list element by element)."""
    return torch.from_numpy(np.asarray(values, dtype=np.int64))


class ModelRunner:
    decode_graphs = None  # CUDA graphs are the fast runner's (fast_runner.py)

    def __init__(self, model: LlamaForCausalLM, kv_manager: KVCacheManager, dtype: torch.dtype, *,
                 attention_backend: str = "auto", fused_kernels: bool = False,
                 pack_projections: bool | None = None, eos_token_ids: frozenset[int] = frozenset()) -> None:
        self.model = model
        self.eos_token_ids = eos_token_ids  # the tokens min_tokens keeps out (with each request's stop tokens)
        self.kv = kv_manager
        self.device = next(model.parameters()).device
        self.attention_backend = get_backend(attention_backend, self.device, kv_manager.block_size, dtype)
        model.set_attention_backend(self.attention_backend)
        # Fused elementwise kernels (Triton) on the GPU; set before any CUDA graph records the forward pass.
        self.fused_kernels = fused_kernels and self.device.type == "cuda" and fused_available()
        model.use_fused_kernels(self.fused_kernels)
        # q/k/v and gate/up as one matrix multiply each (models/packing.py), on by default: fewer, larger GEMMs.
        # CPU: 1-2% shorter steps (RESULTS.md, issue 21). GPU: a decode step's small GEMMs are latency-bound, so
        # four launches per layer instead of seven matter there, once the fused kernels read q, k, gate and up in
        # place instead of copying them out of the packed outputs (RESULTS.md, issue 16 round three).
        self.pack_projections = True if pack_projections is None else pack_projections
        model.pack_projections(self.pack_projections)
        self.kv_caches = allocate_kv_caches(model.config, kv_manager.num_blocks, kv_manager.block_size, dtype,
                                            self.device)

    @property
    def kv_cache_bytes(self) -> int:
        return kv_caches_bytes(self.kv_caches)

    def copy_blocks(self, copies: list[tuple[int, int]] | None = None) -> None:
        """Apply block copies (copy-on-write, forks) before the next forward pass: `copies`, or else the ones the
        KV manager queued. (A tensor-parallel worker is given the copies rank 0's manager queued.)"""
        for source, destination in self.kv.take_pending_copies() if copies is None else copies:
            for k_cache, v_cache in self.kv_caches:
                k_cache[destination] = k_cache[source]
                v_cache[destination] = v_cache[source]

    @torch.inference_mode()
    def run(self, batch: ScheduledBatch) -> list[SampledToken]:
        """Run one step and return the tokens it sampled, in batch order (sequences that sample only)."""
        self.copy_blocks()
        if not batch.seqs:
            return []
        inputs = StepInputs.of(batch, self.kv)
        logits = self.forward(inputs)
        if logits is None:
            return []
        seqs = [batch.seqs[row] for row in inputs.sampling]
        token_ids, logprobs = sample_tokens(logits, seqs, self.eos_token_ids)
        return sampled_tokens(seqs, [token_ids, *logprobs.tensors], logprobs.rows)

    @torch.inference_mode()
    def forward(self, inputs: StepInputs) -> torch.Tensor | None:
        """The model over one step's batch (K/V written to the cache): float32 logits [sampling rows, vocab] of
        the sequences that sample, or None when none does."""
        positions, metadata = build_metadata(inputs.query_lens, inputs.context_lens, inputs.block_tables,
                                             self.kv.block_size, self.device)
        hidden = self.model(int64_tensor(inputs.input_ids).to(self.device), positions, metadata, self.kv_caches)
        if not inputs.sampling:
            return None
        return self.model.compute_logits(hidden[int64_tensor(inputs.last_token_rows()).to(self.device)])
