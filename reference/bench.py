"""Offline benchmark of the engine: throughput and latency on a synthetic workload (`python -m reference bench`).

What it measures. A workload of N requests (prompt token ids, a requested output length, an arrival time) runs
through one `LLMEngine` in this process. Reported: output tokens/s, total (prompt + output) tokens/s and
requests/s over the wall time from the first arrival to the last finish; per-request latency (TTFT, TPOT,
end-to-end, queueing) as mean/P50/P90/P99; and what the engine's steps did (tokens per step, preemptions, peak KV
usage). With `--baseline hf` the same requests also go through Hugging Face `generate` on the same weights, and
the two output throughputs are compared per requested output token.

How. Lengths are uniform in the given inclusive ranges, drawn from `random.Random(seed)`, so a seed fixes the
workload. `random` prompts are token ids drawn uniformly from the vocabulary (EOS ids excluded); `real` prompts
are a built-in list of questions, chat-templated, at their natural lengths (`--input-len` is not used). With
`--ignore-eos` (the default) every request generates exactly its requested length, so runs are comparable.
`--rate inf` submits every request at once; `--rate R` draws Poisson arrivals (exponential gaps, mean 1/R s)
and the loop submits each request once its arrival time has passed, stepping the engine meanwhile; latencies
count from that scheduled arrival time, so time spent waiting for a busy step is included. One short warm-up
request runs before the clock starts.

The HF baseline is what a server without continuous batching does: static batches of `max_num_seqs` requests,
left-padded with an attention mask, every row generating the batch's longest requested length (EOS suppressed).
Only each request's own requested tokens count as useful output; the rest is reported as padding waste.

This module only drives the public engine API and reads its step log; it must not change how the engine works.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from .flags import add_engine_flags, add_model_flags
from .metrics import Throughput
from .progress import ProgressBar
from .flags import engine_options as flag_engine_options
from .workload import DEFAULTS, PRESETS, Workload, check_fits, make_workload, parse_range, parse_rate, workload_options

if TYPE_CHECKING:  # keep `python -m reference --help` fast: torch and the engine load only when a bench runs
    import torch

    from .engine import LLMEngine
    from .metrics import StepRecord, Summary
    from .costs import Floor
    from .outputs import RequestOutput

# The in-process engine a preset's published numbers were measured with: a random-weight Qwen3-0.6B in bf16 with
# every request running at once. Flags given override it; without a preset the engine's own defaults apply.
ENGINE_DEFAULTS = dict(model="smollm2", dtype=None, max_num_seqs=None, max_num_batched_tokens=None,
                       max_model_len=None)
PRESET_ENGINES = {
    "nano-vllm": dict(model="random:qwen3-0.6b", dtype="bfloat16", max_num_seqs=256, max_num_batched_tokens=8192,
                      max_model_len=2048),
}

REQUEST_ID_PREFIX = "bench-"


# -- parsing ------------------------------------------------------------------------------------------------------
def _argparse_type(parse, *args):
    """Wrap a parser so argparse prints our message instead of 'invalid value'."""
    def convert(text: str):
        try:
            return parse(text, *args)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
    convert.__name__ = parse.__name__
    return convert


def _positive_int(text: str, name: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise ValueError(f"{name} {text!r} is not an integer") from None
    if value < 1:
        raise ValueError(f"{name} must be at least 1, got {value}")
    return value


# -- running the engine -------------------------------------------------------------------------------------------
@dataclass
class EngineRun:
    outputs: list["RequestOutput"]  # in workload order; metrics.arrival_time is the scheduled arrival
    summary: "Summary"
    steps: list["StepRecord"]  # the engine steps of this run only

    def step_stats(self) -> dict[str, float]:
        count = len(self.steps)
        return {
            "steps": count,
            "mean_prefill_tokens_per_step": sum(s.num_prefill_tokens for s in self.steps) / max(count, 1),
            "mean_decode_tokens_per_step": sum(s.num_decode_tokens for s in self.steps) / max(count, 1),
            "mean_seqs_per_step": sum(len(s.scheduled) for s in self.steps) / max(count, 1),
            "preemptions": sum(s.num_preempted for s in self.steps),
            "peak_kv_usage": max((s.kv_usage for s in self.steps), default=0.0),
        }


def run_engine(engine: "LLMEngine", workload: Workload, use_tqdm: bool = True) -> EngineRun:
    """Submit the workload's requests at their arrival times and step the engine until all have finished."""
    from .metrics import summarize

    check_fits(workload, engine.config.max_model_len)
    _warm_up(engine)
    request_ids = [f"{REQUEST_ID_PREFIX}{i}" for i in range(workload.num_requests)]
    final: dict[str, RequestOutput] = {}
    first_step = len(engine.step_log)
    start = time.monotonic()
    submitted = 0
    with ProgressBar(workload.num_requests, "bench (engine)", use_tqdm) as bar:
        while len(final) < workload.num_requests:
            now = time.monotonic()
            while submitted < workload.num_requests and start + workload.arrival_times[submitted] <= now:
                engine.add_request(request_ids[submitted], workload.prompt_token_ids[submitted],
                                   workload.sampling_params(submitted))
                submitted += 1
            if not engine.has_unfinished_requests():  # idle until the next arrival
                assert submitted < workload.num_requests, "engine idle with requests unfinished"
                time.sleep(max(0.0, start + workload.arrival_times[submitted] - time.monotonic()))
                continue
            for out in engine.step(only_finished=True):
                if out.request_id.startswith(REQUEST_ID_PREFIX):
                    final[out.request_id] = out
                    bar.finished(out)
    outputs = []
    for request_id, offset in zip(request_ids, workload.arrival_times):
        out = final[request_id]
        # Latency counts from when the request arrived, not from when the busy loop got round to adding it.
        outputs.append(dataclasses.replace(out, metrics=dataclasses.replace(out.metrics, arrival_time=start + offset)))
    wall_time = max(o.metrics.finish_time for o in outputs) - start
    return EngineRun(outputs, summarize(outputs, wall_time), engine.step_log[first_step:])


