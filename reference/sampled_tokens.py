"""What a runner hands back after a step: the sampled token of each sequence that sampled, with its logprobs.

Both runners (model_runner.py, fast_runner.py) sample the same way and build the same SampledTokens, so their
tokens agree: the sampling itself is sampling.py's (fused_sampling.py's two-round race on a GPU, same
distribution); this module applies it to a step's sequences.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .penalties import adjust_logits
from .sampling import GREEDY_BELOW, TokenLogprobs, compute_logprobs, sample, seed_state, seeded_generator
from .sequence import Sequence


@dataclass
class SampledToken:
    seq: Sequence
    token_id: int
    logprob: float | None = None
    top_logprobs: dict[int, float] | None = None


@dataclass
class StepLogprobs:
    """Logprobs of the rows that asked for them (rows index the sampling sequences)."""

    rows: list[int]
    values: TokenLogprobs | None = None

    @property
    def tensors(self) -> list[torch.Tensor]:
        return [t for t in self.values if t is not None] if self.values is not None else []


def sample_tokens(logits: torch.Tensor, seqs: list[Sequence], eos_token_ids: frozenset[int] = frozenset(),
                  pending: torch.Tensor | None = None) -> tuple[torch.Tensor, StepLogprobs]:
    """Each sequence's next token (a seeded sample draws from its own generator) and the logprobs asked for.

    Requests with min_tokens, logit_bias or penalties have their logits adjusted first (penalties.py), from
    what each sequence has said; pending: see adjust_logits (the fast runner's tokens still on the device)."""
    params = [s.params for s in seqs]
    if any(p.adjusts_logits for p in params):
        stops = [[] if s.params.ignore_eos else sorted(eos_token_ids) for s in seqs]
        logits = adjust_logits(logits, params, [s.prompt_token_ids for s in seqs],
                               [s.output_token_ids for s in seqs],
                               [stop + s.params.stop_token_ids for stop, s in zip(stops, seqs)], pending)
    token_ids = _sample(logits, seqs)
    # best_of ranks samples by these same logprobs, so they are computed for it even when nobody shows them. They
    # are of the logits after penalties and logit_bias but before temperature, top-k and top-p: the model's own
    # distribution as the request shaped it, so ranking does not favour a sample for what temperature did.
    rows = [i for i, p in enumerate(params) if p.needs_logprobs]
    if not rows:
        return token_ids, StepLogprobs([])
    index = torch.tensor(rows, device=logits.device)
    num_top = max(params[i].logprobs or 0 for i in rows)
    return token_ids, StepLogprobs(rows, compute_logprobs(logits[index], token_ids[index], num_top or None))


def _sample(logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
    """On a GPU, the fused sampler (fused_sampling.py) when a row samples; elsewhere sampling.sample."""
    params = [s.params for s in seqs]
    seeded = [s.params.seed is not None and not s.params.greedy for s in seqs]
    if logits.device.type == "cuda" and not all(p.temperature < GREEDY_BELOW for p in params):
        from . import fused_sampling  # imports Triton: only once a GPU samples

        seeds = [seed_state(s.params.seed, s.sample_index, s.num_tokens) if on else None
                 for s, on in zip(seqs, seeded)]
        return fused_sampling.sample(logits, params, seeds)
    generators = [seeded_generator(s.params.seed, s.sample_index, s.num_tokens, logits.device) if on else None
                  for s, on in zip(seqs, seeded)]
    return sample(logits, params, generators)


def sampled_tokens(seqs: list[Sequence], host: list[torch.Tensor], logprob_rows: list[int]) -> list[SampledToken]:
    """SampledTokens from host tensors: [token_ids, token logprobs, top ids, top logprobs] (the last three only
    when logprob_rows is not empty, the top ones only when asked for)."""
    token_ids, *logprobs = (t.tolist() for t in host)
    results = [SampledToken(s, t) for s, t in zip(seqs, token_ids)]
    if logprob_rows:
        token_logprobs, top = logprobs[0], logprobs[1:]  # top: [ids, logprobs] when asked for
        for j, i in enumerate(logprob_rows):
            results[i].logprob = token_logprobs[j]
            k = seqs[i].params.logprobs
            if k and top:
                results[i].top_logprobs = dict(zip(top[0][j][:k], top[1][j][:k]))
    return results
