"""Device, dtype and CPU thread choices shared by the CLI, the generation loop and the engine."""

from __future__ import annotations

import math
import os
import time

import torch

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def resolve_device(device: str | torch.device | None) -> torch.device:
    """None -> "cuda" when a GPU is visible, else "cpu". Accepts "cpu", "cuda", "cuda:N"."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"device={device!r} is not a device; use 'cpu', 'cuda' or 'cuda:N'") from exc
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={device!r} asks for CUDA, but no GPU is visible to torch; use device='cpu'")
    if resolved.type not in ("cpu", "cuda"):
        raise ValueError(f"device={device!r} is not supported; use 'cpu', 'cuda' or 'cuda:N'")
    return resolved


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """None -> float32 on CPU, bfloat16 on CUDA. Accepts the names in DTYPES or those torch dtypes."""
    if dtype is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, torch.dtype) and dtype in DTYPES.values():
        return dtype
    if isinstance(dtype, str) and dtype in DTYPES:
        return DTYPES[dtype]
    raise ValueError(f"dtype={dtype!r} is not supported; use one of {', '.join(DTYPES)}")


class CpuThreads:
    """How many threads torch's CPU ops use: every core, or, where OpenMP's idle threads spin, the cores other
    programs leave free.

    Why: torch splits each op across its threads and waits for the slowest. When another program keeps a core
    busy, the thread that shares it is descheduled for whole time slices and every op waits for it now and then;
    but two threads also get twice the CPU of one (beside two busy programs on two cores, four runnable threads
    get a core between them, one thread two thirds of one).
    - Idle threads that sleep (OMP_WAIT_POLICY=PASSIVE, set by `import reference` when torch is not loaded yet):
      every core, whatever the load. On the project's 2-core VM beside two busy programs, issue 21's workload ran
      at 79-80 tok/s with two threads against 56-58 with one (benchmarks/RESULTS.md, "The engine on a CPU against
      transformers", eighth session).
    - Idle threads that spin (torch loaded first, without that setting): a spinning thread takes its core from
      the other programs, and two threads made steps 25x slower than one. So before a step, at most once a
      second, this reads how busy the machine's cores were since the last look (/proc/stat, minus this
      process's own time) and uses as many threads as cores were left free (at least one).
    Never more than torch had when the engine started (torch.set_num_threads or OMP_NUM_THREADS set beforehand is
    a ceiling). A user setting (EngineConfig.cpu_threads) is used as it is. Off Linux (no /proc/stat) the count
    stays as it was.
    """

    RECHECK_S = 1.0

    def __init__(self, setting: int | None = None) -> None:
        self.setting = setting
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        self.cores = min(cores, torch.get_num_threads())
        self.sleeping = idle_threads_sleep()
        self.last = _cpu_sample()
        self.threads = setting or self.cores
        if setting is not None or self.last is not None:
            torch.set_num_threads(self.threads)

    def adjust(self) -> int:
        """Set torch's thread count for the next step; returns it."""
        if self.setting is not None or self.sleeping or self.last is None:
            return self.threads
        now = _cpu_sample()
        wall = now[0] - self.last[0]
        if wall >= self.RECHECK_S:
            others = max(0.0, (now[1] - self.last[1]) - (now[2] - self.last[2])) / wall  # cores busy elsewhere
            threads = max(1, min(self.cores, math.floor(self.cores - others + 0.5)))
            if threads != self.threads:
                torch.set_num_threads(threads)
                self.threads = threads
            self.last = now
        return self.threads


def idle_threads_sleep() -> bool:
    """Whether OpenMP's idle threads sleep rather than spin: OMP_WAIT_POLICY=PASSIVE, which OpenMP read when torch
    loaded (`import reference` sets it only before that, and the notebooks set it in their first cell)."""
    return os.environ.get("OMP_WAIT_POLICY", "").strip().upper() == "PASSIVE"


def _cpu_sample() -> tuple[float, float, float] | None:
    """(wall seconds, CPU-seconds all programs have run, CPU-seconds this process has run), or None off Linux."""
    try:
        with open("/proc/stat") as stat:
            fields = stat.readline().split()[1:]
    except OSError:
        return None
    ticks = os.sysconf("SC_CLK_TCK")
    # user nice system idle iowait irq softirq steal ...: busy is everything but idle and iowait
    busy = sum(int(x) for x in fields[:8]) - int(fields[3]) - int(fields[4])
    return time.monotonic(), busy / ticks, time.process_time()
