"""Sampling: turning a batch of next-token logits into next tokens.

This module owns `SamplingParams` (what a request asks for: temperature, top-k, top-p, seed, stop conditions,
logprobs) and the pure functions that act on logits: `sample`, `compute_logprobs` and `seeded_generator`.
It must not touch the model, the KV cache or the scheduler: it sees logits, never sequences, and it does not
decide when a sequence stops (the engine reads `stop`, `stop_token_ids`, `max_tokens` and `ignore_eos`).
"""

from __future__ import annotations

import difflib
import math
import numbers
from dataclasses import dataclass, fields
from typing import Any, NamedTuple

import torch

# Temperatures below this are sampled as argmax: dividing logits by a near-denormal overflows to inf (softmax
# then gives NaN), while the distribution is already a point mass on the top token.
GREEDY_BELOW = 1e-5
# Every stop string is looked for after every token, so their number and length bound that cost (OpenAI allows 4).
MAX_STOP_STRINGS = 16
MAX_STOP_CHARS = 256


def _is_int(value: Any) -> bool:
    # bool is an int in Python, but `max_tokens=True` is a bug, not a request for one token.
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _invalid(name: str, value: Any, requirement: str) -> ValueError:
    shown = repr(value)
    if len(shown) > 80:  # a 50,000-entry list is not worth echoing back
        shown = shown[:60] + f"... ({len(shown)} characters)"
    return ValueError(f"SamplingParams({name}={shown}): {name} must be {requirement}")


