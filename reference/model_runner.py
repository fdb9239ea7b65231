"""The model runner: turns the scheduler's plan into tensors, runs ONE forward pass, and samples.

It owns the model and the KV cache tensors ([num_blocks, block_size, kv_heads, head_dim] per layer for K and
V, sized by the KV manager). Each step it packs every scheduled token into one batch, builds the positions
and the attention metadata once, runs the model, computes logits only for sequences whose last uncomputed
token ran this step (a prefill chunk that stops mid-prompt samples nothing), and samples their next tokens.

launch() returns as soon as that work is queued on the GPU: the sampled tokens stay there, a copy to the host
is queued behind them, and the engine reads them later (LaunchedStep.tokens()). Meanwhile the engine plans the
next step around placeholders (sequence.PENDING_TOKEN); when that step runs, its inputs that are placeholders
are filled on the GPU from the previous step's tokens (fill_pending), so the host never waits in between.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch

from .attention import build_metadata, get_backend
from .cuda_graphs import DecodeGraphs, fill_pending
from .kv import KVCacheManager, allocate_kv_caches, kv_caches_bytes
from .models import LlamaForCausalLM
from .models.llama import fused_available
from .sampling import TokenLogprobs, compute_logprobs, sample, seeded_generator
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
        self.kv_caches = allocate_kv_caches(model.config, kv_manager.num_blocks, kv_manager.block_size, dtype,
                                            self.device)
        # CUDA graphs need kernels that read everything from device memory: not the torch reference.
        self.decode_graphs = None
        if self.device.type == "cuda" and not enforce_eager and self.attention_backend.name != "torch":
            self.decode_graphs = DecodeGraphs(model, self.kv_caches, kv_manager.block_size, max_num_seqs, max_model_len)
        self._previous: LaunchedStep | None = None  # the last step launched: where its tokens are on the device

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
        return kv_caches_bytes(self.kv_caches)

    @torch.inference_mode()
    def launch(self, batch: ScheduledBatch) -> "LaunchedStep":
        """Queue one step on the device (forward pass and sampling) and return without waiting for its tokens.

        Advances num_computed_tokens. The caller appends a placeholder for each sequence in the result's seqs;
        the step after this one reads those tokens straight from the device (see _pending_rows), so the host
        can plan that step while this one runs. On the CPU everything has already run when launch returns.
        """
        for source, destination in self.kv.take_pending_copies():  # copy-on-write / fork copies
            for k_cache, v_cache in self.kv_caches:
                k_cache[destination] = k_cache[source]
                v_cache[destination] = v_cache[source]
        if not batch.seqs:
            self._previous = None
            return LaunchedStep([], None)
        input_ids, query_lens, context_lens = [], [], []
        for seq, n in zip(batch.seqs, batch.num_tokens):
            start = seq.num_computed_tokens
            input_ids.extend(seq.token_ids[start : start + n])
            query_lens.append(n)
            context_lens.append(start + n)
        pending_rows = self._pending_rows(batch)
        block_tables = [self.kv.block_table(s) for s in batch.seqs]
        # Only sequences whose every token is now computed predict a next token.
        done = [i for i, (s, ctx) in enumerate(zip(batch.seqs, context_lens)) if ctx == s.num_tokens]
        for seq, ctx in zip(batch.seqs, context_lens):
            seq.num_computed_tokens = ctx

        previous = self._previous.token_ids if self._previous is not None else None
        is_decode = len(input_ids) == len(batch.seqs)
        if is_decode and self.decode_graphs is not None and self.decode_graphs.can_run(len(input_ids)):
            logits = self.decode_graphs.run(input_ids, context_lens, block_tables, pending_rows, previous)
        else:
            positions, metadata = build_metadata(query_lens, context_lens, block_tables, self.kv.block_size, self.device)
            ids = torch.tensor(input_ids, device=self.device)
            if pending_rows is not None:
                fill_pending(ids, torch.tensor(pending_rows, device=self.device), previous)
            hidden = self.model(ids, positions, metadata, self.kv_caches)
            if not done:
                self._previous = None
                return LaunchedStep([], None)
            ends = list(itertools.accumulate(query_lens))
            logits = self.model.compute_logits(hidden[torch.tensor([ends[i] - 1 for i in done], device=self.device)])
        if not done:
            self._previous = None
            return LaunchedStep([], None)
        seqs = [batch.seqs[i] for i in done]
        params = [s.params for s in seqs]
        generators = [
            seeded_generator(s.params.seed, s.sample_index, s.num_tokens, self.device)
            if s.params.seed is not None and not s.params.greedy else None
            for s in seqs
        ]
        token_ids = sample(logits, params, generators)
        logprobs = None
        wants_logprobs = [i for i, p in enumerate(params) if p.logprobs is not None]
        if wants_logprobs:
            rows = torch.tensor(wants_logprobs, device=self.device)
            num_top = max(params[i].logprobs for i in wants_logprobs)
            logprobs = (wants_logprobs, compute_logprobs(logits[rows], token_ids[rows], num_top or None))
        self._previous = step = LaunchedStep(seqs, token_ids, logprobs)
        return step

    def _pending_rows(self, batch: ScheduledBatch) -> list[int] | None:
        """For each input token, the row of last step's sampled tokens that holds its value, or -1 if the host
        has it. Only a sequence's newest token can be pending, and only from the step just before (every older
        step's tokens reached the host before this step was planned). None when no input is pending."""
        if self._previous is None:
            return None
        rows, any_pending = [], False
        for seq, n in zip(batch.seqs, batch.num_tokens):
            rows.extend([-1] * (n - 1))
            if seq.num_pending_tokens and seq.num_computed_tokens + n == seq.num_tokens:
                assert seq.num_pending_tokens == 1, "a token older than the previous step is still pending"
                rows.append(self._previous.row_of[seq.seq_id])
                any_pending = True
            else:
                rows.append(-1)
        return rows if any_pending else None