def _warm_up(engine: "LLMEngine", every_step_kind: bool | None = None) -> None:
    """Throwaway requests, so that one-off costs stay out of the measurement (reference/warmup.py). An engine on a
    GPU already ran them at start (engine.warm_up_seconds), so only the CPU or an explicit request runs them here."""
    from .warmup import warm_up

    if every_step_kind is None and getattr(engine, "warm_up_seconds", None) is not None:
        return
    warm_up(engine, every_step_kind)


# -- the Hugging Face baseline ------------------------------------------------------------------------------------
@dataclass
class HFRun(Throughput):
    num_requests: int
    batch_size: int
    wall_time: float
    prompt_tokens: int
    useful_output_tokens: int  # what the requests asked for
    generated_tokens: int  # what the padded static batches produced (rows x the batch's longest request)

    @property
    def output_tokens(self) -> int:
        return self.useful_output_tokens

    @property
    def padding_waste(self) -> float:
        return 1 - self.useful_output_tokens / self.generated_tokens


def run_hf_baseline(
    model: "str | Path | torch.nn.Module",
    workload: Workload,
    batch_size: int,
    device: "torch.device | str" = "cpu",
    dtype: "torch.dtype | None" = None,
    use_tqdm: bool = True,
) -> HFRun:
    """transformers `generate` on the workload in static batches of batch_size, all requests already there.

    Each batch is left-padded to its longest prompt (pad positions masked) and generates exactly the batch's
    longest requested output length in every row (min_new_tokens = max_new_tokens, so EOS cannot end it early).
    """
    import torch
    import transformers
    from transformers import AutoModelForCausalLM

    transformers.logging.set_verbosity_error()
    dtype = torch.float32 if dtype is None else dtype
    if not isinstance(model, torch.nn.Module):  # a checkpoint directory
        model = AutoModelForCausalLM.from_pretrained(str(model), dtype=dtype)
    model = model.to(device=device, dtype=dtype).eval()
    sampling = {"do_sample": True, "temperature": workload.temperature} if workload.temperature > 0 else {
        "do_sample": False}
    _hf_generate(model, [[0] * 8], 2, sampling)  # warm-up, as for the engine
    wall_time, generated = 0.0, 0
    with ProgressBar(workload.num_requests, "bench (HF baseline)", use_tqdm) as bar:
        for first in range(0, workload.num_requests, batch_size):
            prompts = workload.prompt_token_ids[first:first + batch_size]
            new_tokens = max(workload.output_lens[first:first + batch_size])
            started = time.perf_counter()
            _hf_generate(model, prompts, new_tokens, sampling)
            wall_time += time.perf_counter() - started
            generated += len(prompts) * new_tokens
            bar.advance(len(prompts))
    return HFRun(workload.num_requests, batch_size, wall_time, sum(workload.input_lens),
                 sum(workload.output_lens), generated)