@dataclass
class SamplingParams:
    """How to pick the tokens of one request. Validated and normalised on construction.

    n: how many independent samples (output sequences) to generate for the prompt, >= 1.
    temperature: logits are divided by it before sampling; 0 means greedy (argmax), >= 0.
    top_p: nucleus sampling, keep the smallest set of most-probable tokens whose mass reaches top_p, in (0, 1].
    top_k: keep the k most-probable tokens; -1 keeps all.
    max_tokens: the most output tokens to generate, >= 1.
    stop: strings that end the output; normalised to a list (None -> []); at most MAX_STOP_STRINGS of at most
        MAX_STOP_CHARS characters each.
    stop_token_ids: token ids that end the output; normalised to a list (None -> []).
    ignore_eos: keep generating past the model's end-of-sequence token.
    seed: makes this request's tokens reproducible whatever else is in the batch; None uses the global RNG.
    logprobs: None for no logprobs; k >= 0 returns the chosen token's logprob plus the k most likely tokens'.
    min_tokens: the output cannot end (EOS, stop_token_ids, stop strings) before this many tokens, <= max_tokens.
    logit_bias: {token id: amount in [-100, 100]} added to those tokens' logits.
    repetition_penalty: > 0; 1 is none. Tokens already in the prompt or output: logit / r if positive, * r if not.
    frequency_penalty, presence_penalty: in [-2, 2]; a token's logit loses frequency_penalty per time it was
        generated and presence_penalty once if it was (penalties.py applies all five, before temperature).
    best_of: None (= n) or an integer >= n: generate best_of samples and return the n with the highest
        cumulative logprob (the sum of the logprobs `logprobs` reports for a sample's tokens). With temperature 0
        every sample is the same argmax, so it is allowed but only n run (ranking equal samples keeps the first n).
    """

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    max_tokens: int = 16
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    seed: int | None = None
    logprobs: int | None = None
    min_tokens: int = 0
    logit_bias: dict[int, float] | None = None
    repetition_penalty: float = 1.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    best_of: int | None = None

    # The dataclass __init__ would reject a misspelt keyword with a TypeError; __new__ sees the same arguments
    # first, so it can turn that into a ValueError that names the valid fields without rewriting __init__.
    def __new__(cls, *args: Any, **kwargs: Any) -> "SamplingParams":
        valid = [f.name for f in fields(cls)]
        for name in kwargs:
            if name not in valid:
                close = difflib.get_close_matches(name, valid, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise ValueError(
                    f"SamplingParams got an unknown field {name!r}{hint}; valid fields: {', '.join(valid)}"
                )
        return super().__new__(cls)

    def __post_init__(self) -> None:
        for name, minimum in (("n", 1), ("max_tokens", 1)):
            value = getattr(self, name)
            if not _is_int(value) or value < minimum:
                raise _invalid(name, value, f"an integer >= {minimum}")
            setattr(self, name, int(value))
        if self.best_of is not None:
            if not _is_int(self.best_of) or self.best_of < self.n:
                raise _invalid("best_of", self.best_of, f"None or an integer >= n={self.n}")
            self.best_of = int(self.best_of)

        if not _is_number(self.temperature) or not math.isfinite(self.temperature) or self.temperature < 0:
            raise _invalid("temperature", self.temperature, "a finite number >= 0 (0 means greedy)")
        self.temperature = float(self.temperature)

        if not _is_number(self.top_p) or not 0 < self.top_p <= 1:
            raise _invalid("top_p", self.top_p, "a number in (0, 1] (1.0 keeps every token)")
        self.top_p = float(self.top_p)

        if not _is_int(self.top_k) or not (self.top_k == -1 or self.top_k >= 1):
            raise _invalid("top_k", self.top_k, "-1 (keep every token) or an integer >= 1")
        self.top_k = int(self.top_k)

        if self.logprobs is not None:
            if not _is_int(self.logprobs) or self.logprobs < 0:
                raise _invalid("logprobs", self.logprobs, "None or an integer >= 0")
            self.logprobs = int(self.logprobs)

        if self.seed is not None:
            if not _is_int(self.seed):
                raise _invalid("seed", self.seed, "None or an integer")
            self.seed = int(self.seed)

        if not isinstance(self.ignore_eos, bool):
            raise _invalid("ignore_eos", self.ignore_eos, "True or False")

        self.stop = self._normalise_stop(self.stop)
        self.stop_token_ids = self._normalise_stop_token_ids(self.stop_token_ids)
        self._check_adjustments()

    def _check_adjustments(self) -> None:
        if not _is_int(self.min_tokens) or not 0 <= self.min_tokens <= self.max_tokens:
            raise _invalid("min_tokens", self.min_tokens, f"an integer in [0, max_tokens={self.max_tokens}]")
        self.min_tokens = int(self.min_tokens)
        for name in ("frequency_penalty", "presence_penalty"):
            value = getattr(self, name)
            if not _is_number(value) or not -2 <= value <= 2:
                raise _invalid(name, value, "a number in [-2, 2] (0 is none)")
            setattr(self, name, float(value))
        r = self.repetition_penalty
        if not _is_number(r) or not math.isfinite(r) or r <= 0:
            raise _invalid("repetition_penalty", r, "a finite number > 0 (1 is none)")
        self.repetition_penalty = float(r)
        bias = self.logit_bias
        if bias is not None:
            if not isinstance(bias, dict) or not all(
                    _is_int(t) and t >= 0 and _is_number(b) and -100 <= b <= 100 for t, b in bias.items()):
                raise _invalid("logit_bias", bias, "None or a dict {token id >= 0: bias in [-100, 100]}")
            self.logit_bias = {int(t): float(b) for t, b in bias.items()} or None
        # computed once: the samplers ask it of every sequence at every step
        self.adjusts_logits = bool(self.min_tokens or self.logit_bias or self.repetition_penalty != 1.0
                                   or self.frequency_penalty or self.presence_penalty)

    @staticmethod
    def _normalise_stop(stop: Any) -> list[str]:
        stops = [stop] if isinstance(stop, str) else ([] if stop is None else stop)
        if not isinstance(stops, (list, tuple)) or not all(isinstance(s, str) and s for s in stops):
            raise _invalid("stop", stop, "None, a non-empty string, or a list of non-empty strings")
        if len(stops) > MAX_STOP_STRINGS or any(len(s) > MAX_STOP_CHARS for s in stops):
            raise _invalid("stop", stop, f"at most {MAX_STOP_STRINGS} strings of at most {MAX_STOP_CHARS} "
                                         "characters each")
        return list(stops)

    @staticmethod
    def _normalise_stop_token_ids(ids: Any) -> list[int]:
        ids_list = [] if ids is None else ids
        if not isinstance(ids_list, (list, tuple)) or not all(_is_int(i) and i >= 0 for i in ids_list):
            raise _invalid("stop_token_ids", ids, "None or a list of integers >= 0")
        return [int(i) for i in ids_list]

    @property
    def greedy(self) -> bool:
        """True when temperature is 0: the next token is the argmax of the logits."""
        return self.temperature == 0

    @property
    def num_samples(self) -> int:
        """How many samples the engine runs: best_of (None = n), or n when greedy (the rest would repeat them)."""
        return self.n if self.best_of is None or self.greedy else self.best_of

    @property
    def ranks_samples(self) -> bool:
        """More samples run than are returned: the engine keeps the n with the highest cumulative logprob."""
        return self.num_samples > self.n

    @property
    def needs_logprobs(self) -> bool:
        """The sampled tokens' logprobs are computed: asked for, or needed to rank best_of samples."""
        return self.logprobs is not None or self.ranks_samples


def sample(
    logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator | None]
) -> torch.Tensor:
    """Pick one next token per row.

    logits: [batch, vocab] float32 (other float dtypes are upcast), on CPU or CUDA.
    params[i], generators[i]: the sampling parameters and the RNG of row i; a None generator draws from torch's
        default generator, a generator (on logits.device) makes row i independent of the rest of the batch.
    Returns [batch] int64 token ids on logits.device.

    Per row: greedy (temperature 0) -> argmax. Otherwise logits / temperature, then top-k, then top-p on the
    resulting distribution, then one draw from softmax of what is left.
    """
    if logits.dim() != 2:
        raise ValueError(f"logits must be [batch, vocab]; got shape {tuple(logits.shape)}")
    batch, vocab = logits.shape
    if len(params) != batch or len(generators) != batch:
        raise ValueError(
            f"need one SamplingParams and one generator per logits row: {batch} rows, "
            f"{len(params)} params, {len(generators)} generators"
        )
    sampled = [i for i, p in enumerate(params) if p.temperature >= GREEDY_BELOW]
    if not sampled:  # argmax needs no upcast (converting to float32 is exact and keeps the order)
        return argmax(logits)
    logits = logits.float()
    next_tokens = argmax(logits)

    device = logits.device
    rows = torch.tensor(sampled, device=device)
    temperatures = torch.tensor([params[i].temperature for i in sampled], device=device, dtype=torch.float32)
    scaled = logits[rows] / temperatures[:, None]
    filtered = _apply_top_k_top_p(scaled, [params[i].top_k for i in sampled], [params[i].top_p for i in sampled])
    probs = filtered.softmax(dim=-1)
    noise = _exponential_noise(probs, [generators[i] for i in sampled])
    # Exponential race: if E_j ~ Exp(1) i.i.d., then E_j / p_j ~ Exp(rate p_j), and the smallest of independent
    # exponentials is j with probability p_j / sum(p). So argmax(p / E) is one multinomial draw from p, and each
    # row's draw depends only on that row's noise, which a per-row generator controls.
    next_tokens[rows] = argmax(probs / noise)
    return next_tokens


