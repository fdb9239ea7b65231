"""Where the time above the speed floor goes, step by step, on the public-API workload (GPU).

    python benchmarks/step_costs.py [--tuned] [--profile-batches 256,128,32]

The floor (reference/costs.py) charges a decode step its KV reads and one read of the weights at copy bandwidth.
This script times every step of one `generate` call on the GPU's own clock (CUDA events around each launch), so
host work the GPU waits for shows as idle time, and splits the call into:
- prefill steps (any prompt token in the step) against decode-only steps;
- for decode-only steps, a least-squares fit  time = fixed + per_seq * batch + kv_bytes / kv_bandwidth: the fixed
  cost is what a step pays however small (weights, ~300 kernel launches, sampling), kv_bandwidth is how fast
  attention really reads the cache, to set beside the copy bandwidth the floor assumes;
- then torch.profiler's kernels for one decode step at each --profile-batches size (CUDA-graph kernels included)
  and for the first --profile-prefills steps that run prompt tokens, grouped into attention, GEMMs, sampling and
  the small fused kernels.
Workload and engine as benchmarks/public_api_throughput.py (default settings, temperature 0.6, random Qwen3-0.6B):
a first call warms everything, the timed call uses fresh prompts (workload seed 1).
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import pstats
import tempfile
import time
from dataclasses import dataclass

import numpy as np
import torch

from public_api_throughput import TEMPERATURE, TUNED, save_random_checkpoint
from reference import LLM, SamplingParams
from reference.costs import measure_memory_bandwidth, weight_bytes, workload_floor
from reference.cuda_graphs import DecodeGraphs
from reference.kv import kv_bytes_per_token
from reference.models.presets import ARCHITECTURES
from reference.workload import make_workload

SLEEP_CYCLES_PER_US = 1980  # torch.cuda._sleep counts SM clock cycles: an H200's 1.98 GHz (only roughly)


@dataclass
class StepTiming:
    batch: int  # sequences in the step
    tokens: int  # tokens run (batch for a decode-only step)
    context_tokens: int  # sum of context lengths after the step: the KV attention reads
    start: torch.cuda.Event
    end: torch.cuda.Event
    host: float  # s the host spent in runner.launch (planning aside): building inputs and queueing kernels


def time_launches(runner, timings: list[StepTiming], host_profile: cProfile.Profile | None = None):
    """Wrap runner.launch so that each step's device work is bracketed by CUDA events. Returns an undo function.
    host_profile: a cProfile profiler to run during the prompt-running steps' launches."""
    launch = runner.launch

    def timed(batch):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        profiled = host_profile is not None and sum(batch.num_tokens) > len(batch.seqs)
        if profiled:
            host_profile.enable()
        began = time.perf_counter()
        out = launch(batch)
        host = time.perf_counter() - began
        if profiled:
            host_profile.disable()
        end.record()
        if batch.seqs:
            timings.append(StepTiming(len(batch.seqs), sum(batch.num_tokens),
                                      sum(s + n for s, n in zip(batch.starts, batch.num_tokens)), start, end, host))
        return out

    runner.launch = timed
    return lambda: setattr(runner, "launch", launch)


def generate(llm: LLM, workload) -> float:
    params = [SamplingParams(temperature=TEMPERATURE, max_tokens=o, ignore_eos=True) for o in workload.output_lens]
    start = torch.cuda.Event(enable_timing=True)
    end = torch.cuda.Event(enable_timing=True)
    start.record()
    llm.generate(workload.prompt_token_ids, params, use_tqdm=False)
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 1e3


