"""Workloads: the requests a benchmark or a lab replays, and how they are served.

- Workload / make_workload: a benchmark's requests (prompt ids, requested output lengths, arrival times), drawn
  from a seed; the presets, the flags' parsers, and check_fits. `python -m reference bench` runs them in process
  (bench.py) or against a server (server/load.py).
- serve_arrivals (lab 0.2): the serving loop with arrivals. LLM.generate adds every prompt up front; a server
  adds requests while others are running, and that is where continuous batching pays. serve_arrivals replays such
  a workload on a logical clock of engine steps, so that a run is reproducible (the same steps, whatever the
  machine's speed) and timelines can be drawn in steps:

    clock = 0; before each step, add (in list order) every request whose arrival_step <= clock;
    if the engine then has nothing to do, jump the clock to the next arrival instead of stepping;
    otherwise call engine.step(), note what it returned at this clock value, and advance the clock by one.

  It works with any object that has LLMEngine's add_request / step / has_unfinished_requests.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import random
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # sampling imports torch, which `python -m reference --help` must not load
    from .sampling import SamplingParams
    from .tokenizer import Tokenizer

# Workload options a preset may set; the user's flags override them, and these fill whatever is still unset.
DEFAULTS = dict(num_requests=32, input_len=(32, 256), output_len=(16, 128), prompts="random", ignore_eos=True)
PRESETS = {
    # nano-vllm's own benchmark workload (meant for a GPU): 256 requests, lengths uniform in [100, 1024].
    "nano-vllm": dict(num_requests=256, input_len=(100, 1024), output_len=(100, 1024), prompts="random",
                      ignore_eos=True),
}

REAL_QUESTIONS = (
    "What is the capital of France?",
    "Explain how a rainbow forms.",
    "Write a haiku about autumn leaves.",
    "What are the main differences between Python lists and tuples?",
    "Give me three tips for a good night's sleep.",
    "How does a refrigerator keep food cold?",
    "Summarize the plot of Romeo and Juliet in two sentences.",
    "What is photosynthesis?",
    "Translate 'good morning, how are you?' into Spanish.",
    "Why is the sky blue?",
    "List five fruits that are high in vitamin C.",
    "What is the difference between weather and climate?",
    "How do I reverse a string in Python?",
    "Describe the water cycle for a ten-year-old.",
    "What causes the seasons on Earth?",
    "Suggest a name for a small bakery by the sea.",
)


def parse_range(text: str, name: str = "length") -> tuple[int, int]:
    """'32:256' -> (32, 256) (inclusive); '64' -> (64, 64). Raises ValueError naming the fix for anything else."""
    parts = str(text).split(":")
    try:
        if len(parts) not in (1, 2):
            raise ValueError
        low, high = int(parts[0]), int(parts[-1])
    except ValueError:
        raise ValueError(f"{name} {text!r} is not a length or a range: write N (fixed) or LOW:HIGH, "
                         f"e.g. '64' or '32:256'") from None
    if low < 1:
        raise ValueError(f"{name} {text!r} must be at least 1 token")
    if low > high:
        raise ValueError(f"{name} {text!r} is an empty range: LOW ({low}) must not exceed HIGH ({high})")
    return low, high


def parse_rate(text: str) -> float:
    """'inf' -> math.inf (all at once); 'R' -> R requests/s, R > 0."""
    try:
        rate = float(text)
    except ValueError:
        raise ValueError(f"rate {text!r} is not a number: give requests per second, or 'inf' for all at once") from None
    if not rate > 0:  # also rejects nan
        raise ValueError(f"rate {text!r} must be positive (requests per second), or 'inf' for all at once")
    return rate


# -- the workload -------------------------------------------------------------------------------------------------
@dataclass
class Workload:
    """The requests of one benchmark, in submission order. arrival_times are seconds after the start."""

    prompt_token_ids: list[list[int]]
    output_lens: list[int]
    arrival_times: list[float]
    prompt_kind: str  # "random" or "real"
    input_len: tuple[int, int] | None  # the range drawn from; None for real prompts (natural lengths)
    output_len: tuple[int, int]
    rate: float  # requests/s; math.inf = all at once
    ignore_eos: bool = True
    temperature: float = 0.0
    seed: int = 0

    @property
    def num_requests(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def input_lens(self) -> list[int]:
        return [len(p) for p in self.prompt_token_ids]

    def sampling_params(self, index: int) -> SamplingParams:
        from .sampling import SamplingParams

        # Greedy needs no seed; sampled requests get one each, so a seed reproduces the run's tokens.
        seed = None if self.temperature == 0 else self.seed + index
        return SamplingParams(temperature=self.temperature, max_tokens=self.output_lens[index],
                              ignore_eos=self.ignore_eos, seed=seed)

    def head(self, count: int) -> "Workload":
        """The first `count` requests (same arrival times)."""
        return dataclasses.replace(self, prompt_token_ids=self.prompt_token_ids[:count],
                                   output_lens=self.output_lens[:count], arrival_times=self.arrival_times[:count])

    def describe(self) -> str:
        def span(r):
            return f"{r[0]}" if r[0] == r[1] else f"uniform {r[0]}-{r[1]}"

        lens = self.input_lens
        prompts = (f"random token-id prompts, input {span(self.input_len)} tokens" if self.prompt_kind == "random"
                   else f"{min(len(REAL_QUESTIONS), self.num_requests)} built-in chat questions at natural "
                        f"lengths ({min(lens)}-{max(lens)} tokens)")
        arrivals = "all at once" if math.isinf(self.rate) else f"Poisson arrivals at {self.rate:g} req/s"
        sampling = "greedy" if self.temperature == 0 else f"temperature {self.temperature:g}"
        eos = "ignore EOS" if self.ignore_eos else "stop at EOS"
        return (f"{self.num_requests} requests, {prompts} (total {sum(lens)}), output {span(self.output_len)} "
                f"tokens ({eos}, requested {sum(self.output_lens)}), {arrivals}, {sampling}, seed {self.seed}")


def make_workload(
    num_requests: int,
    input_len: tuple[int, int],
    output_len: tuple[int, int],
    *,
    prompts: str = "random",
    vocab_size: int | None = None,
    tokenizer: "Tokenizer | None" = None,
    avoid_token_ids: set[int] | frozenset[int] = frozenset(),
    rate: float = math.inf,
    ignore_eos: bool = True,
    temperature: float = 0.0,
    seed: int = 0,
) -> Workload:
    """Draw a workload from random.Random(seed): same arguments, same workload.

    prompts="random" needs vocab_size (ids are drawn from [0, vocab_size) minus avoid_token_ids);
    prompts="real" needs a tokenizer with a chat template and ignores input_len.
    Draw order is lengths, then prompt ids, then arrivals, so changing the rate keeps the same requests.
    """
    if num_requests < 1:
        raise ValueError(f"num_requests must be at least 1, got {num_requests}")
    rng = random.Random(seed)
    input_lens = [rng.randint(*input_len) for _ in range(num_requests)]
    output_lens = [rng.randint(*output_len) for _ in range(num_requests)]
    if prompts == "random":
        if vocab_size is None:
            raise ValueError("random prompts need the model's vocab_size")
        allowed = [t for t in range(vocab_size) if t not in avoid_token_ids]
        prompt_ids = [[rng.choice(allowed) for _ in range(n)] for n in input_lens]
    elif prompts == "real":
        if tokenizer is None or not tokenizer.available:
            raise ValueError("--prompts real needs a model with tokenizer files; use --prompts random")
        questions = [REAL_QUESTIONS[i % len(REAL_QUESTIONS)] for i in range(num_requests)]
        prompt_ids = [tokenizer.apply_chat_template([{"role": "user", "content": q}]) for q in questions]
        input_len = None
    else:
        raise ValueError(f"prompts={prompts!r} is unknown; choose 'random' or 'real'")
    arrivals, clock = [], 0.0
    for _ in range(num_requests):
        arrivals.append(clock)  # the first request arrives at 0
        if not math.isinf(rate):
            clock += rng.expovariate(rate)
    workload = Workload(prompt_ids, output_lens, arrivals, prompts, input_len, tuple(output_len), rate,
                        ignore_eos, temperature, seed)
    workload.sampling_params(0)  # bad sampling values fail here, before anything runs
    return workload


def check_fits(workload: Workload, max_model_len: int) -> None:
    """Every request must fit max_model_len whole, or it would stop short and skew the token counts."""
    longest = max(i + o for i, o in zip(workload.input_lens, workload.output_lens))
    if longest > max_model_len:
        raise ValueError(
            f"the workload needs up to {longest} tokens per request (prompt + output) but max_model_len is "
            f"{max_model_len}; raise --max-model-len or shorten --input-len / --output-len"
        )


def workload_options(args: argparse.Namespace) -> dict:
    """num_requests, input_len, output_len, prompts, ignore_eos: the flag if given, else the preset's, else default."""
    preset = PRESETS[args.preset] if args.preset else {}
    return {name: getattr(args, name) if getattr(args, name) is not None else preset.get(name, default)
            for name, default in DEFAULTS.items()}


