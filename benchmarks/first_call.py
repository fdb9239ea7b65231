"""Where a fresh engine's first calls lose time: the garbage collector, Triton, the CUDA allocator, the host.

    python benchmarks/first_call.py CHECKPOINT_DIR [--tuned] [--freeze] [--calls 3]

One engine (`LLM(CHECKPOINT_DIR, device="cuda", dtype="bfloat16")`, or the preset's sizes with --tuned), then
--calls `generate` calls on the nano-vllm workload (256 requests, input and output uniform in [100, 1024],
temperature 0.6, workload seeds 0, 1, ...), as benchmarks/public_api_throughput.py runs them. For each call:
- its wall time, and the GPU time (CUDA events around each runner.launch) of the prompt-running and decode-only
  steps beside the host's time in launch, and the device's idle time between steps (the host behind);
- every collection of the cyclic garbage collector (gc.callbacks): count and time per generation, and each pause
  over 5 ms with the step it fell in;
- each Triton compilation (its kernel, specialisation, seconds and step): a variant the warm-up missed;
- the caching allocator's cudaMalloc / cudaFree / retry counts during the call (torch.cuda.memory_stats), and the
  pinned host allocator's new blocks and their microseconds (torch.cuda.host_memory_stats);
- the steps whose time most exceeds their GPU work.
--freeze: gc.freeze() for the length of each call (the heap the collector then skips), gc.unfreeze() after.
Make a checkpoint with public_api_throughput.save_random_checkpoint; run in a fresh process for a first call.
"""

from __future__ import annotations

import argparse
import gc
import time

import numpy as np
import torch

from public_api_throughput import TEMPERATURE, TUNED
from reference import LLM, SamplingParams, warmup
from reference.models.presets import ARCHITECTURES
from reference.workload import make_workload

ALLOCATOR_EVENTS = ("num_device_alloc", "num_device_free", "num_alloc_retries")
HOST_ALLOCATOR_EVENTS = ("num_host_alloc", "host_alloc_time.total", "host_alloc_time.max")  # pinned memory, us
PINNED_GROWTH = ("num_host_alloc", "allocated_bytes.allocated")  # new pinned blocks, their bytes


