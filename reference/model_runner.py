"""The model runner: turns the scheduler's plan into tensors, runs ONE forward pass, and samples.

It owns the model and the KV cache tensors ([num_blocks, block_size, kv_heads, head_dim] per layer for K and
V, sized by the KV manager). Each step it packs every scheduled token into one batch, builds the positions
and the attention metadata once, runs the model, computes logits only for sequences whose last uncomputed
token ran this step (a prefill chunk that stops mid-prompt samples nothing), and samples their next tokens.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch

from .attention import build_metadata, get_backend
from .cuda_graphs import DecodeGraphs
from .kv_manager import KVCacheManager
from .models import LlamaForCausalLM
from .models.llama import fused_available
from .sampling import compute_logprobs, sample, seeded_generator
from .scheduler import ScheduledBatch
from .sequence import Sequence


@dataclass
class SampledToken:
    seq: Sequence
    token_id: int
    logprob: float | None = None
    top_logprobs: dict[int, float] | None = None


class ModelRunner:
    def __init__(
        self, model: LlamaForCausalLM, kv_manager: KVCacheManager, dtype: torch.dtype, *,
        attention_backend: str = "auto", enforce_eager: bool = True, max_num_seqs: int = 1, max_model_len: int = 1,
        fused_kernels: bool = False,
    ) -> None:
        self.model = model
        self.kv = kv_manager
        self.device = next(model.parameters()).device
        self.attention_backend = get_backend(attention_backend, self.device, kv_manager.block_size)
        model.set_attention_backend(self.attention_backend)
        # Fused elementwise kernels (Triton) on the GPU; set before any CUDA graph records the forward pass.
        self.fused_kernels = fused_kernels and self.device.type == "cuda" and fused_available()
        model.use_fused_kernels(self.fused_kernels)
        config = model.config
        shape = (kv_manager.num_blocks, kv_manager.block_size, config.num_key_value_heads, config.head_dim)
        self.kv_caches = [
            (torch.zeros(shape, dtype=dtype, device=self.device), torch.zeros(shape, dtype=dtype, device=self.device))
            for _ in range(config.num_hidden_layers)
        ]
        # CUDA graphs need kernels that read everything from device memory: not the torch reference.
        self.decode_graphs = None
        if self.device.type == "cuda" and not enforce_eager and self.attention_backend.name != "torch":
            self.decode_graphs = DecodeGraphs(model, self.kv_caches, kv_manager.block_size, max_num_seqs, max_model_len)

    @staticmethod
    @torch.inference_mode()
    def free_gpu_memory_for_kv(model: LlamaForCausalLM, device: torch.device, config) -> int:
        """Bytes left for the KV cache on the GPU: the budget (gpu_memory_utilization x total memory) minus
        what the weights and the activations of a full-budget step (measured with a dummy pass) need."""
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        num_tokens = config.max_num_batched_tokens
        seq_len = min(config.max_model_len, num_tokens)
        query_lens = [seq_len] * (num_tokens // seq_len) + ([num_tokens % seq_len] if num_tokens % seq_len else [])
        positions, metadata = build_metadata(query_lens, None, None, None, device)
        hidden = model(torch.zeros(num_tokens, dtype=torch.int64, device=device), positions, metadata)
        model.compute_logits(hidden[-config.max_num_seqs:])
        del hidden
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device)
        _, total = torch.cuda.mem_get_info(device)
        return max(0, int(total * config.gpu_memory_utilization) - peak)

    @property
    def kv_cache_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for pair in self.kv_caches for t in pair)

    @torch.inference_mode()
    def run(self, batch: ScheduledBatch) -> list[SampledToken]:
        """Execute one step; advance num_computed_tokens; return the tokens sampled this step."""
        for source, destination in self.kv.take_pending_copies():  # copy-on-write / fork copies
            for k_cache, v_cache in self.kv_caches:
                k_cache[destination] = k_cache[source]
                v_cache[destination] = v_cache[source]
        if not batch.seqs:
            return []
        input_ids, query_lens, context_lens = [], [], []
        for seq, n in zip(batch.seqs, batch.num_tokens):
            start = seq.num_computed_tokens
            input_ids.extend(seq.token_ids[start : start + n])
            query_lens.append(n)
            context_lens.append(start + n)
        block_tables = [self.kv.block_table(s) for s in batch.seqs]
        # Only sequences whose every token is now computed predict a next token.
        done = [i for i, (s, ctx) in enumerate(zip(batch.seqs, context_lens)) if ctx == s.num_tokens]
        for seq, ctx in zip(batch.seqs, context_lens):
            seq.num_computed_tokens = ctx

        is_decode = len(input_ids) == len(batch.seqs)
        if is_decode and self.decode_graphs is not None and self.decode_graphs.can_run(len(input_ids)):
            size = self.kv.block_size
            slots = [t[(c - 1) // size] * size + (c - 1) % size for t, c in zip(block_tables, context_lens)]
            positions = [c - 1 for c in context_lens]
            logits = self.decode_graphs.run(input_ids, positions, slots, context_lens, block_tables)
        else:
            positions, metadata = build_metadata(query_lens, context_lens, block_tables, self.kv.block_size, self.device)
            hidden = self.model(torch.tensor(input_ids, device=self.device), positions, metadata, self.kv_caches)
            if not done:
                return []
            ends = list(itertools.accumulate(query_lens))
            logits = self.model.compute_logits(hidden[torch.tensor([ends[i] - 1 for i in done], device=self.device)])
        if not done:
            return []
        seqs = [batch.seqs[i] for i in done]
        params = [s.params for s in seqs]
        generators = [
            seeded_generator(s.params.seed, s.sample_index, s.num_tokens, self.device)
            if s.params.seed is not None and not s.params.greedy else None
            for s in seqs
        ]
        token_ids = sample(logits, params, generators)
        results = [SampledToken(s, t) for s, t in zip(seqs, token_ids.tolist())]
        wants_logprobs = [i for i, p in enumerate(params) if p.logprobs is not None]
        if wants_logprobs:
            rows = torch.tensor(wants_logprobs, device=self.device)
            num_top = max(params[i].logprobs for i in wants_logprobs)
            lp = compute_logprobs(logits[rows], token_ids[rows], num_top or None)
            for j, i in enumerate(wants_logprobs):
                results[i].logprob = float(lp.token_logprobs[j])
                k = params[i].logprobs
                if k and lp.top_ids is not None:
                    ids, values = lp.top_ids[j, :k].tolist(), lp.top_logprobs[j, :k].tolist()
                    results[i].top_logprobs = dict(zip(ids, values))
        return results
