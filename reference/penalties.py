"""Logit adjustments that depend on what a sequence has already said: min_tokens, logit_bias and the
repetition, frequency and presence penalties (OpenAI's and vLLM's meanings). They run before temperature,
top-k and top-p (sampling.py), on greedy rows too, in this order:

1. min_tokens: while a sequence has fewer output tokens than that, its stop tokens (EOS unless ignore_eos, and
   stop_token_ids) get -inf, so it cannot end early;
2. logit_bias: a fixed amount added to chosen tokens' logits;
3. repetition_penalty r (Hugging Face's, over prompt and output): a token already seen has its logit divided by
   r when positive and multiplied by r when negative (r > 1 discourages it either way);
4. frequency_penalty f and presence_penalty p (OpenAI's, over the output only): a token's logit loses
   f * (times it was generated) + p * (1 if it was generated at all).

`adjust_logits` does it for a batch in a few tensor operations; `adjust_logits_slow` is its plain twin, one row
and one token at a time, that the tests compare it with.
"""

from __future__ import annotations

from collections import Counter

import torch

from .sampling import SamplingParams


def needs_adjusting(params: SamplingParams) -> bool:
    return params.adjusts_logits


def adjust_logits(logits: torch.Tensor, params: list[SamplingParams], prompts: list[list[int]],
                  outputs: list[list[int]], stop_ids: list[list[int]],
                  pending: torch.Tensor | None = None) -> torch.Tensor:
    """logits [rows, vocab] -> float32 logits with each row's adjustments applied (a new tensor, or `logits`
    itself when no row asks for any).

    prompts[i], outputs[i]: row i's prompt and output token ids known on the host; pending: optional int64 [rows]
    on logits' device, the output token of row i that is still on the device (-1 for none; async scheduling).
    stop_ids[i]: the tokens min_tokens keeps out (EOS unless ignore_eos, and stop_token_ids)."""
    rows = [i for i, p in enumerate(params) if needs_adjusting(p)]
    if not rows:
        return logits
    device, vocab = logits.device, logits.shape[1]
    logits = logits.float().clone()
    index = torch.tensor(rows, device=device)
    sub = logits[index]
    counts = _output_counts([outputs[i] for i in rows], vocab, device)
    if pending is not None:
        mine = pending[index]
        has = mine >= 0
        counts[has.nonzero().squeeze(1), mine[has]] += 1
    generated = counts.sum(dim=1)  # output tokens so far, pending included
    for j, i in enumerate(rows):
        p = params[i]
        if p.min_tokens and int(generated[j]) < p.min_tokens and stop_ids[i]:
            sub[j, torch.tensor(stop_ids[i], device=device)] = float("-inf")
        if p.logit_bias:
            ids = torch.tensor(list(p.logit_bias), device=device)
            sub[j, ids] += torch.tensor(list(p.logit_bias.values()), device=device, dtype=torch.float32)
    r = torch.tensor([params[i].repetition_penalty for i in rows], device=device)[:, None]
    seen = _mask([prompts[i] for i in rows], vocab, device) | (counts > 0)
    sub = torch.where(seen & (r != 1), torch.where(sub > 0, sub / r, sub * r), sub)
    f = torch.tensor([params[i].frequency_penalty for i in rows], device=device)[:, None]
    presence = torch.tensor([params[i].presence_penalty for i in rows], device=device)[:, None]
    sub = sub - f * counts - presence * (counts > 0)
    logits[index] = sub
    return logits


def _output_counts(token_lists: list[list[int]], vocab: int, device) -> torch.Tensor:
    """[rows, vocab] float32: how often each token occurs in each list (one scatter over a padded matrix)."""
    width = max((len(t) for t in token_lists), default=0)
    padded = torch.full((len(token_lists), width + 1), vocab, dtype=torch.int64)  # column `vocab` = padding
    for row, tokens in enumerate(token_lists):
        padded[row, : len(tokens)] = torch.tensor(tokens, dtype=torch.int64)
    counts = torch.zeros(len(token_lists), vocab + 1, device=device)
    counts.scatter_add_(1, padded.to(device), torch.ones(padded.shape, device=device))
    return counts[:, :vocab]


def _mask(token_lists: list[list[int]], vocab: int, device) -> torch.Tensor:
    return _output_counts(token_lists, vocab, device) > 0


def adjust_logits_slow(logits: torch.Tensor, params: list[SamplingParams], prompts: list[list[int]],
                       outputs: list[list[int]], stop_ids: list[list[int]]) -> torch.Tensor:
    """The plain twin of adjust_logits (no pending tokens): every row, every token, one at a time."""
    out = logits.float().clone()
    for i, p in enumerate(params):
        if not needs_adjusting(p):
            continue
        counts = Counter(outputs[i])
        if len(outputs[i]) < p.min_tokens:
            for token in stop_ids[i]:
                out[i, token] = float("-inf")
        for token, bias in (p.logit_bias or {}).items():
            out[i, token] += bias
        for token in set(prompts[i]) | set(outputs[i]):
            if p.repetition_penalty != 1.0:
                value = out[i, token]
                out[i, token] = value / p.repetition_penalty if value > 0 else value * p.repetition_penalty
        for token, count in counts.items():
            out[i, token] -= p.frequency_penalty * count + p.presence_penalty
    return out
