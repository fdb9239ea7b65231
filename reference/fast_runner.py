"""FastModelRunner: the model runner of model_runner.py made fast on a GPU; same steps, same tokens.

Two things make it fast, each a few lines on top of the plain runner:
- Async scheduling. launch() returns as soon as the step is queued on the GPU: the sampled tokens stay there,
  a copy to the host is queued behind them, and the engine reads them a step later (LaunchedStep.tokens()).
  Meanwhile the engine plans the next step around placeholders (sequence.PENDING_TOKEN); when that step runs,
  its inputs that are placeholders are filled on the GPU from the previous step's tokens (fill_pending), so the
  host never waits for the device in between.
- CUDA graphs for decode steps (cuda_graphs.py): one replay instead of hundreds of kernel launches.
On the CPU everything has run by the time launch() returns; the bookkeeping is the same.
"""

from __future__ import annotations

import dataclasses

import torch

from .attention import build_metadata
from .cuda_graphs import DecodeGraphs, fill_pending
from .kv import KVCacheManager
from .model_runner import ModelRunner, StepInputs, int64_tensor
from .models import LlamaForCausalLM
from .sampled_tokens import SampledToken, StepLogprobs, sample_tokens, sampled_tokens
from .scheduler import ScheduledBatch
from .sequence import Sequence


class FastModelRunner(ModelRunner):
    def __init__(self, model: LlamaForCausalLM, kv_manager: KVCacheManager, dtype: torch.dtype, *,
                 attention_backend: str = "auto", fused_kernels: bool = False, enforce_eager: bool = False,
                 max_num_seqs: int = 1, max_model_len: int = 1, eos_token_ids: frozenset[int] = frozenset(),
                 pack_projections: bool | None = None) -> None:
        super().__init__(model, kv_manager, dtype, attention_backend=attention_backend, fused_kernels=fused_kernels,
                         pack_projections=pack_projections, eos_token_ids=eos_token_ids)
        # CUDA graphs need kernels that read everything from device memory (not the torch reference): each
        # backend says whether its forward pass can be recorded (supports_cuda_graphs); if not, decode runs eager.
        if self.device.type == "cuda" and not enforce_eager and self.attention_backend.supports_cuda_graphs:
            self.decode_graphs = DecodeGraphs(model, self.kv_caches, kv_manager.block_size, max_num_seqs, max_model_len)
        self.in_flight: LaunchedStep | None = None  # the last step launched: where its tokens are on the device

    def run(self, batch: ScheduledBatch) -> list[SampledToken]:
        """A synchronous step (async scheduling off): launch it and wait for its tokens."""
        tokens = self.launch(batch).tokens()
        self.in_flight = None
        return tokens

    @torch.inference_mode()
    def launch(self, batch: ScheduledBatch) -> "LaunchedStep":
        """Queue one step on the device (forward pass and sampling) and return without waiting for its tokens.

        The step's sampling sequences get a placeholder each from the engine; the step after this one reads
        those tokens straight from the device (see _pending_rows). The result becomes self.in_flight.
        """
        self.copy_blocks()
        previous, self.in_flight = self.in_flight, LaunchedStep([], None)
        if not batch.seqs:
            return self.in_flight
        inputs = StepInputs.of(batch, self.kv)
        logits = self._forward(inputs, self._pending_rows(batch, previous), previous)
        if logits is None:
            return self.in_flight
        seqs = [batch.seqs[row] for row in inputs.sampling]
        token_ids, logprobs = sample_tokens(logits, seqs, self.eos_token_ids, self._pending_outputs(seqs, previous))
        self.in_flight = LaunchedStep(seqs, token_ids, logprobs)
        return self.in_flight

    def _forward(self, inputs: StepInputs, pending_rows: list[int] | None,
                 previous: "LaunchedStep | None") -> torch.Tensor | None:
        """Logits of the sampling sequences (None if none samples): a CUDA graph replay for a decode batch that
        fits one, else an eager forward pass."""
        previous_ids = previous.token_ids if pending_rows is not None else None
        graphs, batch_size = self.decode_graphs, len(inputs.query_lens)
        if len(inputs.input_ids) == batch_size and graphs is not None and graphs.can_run(batch_size):
            logits = graphs.run(inputs.input_ids, inputs.context_lens, inputs.block_tables, pending_rows, previous_ids)
            if len(inputs.sampling) == len(inputs.query_lens):
                return logits
            # A 1-token prefill chunk short of its prompt's end ran too (its K/V is written) but samples nothing.
            return logits[self._upload(int64_tensor(inputs.sampling))] if inputs.sampling else None
        # Built on the host, then copied without waiting for the step in flight (see _upload).
        positions, metadata = build_metadata(inputs.query_lens, inputs.context_lens, inputs.block_tables,
                                             self.kv.block_size, "cpu")
        positions, ids = self._upload(positions), self._upload(int64_tensor(inputs.input_ids))
        metadata = dataclasses.replace(metadata, **{
            name: self._upload(getattr(metadata, name))
            for name in ("cu_seqlens_q", "context_lens", "slot_mapping", "block_tables", "page_table")
            if getattr(metadata, name) is not None})
        if pending_rows is not None:
            fill_pending(ids, self._upload(int64_tensor(pending_rows)), previous_ids)
        hidden = self.model(ids, positions, metadata, self.kv_caches)
        if not inputs.sampling:
            return None
        # Logits in the model's dtype: every sampler upcasts what it computes on (see compute_logits).
        return self.model.compute_logits(hidden[self._upload(int64_tensor(inputs.last_token_rows()))], upcast=False)

    def _upload(self, host: torch.Tensor) -> torch.Tensor:
        """A host tensor on the device, copied asynchronously from pinned memory. A copy from ordinary (pageable)
        memory makes the host wait until the GPU has finished the step in flight, which stalls async scheduling:
        the next step could not be planned while a prefill runs. (torch's pinned-memory cache hands a staging
        buffer out again only once the copy reading it has finished.)"""
        if self.device.type != "cuda":
            return host.to(self.device)
        return host.pin_memory().to(self.device, non_blocking=True)

    def _pending_outputs(self, seqs: list[Sequence], previous: "LaunchedStep | None") -> torch.Tensor | None:
        """For penalties: each sampling sequence's output token still on the device (-1: none), or None when no
        sequence adjusts its logits or none has such a token."""
        if previous is None or previous.token_ids is None or not any(s.params.adjusts_logits for s in seqs):
            return None
        rows = [previous.row_of.get(s.seq_id, -1) if s.num_pending_tokens else -1 for s in seqs]
        if max(rows) < 0:
            return None
        index = torch.tensor(rows, device=self.device)
        return torch.where(index >= 0, previous.token_ids[index.clamp(min=0)], -1)

    @staticmethod
    def _pending_rows(batch: ScheduledBatch, previous: "LaunchedStep | None") -> list[int] | None:
        """For each input token, the row of last step's sampled tokens that holds its value, or -1 if the host
        has it. Only a sequence's newest token can be pending, and only from the step just before (every older
        step's tokens reached the host before this step was planned). None when no input is pending."""
        if previous is None or previous.token_ids is None:
            return None
        rows, any_pending = [], False
        for seq, n in zip(batch.seqs, batch.num_tokens):
            rows.extend([-1] * (n - 1))
            if seq.num_pending_tokens and seq.num_computed_tokens + n == seq.num_tokens:
                assert seq.num_pending_tokens == 1, "a token older than the previous step is still pending"
                rows.append(previous.row_of[seq.seq_id])
                any_pending = True
            else:
                rows.append(-1)
        return rows if any_pending else None