def report_steps(timings: list[StepTiming], wall: float, kv_per_token: int, weights: int, bandwidth: float) -> None:
    torch.cuda.synchronize()
    busy = np.array([t.start.elapsed_time(t.end) / 1e3 for t in timings])  # s, launch to end of its work
    span = np.array([a.start.elapsed_time(b.start) / 1e3 for a, b in zip(timings, timings[1:])] + [busy[-1]])
    decode = np.array([t.tokens == t.batch for t in timings])
    batch = np.array([t.batch for t in timings], dtype=float)
    kv = np.array([t.context_tokens * kv_per_token for t in timings], dtype=float)
    floor = kv / bandwidth + weights / bandwidth
    print(f"\ncall: {wall:.2f} s on the GPU clock, {len(timings)} steps ({decode.sum()} decode-only); floor "
          f"{floor[decode].sum():.2f} s for decode steps (KV {kv[decode].sum() / bandwidth:.2f} + weights "
          f"{decode.sum() * weights / bandwidth:.2f})")
    print("| steps | count | time s (span) | of which device busy s | floor s | time / floor |")
    print("|---|---|---|---|---|---|")
    for name, mask in (("prefill or mixed", ~decode), ("decode only", decode)):
        print(f"| {name} | {mask.sum()} | {span[mask].sum():.3f} | {busy[mask].sum():.3f} | {floor[mask].sum():.3f} "
              f"| {span[mask].sum() / max(floor[mask].sum(), 1e-9):.2f} |")
    # The prompt-running steps one by one: their time varies between calls by more than decode's does. Host ms
    # near busy ms says the GPU waited for the host to queue the step's kernels (eager steps, no CUDA graph).
    print("\n| prompt-running step (index in call) | sequences | tokens | context tokens | busy ms | span ms | "
          "host ms in launch |")
    print("|---|---|---|---|---|---|---|")
    for i in np.flatnonzero(~decode):
        t = timings[i]
        print(f"| {i} | {t.batch} | {t.tokens} | {t.context_tokens} | {1e3 * busy[i]:.1f} | {1e3 * span[i]:.1f} | "
              f"{1e3 * t.host:.1f} |")
    host = np.array([t.host for t in timings])
    print(f"host time in launch: prompt-running steps {host[~decode].sum():.3f} s, decode-only {host[decode].sum():.3f} s")
    # Decode-only steps: time = fixed + per_seq * batch + kv / kv_bandwidth, fitted on the busy time.
    x = np.stack([np.ones(decode.sum()), batch[decode], kv[decode]], axis=1)
    (fixed, per_seq, per_byte), *_ = np.linalg.lstsq(x, busy[decode], rcond=None)
    predicted = x @ np.array([fixed, per_seq, per_byte])
    r2 = 1 - ((busy[decode] - predicted) ** 2).sum() / ((busy[decode] - busy[decode].mean()) ** 2).sum()
    n = decode.sum()
    print(f"\ndecode-only fit (R^2 {r2:.3f}): fixed {1e3 * fixed:.3f} ms/step (x {n} steps = {n * fixed:.2f} s; the "
          f"weights' floor is {1e3 * weights / bandwidth:.3f} ms), per sequence {1e6 * per_seq:.2f} us "
          f"(x {batch[decode].sum():.0f} = {per_seq * batch[decode].sum():.2f} s), KV read at "
          f"{1 / per_byte / 1e9:.0f} GB/s ({1 / per_byte / bandwidth:.0%} of copy; {per_byte * kv[decode].sum():.2f} s)")
    print(f"idle device time between steps (host behind): {max(span.sum() - busy.sum(), 0):.3f} s")
    edges = [1, 8, 32, 64, 128, 192, 256, 384, 513]
    print("\n| decode batch | steps | mean ms | mean floor ms | time / floor |\n|---|---|---|---|---|")
    for lo, hi in zip(edges, edges[1:]):
        mask = decode & (batch >= lo) & (batch < hi)
        if mask.any():
            print(f"| {lo}-{hi - 1} | {mask.sum()} | {1e3 * busy[mask].mean():.2f} | {1e3 * floor[mask].mean():.2f} "
                  f"| {busy[mask].sum() / floor[mask].sum():.2f} |")


KERNEL_GROUPS = (("attention", ("paged_decode", "combine_splits", "paged_prefill", "flash", "fmha", "attention")),
                 ("GEMM", ("gemm", "sm90_xmma", "cutlass", "nvjet", "cublas", "matmul")),
                 ("sampling", ("sample", "argmax", "race", "topk", "gather")),
                 ("KV store", ("store_kvcache",)),
                 ("norm / rope / act / add", ("rms_norm", "rotary", "rope", "silu", "add_", "_add")))


def group_of(name: str) -> str:
    lowered = name.lower()
    return next((group for group, keys in KERNEL_GROUPS if any(k in lowered for k in keys)), "other")


def print_kernel_groups(title: str, prof, top: int) -> None:
    """Kernel time by group (and the `top` heaviest kernels by name) beside the span from the first kernel's start
    to the last one's end: the difference is the time between kernels, which only fewer launches remove."""
    events = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    span_ms = (max(e.time_range.end for e in events) - min(e.time_range.start for e in events)) / 1e3 if events else 0
    groups: dict[str, list[float]] = {}
    for e in events:
        groups.setdefault(group_of(e.name), []).append(e.device_time_total)
    total = sum(sum(v) for v in groups.values())
    print(f"\n{title}: {len(events)} kernels, {total / 1e3:.3f} ms of kernel time in a span of {span_ms:.3f} ms "
          f"({span_ms - total / 1e3:.3f} ms between kernels)")
    by_name: dict[str, float] = {}
    counts: dict[str, int] = {}
    for e in events:
        by_name[e.name] = by_name.get(e.name, 0.0) + e.device_time_total
        counts[e.name] = counts.get(e.name, 0) + 1
    if top:
        print("| kernel | launches | ms | us each |\n|---|---|---|---|")
        for t, n in sorted(((t, n) for n, t in by_name.items()), reverse=True)[:top]:
            print(f"| {n[:90]} | {counts[n]} | {t / 1e3:.3f} | {t / counts[n]:.1f} |")
    for group, times in sorted(groups.items(), key=lambda kv: -sum(kv[1])):
        print(f"  {group:26s} {len(times):4d} kernels {sum(times) / 1e3:7.3f} ms ({sum(times) / total:.0%})")
        heaviest = sorted((t, n) for n, t in by_name.items() if group_of(n) == group)[::-1][:3]
        print("      " + "; ".join(f"{n[:60]} {t / 1e3:.3f} ms" for t, n in heaviest))