def _hf_generate(model: "torch.nn.Module", prompts: list[list[int]], new_tokens: int, sampling: dict) -> None:
    """One static batch through transformers: left-padded (pad positions masked), exactly new_tokens per row."""
    import torch

    pad_id = 0  # any id: padded positions are masked out
    device = next(model.parameters()).device
    width = max(len(p) for p in prompts)
    input_ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in prompts], device=device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
    with torch.inference_mode():
        out = model.generate(input_ids=input_ids, attention_mask=mask, max_new_tokens=new_tokens,
                             min_new_tokens=new_tokens, pad_token_id=pad_id, **sampling)
    if out.device.type == "cuda":
        torch.cuda.synchronize(out.device)
    assert out.shape == (len(prompts), width + new_tokens), out.shape


def hf_twin(model: "torch.nn.Module", name: str) -> "torch.nn.Module":
    """A transformers model with our random model's architecture and the very same weights (random:<arch>)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from .models.presets import ARCHITECTURES

    fields = dict(ARCHITECTURES[name.removeprefix("random:")])
    fields.pop("qk_norm", None)  # implied by the Qwen3 architecture in transformers
    config = AutoConfig.for_model(fields.pop("model_type"), **fields)
    twin = AutoModelForCausalLM.from_config(config, dtype=next(model.parameters()).dtype)
    missing, unexpected = twin.load_state_dict(model.state_dict(), strict=False)
    missing = [k for k in missing if not (k == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or unexpected:
        raise ValueError(f"HF twin of {name}: missing {missing[:3]}, unexpected {unexpected[:3]}")
    twin.tie_weights()
    return twin


# -- reporting ----------------------------------------------------------------------------------------------------
def format_report(
    workload: Workload, engine_line: str, run: EngineRun, hf: HFRun | None = None, floor: "Floor | None" = None,
) -> str:
    """The table printed by `bench`: workload, throughput and latency, step statistics, HF comparison."""
    stats = run.step_stats()
    lines = [
        f"workload: {workload.describe()}",
        f"engine: {engine_line}",
        run.summary.table(),
        f"steps: {stats['steps']}, per step: {stats['mean_prefill_tokens_per_step']:.1f} prefill + "
        f"{stats['mean_decode_tokens_per_step']:.1f} decode tokens, {stats['mean_seqs_per_step']:.1f} sequences; "
        f"preemptions {stats['preemptions']}; peak KV usage {stats['peak_kv_usage']:.0%}",
    ]
    if floor is not None:
        lines.append(floor.describe(run.summary.wall_time))
    if hf is not None:
        ours = run.summary.output_throughput
        lines += [
            f"HF transformers generate (static batches of {hf.batch_size}, left padding, first {hf.num_requests} "
            f"requests): {hf.useful_output_tokens} requested output tokens in {hf.wall_time:.2f} s = "
            f"{hf.output_throughput:.1f} output tok/s, {hf.total_throughput:.1f} total tok/s "
            f"({hf.generated_tokens} generated, {hf.padding_waste:.0%} padding waste)",
            f"ours / HF output throughput: {ours / hf.output_throughput:.2f}x "
            f"({ours:.1f} vs {hf.output_throughput:.1f} output tok/s)",
        ]
    return "\n".join(lines)


def report_dict(
    workload: Workload, engine_config: dict, run: EngineRun, hf: HFRun | None = None, floor: "Floor | None" = None,
) -> dict:
    """The numbers of a run as plain JSON-ready data (NaN becomes null); times in seconds."""
    summary = run.summary
    report = {
        "workload": {
            "num_requests": workload.num_requests, "prompts": workload.prompt_kind,
            "input_len": list(workload.input_len) if workload.input_len else None,
            "output_len": list(workload.output_len), "rate": None if math.isinf(workload.rate) else workload.rate,
            "ignore_eos": workload.ignore_eos, "temperature": workload.temperature, "seed": workload.seed,
            "input_tokens": sum(workload.input_lens), "requested_output_tokens": sum(workload.output_lens),
        },
        "engine": engine_config,
        "results": {
            "wall_time": summary.wall_time, "num_requests": summary.num_requests,
            "prompt_tokens": summary.prompt_tokens, "output_tokens": summary.output_tokens,
            "output_throughput": summary.output_throughput, "total_throughput": summary.total_throughput,
            "request_throughput": summary.num_requests / summary.wall_time,
            "latencies": summary.latencies, "steps": run.step_stats(),
        },
        "hf_baseline": None,
        "floor": None if floor is None else {
            "kv_bytes": floor.kv_bytes, "weight_bytes": floor.weight_bytes, "copy_bandwidth": floor.bandwidth,
            "seconds": floor.seconds, "achieved_fraction": floor.fraction(summary.wall_time),
        },
    }
    if hf is not None:
        report["hf_baseline"] = {
            **dataclasses.asdict(hf), "output_throughput": hf.output_throughput,
            "total_throughput": hf.total_throughput, "padding_waste": hf.padding_waste,
            "ours_over_hf_output_throughput": summary.output_throughput / hf.output_throughput,
        }
    return _json_safe(report)


def _json_safe(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


# -- command line -------------------------------------------------------------------------------------------------
def add_bench_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of `python -m reference bench`."""
    add_model_flags(parser, model_default=None)  # None: the preset's model, else smollm2
    work = parser.add_argument_group("workload (a preset sets these; flags given override it)")
    work.add_argument("--preset", choices=sorted(PRESETS), default=None,
                      help="a named workload and the engine it is published for: nano-vllm = 256 requests, input "
                           "and output uniform in [100, 1024], on a random-weight Qwen3-0.6B in bf16 with "
                           "--max-num-seqs 256 --max-model-len 2048 --max-num-batched-tokens 8192 (a GPU's work)")
    work.add_argument("--num-requests", type=_argparse_type(_positive_int, "--num-requests"), default=None,
                      help=f"requests in the workload (default {DEFAULTS['num_requests']})")
    work.add_argument("--input-len", type=_argparse_type(parse_range, "--input-len"), default=None,
                      help="prompt length in tokens: N or LOW:HIGH, uniform inclusive (default 32:256); "
                           "random prompts only")
    work.add_argument("--output-len", type=_argparse_type(parse_range, "--output-len"), default=None,
                      help="requested output tokens: N or LOW:HIGH, uniform inclusive (default 16:128)")
    work.add_argument("--prompts", choices=("random", "real"), default=None,
                      help="random token ids (default), or built-in chat questions at their natural lengths")
    work.add_argument("--ignore-eos", action=argparse.BooleanOptionalAction, default=None,
                      help="generate every requested token even past EOS (default: on)")
    work.add_argument("--rate", type=_argparse_type(parse_rate), default=math.inf,
                      help="arrivals: 'inf' = all at once (default), R = Poisson arrivals at R requests/s")
    work.add_argument("--seed", type=int, default=0, help="seeds the workload and sampling (default 0)")
    work.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    add_engine_flags(parser, exclude=("seed",))  # --seed seeds the workload (and the engine)
    base = parser.add_argument_group("baseline")
    base.add_argument("--baseline", choices=("hf",), default=None,
                      help="also run Hugging Face generate in static batches of --max-num-seqs, and compare")
    base.add_argument("--hf-subsample", type=_argparse_type(_positive_int, "--hf-subsample"), default=None,
                      help="run the baseline on the first N requests only (it is slow); compared per token")
    parser.add_argument("--json", default=None, metavar="PATH", help="also write the numbers as JSON to PATH")
    from .server.load import add_serve_bench_arguments

    add_serve_bench_arguments(parser)