class Recorder:
    """Collector pauses (gc.callbacks) and, per step, when launch began, the host's time in it, whether it ran
    prompt tokens, and CUDA events around it."""

    def __init__(self, runner) -> None:
        self.pauses: list[tuple[int, float, float]] = []  # (generation, start, seconds)
        self.steps: list[tuple[float, float, bool, torch.cuda.Event, torch.cuda.Event, int]] = []
        self.runner, self.launch = runner, runner.launch
        self._started = 0.0
        self.compiles: list[tuple[float, float, str]] = []  # (start, seconds, kernel and specialisation)
        self.pinned: list[tuple[int, int, int]] = []  # (step, new pinned blocks, their bytes) created in a launch
        gc.callbacks.append(self._on_gc)
        runner.launch = self._timed
        self._watch_triton_compiles()

    def _watch_triton_compiles(self) -> None:
        """Triton's hooks around each compilation (the cache hook must return None, or Triton skips compiling)."""
        from triton import knobs

        def before(**_):
            self._compile_started = time.perf_counter()

        def after(repr: str, **_):  # noqa: A002 - Triton's keyword
            self.compiles.append((self._compile_started, time.perf_counter() - self._compile_started, repr))

        knobs.runtime.jit_cache_hook, knobs.runtime.jit_post_compile_hook = before, after

    def _on_gc(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._started = time.perf_counter()
        else:
            self.pauses.append((info["generation"], self._started, time.perf_counter() - self._started))

    def _timed(self, batch):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        pinned = torch.cuda.host_memory_stats()
        began = time.perf_counter()
        out = self.launch(batch)
        host = time.perf_counter() - began
        end.record()
        grown = {k: torch.cuda.host_memory_stats()[k] - pinned[k] for k in PINNED_GROWTH}
        if grown["num_host_alloc"]:
            self.pinned.append((len(self.steps), grown["num_host_alloc"], grown["allocated_bytes.allocated"]))
        if batch.seqs:
            tokens = sum(batch.num_tokens)
            self.steps.append((began, host, tokens > len(batch.seqs), start, end, tokens))
        return out

    def close(self) -> None:
        gc.callbacks.remove(self._on_gc)
        del self.runner.launch  # the instance attribute: a bound method of the runner on the runner is a cycle


def report(call: int, wall: float, recorder: Recorder, allocator: dict, call_start: float) -> None:
    steps = recorder.steps
    busy = np.array([s[3].elapsed_time(s[4]) / 1e3 for s in steps])
    span = np.array([x[3].elapsed_time(y[3]) / 1e3 for x, y in zip(steps, steps[1:])] + [busy[-1]])
    prompt = np.array([s[2] for s in steps])
    host = np.array([s[1] for s in steps])
    print(f"\ncall {call}: {wall:.3f} s; prompt-running steps {prompt.sum()}: span {span[prompt].sum():.3f} s, GPU "
          f"{busy[prompt].sum():.3f}, host in launch {host[prompt].sum():.3f}; decode-only: span "
          f"{span[~prompt].sum():.3f}, GPU {busy[~prompt].sum():.3f}, host {host[~prompt].sum():.3f}; device idle "
          f"between steps {max(span.sum() - busy.sum(), 0):.3f} s")
    print("  allocator during the call:", allocator)
    for step, blocks, nbytes in recorder.pinned:
        print(f"  {blocks} pinned block(s) of {nbytes} bytes in all created in step {step}'s launch")
    for generation in range(3):
        times = [p[2] for p in recorder.pauses if p[0] == generation]
        if times:
            print(f"  gc generation {generation}: {len(times)} collections, {1e3 * sum(times):.1f} ms in all, "
                  f"longest {1e3 * max(times):.1f} ms")
    begins = np.array([s[0] for s in steps])
    for start, seconds, text in recorder.compiles:
        i = max(int(np.searchsorted(begins, start)) - 1, 0)
        print(f"  Triton compiled for {1e3 * seconds:.0f} ms in step {i}: {text[:300]}")
    for generation, start, seconds in recorder.pauses:
        if seconds > 0.005:
            i = max(int(np.searchsorted(begins, start)) - 1, 0)
            print(f"  a {1e3 * seconds:.1f} ms generation-{generation} pause at {start - call_start:.3f} s, in step "
                  f"{i} ({'prompt-running' if prompt[i] else 'decode-only'})")
    print("  steps longest beyond their GPU work (index, prompt-running, span ms, GPU ms, host ms):")
    for i in np.argsort(span - busy)[-5:][::-1]:
        print(f"    {i}, {bool(prompt[i])}, {1e3 * span[i]:.1f}, {1e3 * busy[i]:.1f}, {1e3 * host[i]:.1f}")
    print("  steps longest on the GPU (index, prompt-running, tokens, GPU ms, host ms):")
    for i in np.argsort(busy)[-5:][::-1]:
        print(f"    {i}, {bool(prompt[i])}, {steps[i][5]}, {1e3 * busy[i]:.1f}, {1e3 * host[i]:.1f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint")
    parser.add_argument("--tuned", action="store_true", help="the preset's engine sizes instead of the defaults")
    parser.add_argument("--freeze", action="store_true", help="gc.freeze() during each call")
    parser.add_argument("--calls", type=int, default=3)
    parser.add_argument("--no-pinned-pool", action="store_true", help="start without growing the pinned-memory "
                        "pool (reference/warmup.py's grow_pinned_pool), to measure what it saves")
    args = parser.parse_args()
    if args.no_pinned_pool:
        warmup.PINNED_POOL_DEPTH = 0
    start = time.perf_counter()
    llm = LLM(args.checkpoint, device="cuda", dtype="bfloat16", **(TUNED if args.tuned else {}))
    print(f"engine start {time.perf_counter() - start:.1f} s; {len(gc.get_objects())} objects tracked by the "
          f"collector; settings {'tuned' if args.tuned else 'default'}{', heap frozen in calls' * args.freeze}")
    vocab = ARCHITECTURES["qwen3-0.6b"]["vocab_size"]
    recorder = Recorder(llm.engine.runner)
    for call in range(args.calls):
        workload = make_workload(256, (100, 1024), (100, 1024), vocab_size=vocab, seed=call)
        params = [SamplingParams(temperature=TEMPERATURE, max_tokens=o, ignore_eos=True) for o in workload.output_lens]
        recorder.steps.clear()
        recorder.pauses.clear()
        recorder.compiles.clear()
        recorder.pinned.clear()
        before, host_before = torch.cuda.memory_stats(), torch.cuda.host_memory_stats()
        torch.cuda.synchronize()
        start = time.perf_counter()
        if args.freeze:
            gc.freeze()
        llm.generate(workload.prompt_token_ids, params, use_tqdm=False)
        if args.freeze:
            gc.unfreeze()
        wall = time.perf_counter() - start
        torch.cuda.synchronize()
        after, host_after = torch.cuda.memory_stats(), torch.cuda.host_memory_stats()
        events = {k: after.get(k, 0) - before.get(k, 0) for k in ALLOCATOR_EVENTS}
        events.update({k: host_after.get(k, 0) - host_before.get(k, 0) for k in HOST_ALLOCATOR_EVENTS[:2]})
        events[HOST_ALLOCATOR_EVENTS[2]] = host_after.get(HOST_ALLOCATOR_EVENTS[2], 0)
        report(call + 1, wall, recorder, events, start)
    recorder.close()


if __name__ == "__main__":
    main()