class LaunchedStep:
    """A step queued on the device: which sequences sample a token, and those tokens once they arrive.

    token_ids stay on the device for the next step's inputs; a copy to pinned host memory is queued behind
    them, and tokens() waits for that copy alone (an event), not for whatever was queued after this step.
    """

    def __init__(self, seqs: list[Sequence], token_ids: torch.Tensor | None, logprobs: StepLogprobs | None = None):
        self.seqs = seqs
        self.token_ids = token_ids
        self.row_of = {seq.seq_id: row for row, seq in enumerate(seqs)}
        self.logprob_rows = logprobs.rows if logprobs else []
        self._host: list[torch.Tensor] | None = None
        self._ready = None
        if token_ids is None:
            return
        tensors = [token_ids] + (logprobs.tensors if logprobs else [])
        if token_ids.device.type == "cuda":
            self._host = [torch.empty(t.shape, dtype=t.dtype, pin_memory=True) for t in tensors]
            for host, device_tensor in zip(self._host, tensors):
                host.copy_(device_tensor, non_blocking=True)
            self._ready = torch.cuda.Event()
            self._ready.record()
        else:
            self._host = tensors

    def tokens(self) -> list[SampledToken]:
        """The sampled tokens, in seqs order (waits until they have reached the host)."""
        if self._host is None:
            return []
        if self._ready is not None:
            self._ready.synchronize()
        return sampled_tokens(self.seqs, self._host, self.logprob_rows)