def engine_options(args: argparse.Namespace) -> dict:
    """model, dtype and sizes of the in-process engine: the flag if given, else the preset's, else the default."""
    preset = PRESET_ENGINES.get(args.preset, {}) if args.preset else {}
    return {name: getattr(args, name) if getattr(args, name) is not None else preset.get(name, default)
            for name, default in ENGINE_DEFAULTS.items()}


def describe_engine(engine: "LLMEngine", model: str) -> dict:
    """The settings the engine really ran with (defaults resolved), for the report."""
    config = engine.config
    return {
        "model": model, "device": str(engine.device), "dtype": str(engine.dtype).removeprefix("torch."),
        "max_num_seqs": config.max_num_seqs, "max_num_batched_tokens": config.max_num_batched_tokens,
        "max_model_len": config.max_model_len, "scheduling_policy": str(config.scheduling_policy),
        "enable_chunked_prefill": config.enable_chunked_prefill, "kv_cache": config.kv_cache,
        "attention_backend": engine.runner.attention_backend.name,
        "cuda_graphs": engine.runner.decode_graphs is not None, "fused_kernels": engine.runner.fused_kernels,
        "async_scheduling": config.async_scheduling, "tensor_parallel_size": config.tensor_parallel_size,
    }


def engine_line(c: dict) -> str:
    """describe_engine's settings in one line."""
    line = (f"{c['model']} on {c['device']} {c['dtype']}, max_num_seqs {c['max_num_seqs']}, max_num_batched_tokens "
            f"{c['max_num_batched_tokens']}, max_model_len {c['max_model_len']}, {c['scheduling_policy']}, "
            f"{c['kv_cache']} KV cache, {c['attention_backend']} attention, "
            f"{'CUDA graphs' if c['cuda_graphs'] else 'eager'}{', fused kernels' if c['fused_kernels'] else ''}"
            f"{', async scheduling' if c['async_scheduling'] else ''}")
    tp = c.get("tensor_parallel_size", 1)
    if tp > 1:  # engine.model_config is rank 0's share of the heads: the floor's weight and KV bytes are per rank
        line += f", tensor parallel over {tp} ranks (weights, KV and the floor per rank)"
    return line


