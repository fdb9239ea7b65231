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
    """How many threads torch's CPU ops use: the cores other programs leave free, rechecked as their load changes.

    Why: torch splits each op across its threads and waits for the slowest. When another program keeps a core
    busy, the thread that shares it is descheduled for whole time slices and every op waits for it. On the
    project's 2-core VM beside two busy programs, two threads with OpenMP's idle threads spinning made steps 25x
    slower than one; with them sleeping (OMP_WAIT_POLICY=PASSIVE, set by `import reference` when it can) two
    threads still gave 0.38x the quiet speed against 0.40-0.47x for one (benchmarks/RESULTS.md, "The engine on a
    CPU against transformers"). So before a step, at most once a second, this reads how busy the machine's cores were since the
    last look (/proc/stat, minus this process's own time) and uses as many threads as cores were left free (at
    least one), never more than torch had when the engine started (torch.set_num_threads or OMP_NUM_THREADS set
    beforehand is a ceiling). A user setting (EngineConfig.cpu_threads) is used as it is. Off Linux (no
    /proc/stat) the count stays as it was.
    """

    RECHECK_S = 1.0

    def __init__(self, setting: int | None = None) -> None:
        self.setting = setting
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        self.cores = min(cores, torch.get_num_threads())
        self.last = _cpu_sample()
        self.threads = setting or self.cores
        if setting is not None or self.last is not None:
            torch.set_num_threads(self.threads)

    def adjust(self) -> int:
        """Set torch's thread count for the next step; returns it."""
        if self.setting is not None or self.last is None:
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