ARGMAX_CHUNK = 256  # columns per chunk of the CPU's two-step argmax


def argmax(scores: torch.Tensor) -> torch.Tensor:
    """scores.argmax(dim=-1) for [rows, vocab]: the same ids (the first maximum of a row; a NaN counts as the
    maximum, as in torch), faster on the CPU. There torch's argmax is a scalar loop, 2.7 ms for 45 rows of
    SmolLM2's 49,152 logits (2% of a decode step), while amax is vectorised: so take each chunk's maximum, the
    first chunk holding the row's maximum (an argmax over 192 values), then the first maximum inside it: 0.35 ms."""
    rows, vocab = scores.shape
    if scores.device.type != "cpu" or vocab % ARGMAX_CHUNK:
        return scores.argmax(dim=-1)
    chunks = scores.reshape(rows, vocab // ARGMAX_CHUNK, ARGMAX_CHUNK)
    best = chunks.amax(dim=-1).argmax(dim=-1)  # no earlier chunk holds a value as large (or a NaN)
    return best * ARGMAX_CHUNK + chunks[torch.arange(rows), best].argmax(dim=-1)


def _apply_top_k_top_p(scaled: torch.Tensor, top_ks: list[int], top_ps: list[float]) -> torch.Tensor:
    """Set the logits outside each row's top-k and then top-p set to -inf.

    scaled: [rows, vocab] float32, temperature already applied. top_ks, top_ps: one per row (-1 / 1.0 = no-op).
    Returns [rows, vocab] float32.
    """
    if all(k == -1 or k >= scaled.shape[1] for k in top_ks) and all(p >= 1 for p in top_ps):
        return scaled
    return scaled.masked_fill(scaled < filter_thresholds(scaled, top_ks, top_ps)[:, None], float("-inf"))


def filter_thresholds(scaled: torch.Tensor, top_ks: list[int], top_ps: list[float]) -> torch.Tensor:
    """Each row's top-k-then-top-p set as a threshold: the set is the tokens whose value is >= it.

    scaled: [rows, vocab] float32, temperature already applied. top_ks, top_ps: one per row (-1 / 1.0 = no-op).
    Returns [rows] float32 (-inf where nothing is cut). A threshold rather than a position keeps every token tied
    with the last one kept, for top-k and top-p alike, so the set does not depend on how a sort orders ties.
    The GPU sampler (fused_sampling.py) takes the same thresholds, so both samplers cut the same tokens.
    """
    num_rows, vocab = scaled.shape
    device = scaled.device
    k = torch.tensor([vocab if k == -1 else min(k, vocab) for k in top_ks], device=device)
    p = torch.tensor(top_ps, device=device, dtype=torch.float32)[:, None]
    sorted_values = scaled.sort(dim=-1, descending=True).values
    kth_largest = sorted_values.gather(-1, (k - 1)[:, None])
    top_k_values = sorted_values.masked_fill(sorted_values < kth_largest, float("-inf"))
    sorted_probs = top_k_values.softmax(dim=-1)
    # A token stays while the mass strictly before it is < top_p: the smallest set reaching top_p, and the top
    # token (mass before it 0 < top_p) always stays. Rows with top_p = 1 skip this, as float32 cumsum can reach
    # 1.0 before the tail and would drop tokens that a no-op must keep.
    mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
    in_nucleus = (mass_before < p) | (p >= 1)
    num_kept = torch.minimum(in_nucleus.sum(dim=-1), k)  # a prefix of the sorted row: count it
    thresholds = sorted_values.gather(-1, (num_kept - 1)[:, None]).squeeze(-1)
    return torch.where(num_kept >= vocab, float("-inf"), thresholds)


def _exponential_noise(probs: torch.Tensor, generators: list[torch.Generator | None]) -> torch.Tensor:
    """[rows, vocab] float32 of Exp(1) draws: one batched draw for rows without a generator, one per other row."""
    noise = torch.empty_like(probs)
    unseeded = [r for r, g in enumerate(generators) if g is None]
    if len(unseeded) == len(generators):
        noise.exponential_()
    elif unseeded:
        unseeded_rows = torch.tensor(unseeded, device=probs.device)
        noise[unseeded_rows] = torch.empty(len(unseeded), probs.shape[1], device=probs.device).exponential_()
    for r, generator in enumerate(generators):
        if generator is not None:
            noise[r].exponential_(generator=generator)
    # A draw of exactly 0 would make p / E a 0 / 0 = NaN for a filtered-out token, and argmax picks NaN.
    return noise.clamp_(min=torch.finfo(noise.dtype).tiny)


_MASK_64 = (1 << 64) - 1


def _mix64(x: int) -> int:
    """A fixed 64-bit integer hash (the splitmix64 finaliser): nearby inputs give unrelated outputs."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK_64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK_64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK_64
    return x ^ (x >> 31)


def seed_state(seed: int, sample_index: int, position: int) -> int:
    """The 63-bit RNG seed of one token of one seeded sample: a hash of (seed, sample_index, position) alone.

    seed: the request's SamplingParams.seed (any int). sample_index: which of the request's n samples, >= 0.
    position: which token of that sample is being drawn, >= 0 (the engine's counter; it must count the same way
    on every run, e.g. the number of tokens so far). Different triples are decorrelated by the hash, so the n
    samples differ; the same triple always gives the same state, so the token does not depend on the batch.
    """
    for name, value, minimum in (("sample_index", sample_index, 0), ("position", position, 0)):
        if not _is_int(value) or value < minimum:
            raise ValueError(f"{name}={value!r} must be an integer >= {minimum}")
    if not _is_int(seed):
        raise ValueError(f"seed={seed!r} must be an integer")
    state = _mix64(int(seed) & _MASK_64)  # negative seeds wrap into 64 bits like an unsigned cast
    state = _mix64(state ^ int(sample_index))
    state = _mix64(state ^ int(position))
    return state >> 1  # 63 bits: fits every API that stores seeds as signed int64


def seeded_generator(seed: int, sample_index: int, position: int, device: torch.device | str) -> torch.Generator:
    """A torch generator for one token of one seeded sample, seeded with seed_state(seed, sample_index, position),
    on `device` (where the logits live). The slow sampler (`sample`) draws its noise from it."""
    generator = torch.Generator(device=device)
    generator.manual_seed(seed_state(seed, sample_index, position))
    return generator


class TokenLogprobs(NamedTuple):
    """What compute_logprobs returns; top_ids/top_logprobs are None when no top tokens were asked for."""

    token_logprobs: torch.Tensor  # [batch] float32: log p(chosen token)
    top_ids: torch.Tensor | None  # [batch, num_top] int64, most likely first
    top_logprobs: torch.Tensor | None  # [batch, num_top] float32, matching top_ids


def compute_logprobs(logits: torch.Tensor, token_ids: torch.Tensor, num_top: int | None) -> TokenLogprobs:
    """Log-probabilities of the model's raw distribution (before temperature, top-k and top-p, as vLLM reports).

    logits: [batch, vocab] float; token_ids: [batch] integer, the chosen tokens; num_top: None or 0 for only the
    chosen tokens' logprobs, k >= 1 to also return the k most likely tokens per row.
    """
    if logits.dim() != 2 or token_ids.shape != logits.shape[:1]:
        raise ValueError(
            f"need logits [batch, vocab] and token_ids [batch]; "
            f"got {tuple(logits.shape)} and {tuple(token_ids.shape)}"
        )
    vocab = logits.shape[1]
    if num_top is not None and (not _is_int(num_top) or not 0 <= num_top <= vocab):
        raise ValueError(f"num_top={num_top!r} must be None or an integer in [0, vocab={vocab}]")
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    token_logprobs = logprobs.gather(-1, token_ids.long()[:, None]).squeeze(-1)
    if not num_top:
        return TokenLogprobs(token_logprobs, None, None)
    top_logprobs, top_ids = logprobs.topk(num_top, dim=-1)
    return TokenLogprobs(token_logprobs, top_ids, top_logprobs)