class LaunchedStep:
    """A step queued on the device: which sequences sample a token, and those tokens once they arrive.

    token_ids stay on the device for the next step's inputs; a copy to pinned host memory is queued behind
    them, and tokens() waits for that copy alone (an event), not for whatever was queued after this step.
    """

    def __init__(self, seqs: list[Sequence], token_ids: torch.Tensor | None,
                 logprobs: tuple[list[int], TokenLogprobs] | None = None) -> None:
        self.seqs = seqs
        self.token_ids = token_ids
        self.row_of = {seq.seq_id: row for row, seq in enumerate(seqs)}
        self._host = None
        self._ready = None
        if token_ids is None:
            return
        tensors = [token_ids] + ([t for t in logprobs[1] if t is not None] if logprobs else [])
        if token_ids.device.type == "cuda":
            self._host = [torch.empty(t.shape, dtype=t.dtype, pin_memory=True) for t in tensors]
            for host, device_tensor in zip(self._host, tensors):
                host.copy_(device_tensor, non_blocking=True)
            self._ready = torch.cuda.Event()
            self._ready.record()
        else:
            self._host = tensors
        self._logprob_rows = logprobs[0] if logprobs else []

    def tokens(self) -> list[SampledToken]:
        """The sampled tokens, in seqs order (waits until they have reached the host)."""
        if self._host is None:
            return []
        if self._ready is not None:
            self._ready.synchronize()
        token_ids, *logprobs = (t.tolist() for t in self._host)
        results = [SampledToken(s, t) for s, t in zip(self.seqs, token_ids)]
        if self._logprob_rows:
            token_logprobs, top = logprobs[0], logprobs[1:]  # top: [ids, logprobs] when asked for
            for j, i in enumerate(self._logprob_rows):
                results[i].logprob = token_logprobs[j]
                k = self.seqs[i].params.logprobs
                if k and top:
                    results[i].top_logprobs = dict(zip(top[0][j][:k], top[1][j][:k]))
        return results