def serve_arrivals(engine, requests: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Serve `requests` on `engine`, each arriving at its step, until all have finished.

    requests: [{"request_id": str, "prompt": list[int], "max_tokens": int, "arrival_step": int}, ...] sorted by
        arrival_step; each is generated greedily (temperature 0) for exactly max_tokens tokens (ignore_eos).
    Returns {request_id: {"token_ids": the output token ids, "first_token_step": the clock of the step that gave
        its first output token, "finish_step": the clock of the step that finished it}}.
    """
    from .sampling import SamplingParams

    results: dict[str, dict[str, Any]] = {}
    pending = list(requests)
    clock = 0
    while pending or engine.has_unfinished_requests():
        if not engine.has_unfinished_requests() and pending[0]["arrival_step"] > clock:
            clock = pending[0]["arrival_step"]  # nothing to run until the next arrival
        while pending and pending[0]["arrival_step"] <= clock:
            request = pending.pop(0)
            params = SamplingParams(temperature=0.0, max_tokens=request["max_tokens"], ignore_eos=True)
            engine.add_request(request["request_id"], list(request["prompt"]), params)
        for output in engine.step():
            entry = results.setdefault(output.request_id, {"token_ids": [], "first_token_step": None,
                                                           "finish_step": None})
            entry["token_ids"] = list(output.outputs[0].token_ids)
            if entry["first_token_step"] is None and entry["token_ids"]:
                entry["first_token_step"] = clock
            if output.finished:
                entry["finish_step"] = clock
        clock += 1
    return results