def print_runtime_calls(prof, top: int = 8, longest: bool = False) -> None:
    """The host's CUDA runtime / driver calls in a profiled step by total time: a synchronising call (a stream or
    event wait, a pinned or device allocation) stands out beside the launches. longest: also the `top` longest
    single host operations of any kind (where a launch waited)."""
    totals: dict[str, list[float]] = {}
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CPU and e.name.startswith("cu"):
            totals.setdefault(e.name, []).append(e.cpu_time_total)
    rows = sorted(((sum(t), n, len(t)) for n, t in totals.items()), reverse=True)[:top]
    print("  host runtime calls: " + "; ".join(f"{n} {count}x {t / 1e3:.2f} ms" for t, n, count in rows))
    if longest:
        singles = sorted(((e.cpu_time_total, e.name) for e in prof.events()
                          if e.device_type == torch.autograd.DeviceType.CPU), reverse=True)[:top]
        print("  longest host operations: " + "; ".join(f"{n} {t / 1e3:.2f} ms" for t, n in singles))


def profile_steps(llm: LLM, workload, decode_batches: list[int], prefill_steps: int, top: int) -> None:
    """torch.profiler around the first `prefill_steps` steps that run prompt tokens, and around the first
    decode-only step of each size in `decode_batches` (as the batch shrinks). Each starts on an idle GPU; for the
    prompt-running steps, how long the host took to queue the step and how much longer the GPU ran after it (near
    zero: the GPU waited for the host, whose launches set the step's length) are printed as well."""
    from torch.profiler import ProfilerActivity, profile

    runner, wanted, launch = llm.engine.runner, sorted(decode_batches, reverse=True), llm.engine.runner.launch
    prefills = [0]

    def maybe_profiled(batch):
        tokens, size = sum(batch.num_tokens), len(batch.seqs)
        if tokens > size and prefills[0] < prefill_steps:
            prefills[0] += 1
            title = f"prompt-running step, {tokens} tokens of {size} sequences"
        elif wanted and size and tokens == size and size <= wanted[0]:
            wanted.pop(0)
            title = f"decode step of {size} sequences"
        else:
            return launch(batch)
        torch.cuda.synchronize()
        start = time.perf_counter()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            out = launch(batch)
            queued = time.perf_counter()
            torch.cuda.synchronize()
        print_kernel_groups(title, prof, top)
        print(f"  (profiled) the host queued it in {1e3 * (queued - start):.1f} ms; the GPU ran "
              f"{1e3 * (time.perf_counter() - queued):.1f} ms after that")
        print_runtime_calls(prof)
        return out

    runner.launch = maybe_profiled
    try:
        generate(llm, workload)
    finally:
        runner.launch = launch