def run_bench(args: argparse.Namespace) -> dict:
    """Run the benchmark described by parsed `add_bench_arguments` flags; print the table, return the numbers."""
    if args.serve:
        from .server.load import run_serve_bench_from_args

        return run_serve_bench_from_args(args)
    if getattr(args, "long_prompt", None) is not None:
        raise ValueError("--long-prompt measures a server's streams: use it with --serve URL")
    import transformers

    from .engine import LLMEngine
    from .kv import kv_bytes_per_token
    from .models import resolve_model_dir
    from .costs import measure_memory_bandwidth, weight_bytes, workload_floor

    transformers.logging.set_verbosity_error()
    if args.hf_subsample is not None and args.baseline is None:
        raise ValueError("--hf-subsample only applies with --baseline hf")
    options = workload_options(args)
    sizes = engine_options(args)
    model = sizes.pop("model")
    engine = LLMEngine(model, **{**flag_engine_options(args, exclude=("seed",)), **sizes}, seed=args.seed)
    workload = make_workload(
        options["num_requests"], options["input_len"], options["output_len"], prompts=options["prompts"],
        vocab_size=engine.model_config.vocab_size, tokenizer=engine.tokenizer, avoid_token_ids=engine.eos_token_ids,
        rate=args.rate, ignore_eos=options["ignore_eos"], temperature=args.temperature, seed=args.seed,
    )
    engine_config = describe_engine(engine, model)
    run = run_engine(engine, workload)
    floor = workload_floor(
        workload.input_lens, workload.output_lens, kv_bytes_per_token(engine.model_config, engine.dtype),
        weight_bytes(engine.model_config, engine.dtype.itemsize),
        measure_memory_bandwidth(engine.device, nbytes=1 << 30 if engine.device.type == "cuda" else 1 << 28),
    )
    hf = None
    if args.baseline == "hf":
        subset = workload.head(args.hf_subsample or workload.num_requests)
        hf_model = (hf_twin(engine.model, model) if str(model).startswith("random:")
                    else resolve_model_dir(model, progress=False))
        hf = run_hf_baseline(hf_model, subset, engine.config.max_num_seqs, engine.device, engine.dtype)
    print(format_report(workload, engine_line(engine_config), run, hf, floor))
    report = report_dict(workload, engine_config, run, hf, floor)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    return report