def time_prompt_steps_from_idle(llm: LLM, workload, steps: int, busy_ms: float = 0.0) -> None:
    """Without a profiler: the first `steps` prompt-running steps, each started on an idle GPU: the host's time to
    queue it against the GPU's time after that (near zero: host-bound). busy_ms > 0: every other step starts
    behind a GPU sleep of that length instead, as in a real call, where the step before is still running; if the
    host then takes longer to queue the same work, something in the launch waits for the GPU. The first of those
    is profiled (host side) for the runtime call that waited."""
    from torch.profiler import ProfilerActivity, profile

    runner, launch, rows = llm.engine.runner, llm.engine.runner.launch, []

    def timed(batch):
        if sum(batch.num_tokens) <= len(batch.seqs) or len(rows) >= steps:
            return launch(batch)
        busy = busy_ms > 0 and len(rows) % 2 == 1
        torch.cuda.synchronize()
        if busy:
            torch.cuda._sleep(int(busy_ms * 1e3 * SLEEP_CYCLES_PER_US))
        prof = profile(activities=[ProfilerActivity.CPU]) if busy and len(rows) == 1 else None
        start = time.perf_counter()
        with prof or contextlib.nullcontext():
            out = launch(batch)
        queued = time.perf_counter()
        torch.cuda.synchronize()
        rows.append((busy, len(batch.seqs), sum(batch.num_tokens), queued - start, time.perf_counter() - queued))
        if prof is not None:
            print_runtime_calls(prof, longest=True)
        return out

    runner.launch = timed
    try:
        generate(llm, workload)
    finally:
        runner.launch = launch
    print("\n| prompt-running step | GPU at the start | sequences | tokens | host queues it, ms | GPU runs on, ms |"
          "\n|---|---|---|---|---|---|")
    for i, (busy, seqs, tokens, host, after) in enumerate(rows):
        print(f"| {i} | {'busy' if busy else 'idle'} | {seqs} | {tokens} | {1e3 * host:.1f} | {1e3 * after:.1f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host-profile", action="store_true", help="cProfile the host during the prompt-running "
                        "steps' launches (where their host time goes)")
    parser.add_argument("--batch-order", action="store_true", help="start the decode kernel's programs in batch "
                        "order, not longest context first (cuda_graphs.DecodeGraphs.longest_first), to measure it")
    parser.add_argument("--tuned", action="store_true", help="the preset's engine sizes instead of the defaults")
    parser.add_argument("--profile-batches", default="256,128,32", help="decode batch sizes to profile")
    parser.add_argument("--profile-prefills", type=int, default=2, help="how many prompt-running steps to profile")
    parser.add_argument("--idle-starts", type=int, default=0, metavar="N", help="time the first N prompt-running "
                        "steps of another call each from an idle GPU, without a profiler: host-bound or GPU-bound")
    parser.add_argument("--busy-ms", type=float, default=0.0, metavar="MS", help="with --idle-starts: every other "
                        "step starts behind a GPU sleep of MS ms instead of on an idle GPU")
    parser.add_argument("--kernels", type=int, default=0, metavar="N",
                        help="also list the N heaviest kernels of each profiled step by name")
    parser.add_argument("--engine-option", action="append", default=[], metavar="NAME=VALUE",
                        help="extra LLM(...) option, e.g. attention_backend=flash-attn (repeatable)")
    args = parser.parse_args()
    DecodeGraphs.longest_first = not args.batch_order
    options = dict(TUNED if args.tuned else {})
    for option in args.engine_option:
        name, value = option.split("=", 1)
        options[name] = {"true": True, "false": False}.get(value.lower(), value)
    vocab = ARCHITECTURES["qwen3-0.6b"]["vocab_size"]
    bandwidth = measure_memory_bandwidth("cuda", nbytes=1 << 30, repeats=20)
    with tempfile.TemporaryDirectory() as path:
        save_random_checkpoint(path, torch.bfloat16)
        llm = LLM(path, device="cuda", dtype="bfloat16", **options)
        generate(llm, make_workload(256, (100, 1024), (100, 1024), vocab_size=vocab, seed=0))  # warm
        workload = make_workload(256, (100, 1024), (100, 1024), vocab_size=vocab, seed=1)
        timings: list[StepTiming] = []
        host_profile = cProfile.Profile() if args.host_profile else None
        undo = time_launches(llm.engine.runner, timings, host_profile)
        wall = generate(llm, workload)
        undo()
        config, dtype = llm.engine.model_config, llm.engine.dtype
        kv_per_token, weights = kv_bytes_per_token(config, dtype), weight_bytes(config, dtype.itemsize)
        floor = workload_floor(workload.input_lens, workload.output_lens, kv_per_token, weights, bandwidth)
        print(f"{torch.cuda.get_device_name()}; options {options or 'default'}"
              f"; copy bandwidth "
              f"{bandwidth / 1e9:.0f} GB/s; call {wall:.2f} s, {sum(workload.output_lens) / wall:.0f} output tok/s, "
              f"{floor.fraction(wall):.3f} of the workload's floor ({floor.seconds:.2f} s)")
        report_steps(timings, wall, kv_per_token, weights, bandwidth)
        if host_profile is not None:
            print("\nthe host in the prompt-running steps' launches (cProfile, by own time):")
            pstats.Stats(host_profile).sort_stats("tottime").print_stats(25)
            pstats.Stats(host_profile).sort_stats("cumulative").print_stats(35)
        batches = [int(b) for b in args.profile_batches.split(",") if b]
        profile_steps(llm, make_workload(256, (100, 1024), (100, 1024), vocab_size=vocab, seed=2), batches,
                      args.profile_prefills, args.kernels)
        if args.idle_starts:
            time_prompt_steps_from_idle(llm, make_workload(256, (100, 1024), (100, 1024), vocab_size=vocab, seed=3),
                                        args.idle_starts, args.busy_ms)


if __name__ == "__main__":
    main()
