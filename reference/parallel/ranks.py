"""Rank 0 of a tensor-parallel engine: it starts the workers (worker.py), tells them every step, and stops them.

    ranks = EngineRanks.start(model, size, device, dtype, seed)  check the model splits, spawn ranks 1..N-1
    ranks.tp                                   rank 0's place, for load_model(tp=...)
    ranks.join_profiling_pass(config)          (GPU) the workers join rank 0's profiling forward pass
    ranks.smallest_kv_budget(config, budget)   every rank measures its KV memory; the smallest wins
    ranks.runner(plain_runner, config)         the runner the engine steps (TensorParallelRunner)
    ranks.close()                              stop the workers (also at garbage collection and at exit)

The scheduler, the sampler and the detokenizer run here only. Failures: a worker that raises sends its
traceback to rank 0 and exits, which closes its sockets, so rank 0's next collective fails at once (gloo; with
NCCL only after COLLECTIVE_TIMEOUT) and the engine raises a RuntimeError naming the rank, with its traceback.
A failed or interrupted step (Ctrl-C) stops every worker: the ranks may no longer be at the same point of the
step, so this engine cannot go on, and says so when used again.
"""

from __future__ import annotations

import dataclasses
import gc
import shutil
import tempfile
import time
import weakref
from contextlib import contextmanager

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from ..config import ModelConfig
from ..engine_config import EngineConfig
from ..kv.gpu_sizing import MAX_GPU_SEATS
from ..model_runner import ModelRunner, StepInputs
from ..models.loader import resolve_model_dir
from ..models.presets import preset_config
from ..scheduler import ScheduledBatch
from .plan import check_shardable
from .worker import MeasureKVBudget, Profile, RankSetup, Start, Step, join_group, worker_main

STARTUP_TIMEOUT = 300  # seconds a worker may take to start Python and torch before it joins
STOP_TIMEOUT = 30  # seconds a worker may take to stop when asked, before it is killed
REPORT_WAIT = 1.0  # seconds to wait for a worker's traceback after a collective failed


def checked_model(model: str, size: int, device: torch.device) -> str:
    """Raise a ValueError, before any process starts, unless `model` splits over `size` ranks on `device`;
    return what the workers should load (a checkpoint directory: downloads and conversions happen once, here)."""
    if device.type == "cuda":
        first = device.index or 0
        if first + size > torch.cuda.device_count():
            raise ValueError(f"tensor_parallel_size={size} needs {size} GPUs from cuda:{first} (one per rank); "
                             f"this machine has {torch.cuda.device_count()}")
    if model.startswith("random:"):
        check_shardable(preset_config(model.removeprefix("random:")), size)
        return model
    model_dir = resolve_model_dir(model)  # (the first use of SmolLM2 converts it, with a progress bar)
    check_shardable(ModelConfig.from_dir(model_dir), size)
    return str(model_dir)


class _Workers:
    """The worker processes and their report pipes: what must be cleaned up, kept apart from EngineRanks so that
    the finalizer that stops them does not keep the EngineRanks alive."""

    def __init__(self, processes: list, reports: list, folder: str) -> None:
        self.processes, self.reports, self.folder = processes, reports, folder
        self.threads = torch.get_num_threads()  # rank 0's, restored when the workers stop
        self.in_step = True  # False once every rank waits for rank 0's next message

    def wait_until_joining(self) -> None:
        """Return once every worker has started Python and torch, or raise what stopped one."""
        deadline = time.monotonic() + STARTUP_TIMEOUT
        for rank, (process, report) in enumerate(zip(self.processes, self.reports), start=1):
            while not report.poll(0.05):
                if not process.is_alive() or time.monotonic() > deadline:
                    raise RuntimeError(self.failure() or f"tensor-parallel rank {rank} did not start")
            report.recv()  # "joining"

    def failure(self) -> str | None:
        """The first worker failure seen within REPORT_WAIT seconds (its rank, and its traceback when it sent
        one), or None."""
        size = len(self.processes) + 1
        deadline = time.monotonic() + REPORT_WAIT
        while time.monotonic() < deadline:
            for rank, (process, report) in enumerate(zip(self.processes, self.reports), start=1):
                if not report.poll():
                    continue
                try:
                    return f"tensor-parallel rank {rank} of {size} raised an exception:\n{report.recv()}"
                except EOFError:  # it died without a word: killed, out of memory
                    process.join(timeout=REPORT_WAIT)
                    return f"tensor-parallel rank {rank} of {size} died (exit code {process.exitcode})"
            time.sleep(0.05)
        return None

    def stop(self, control=None) -> None:
        """Ask the workers to stop (when they wait for a message and a control group is there), then kill those
        still running; leave torch.distributed and the thread count as they were before the engine."""
        if control is not None and not self.in_step and dist.is_initialized():
            try:
                control.send(None)
            except RuntimeError:
                pass  # a worker is gone already: the ones left are killed below
        for process in self.processes:
            process.join(timeout=STOP_TIMEOUT if control is not None and not self.in_step else 0)
            if process.is_alive():
                process.kill()
                process.join()
        self.processes = []
        if dist.is_initialized():
            dist.destroy_process_group()
        torch.set_num_threads(self.threads)
        shutil.rmtree(self.folder, ignore_errors=True)


class EngineRanks:
    """Rank 0's handle on the other ranks of one engine."""

    def __init__(self, setup: RankSetup, workers: _Workers) -> None:
        self.setup = setup
        self._workers = workers
        self.tp, self._control = join_group(setup, 0)
        self._stopped = weakref.finalize(self, workers.stop, self._control)  # at close, garbage collection, exit
        self._why_stopped: str | None = None

    @classmethod
    def start(cls, model: str, size: int, device: torch.device, dtype: torch.dtype, seed: int | None) -> EngineRanks:
        """Spawn ranks 1..size-1 (they load their slices while rank 0 loads its own) and join them as rank 0."""
        if dist.is_initialized():
            gc.collect()  # an engine that is garbage but not yet collected stops its workers now
        if dist.is_initialized():
            raise RuntimeError("torch.distributed is already initialized in this process (another tensor-parallel "
                               "engine?); close it first (llm.close()), one such engine per process at a time")
        to_load = checked_model(model, size, device)
        folder = tempfile.mkdtemp(prefix="nano-vllm-tp-")
        setup = RankSetup(to_load, size, device, dtype, seed, f"file://{folder}/rendezvous")
        context = mp.get_context("spawn")  # fresh processes: safe with CUDA and from a notebook
        processes, reports = [], []
        for rank in range(1, size):
            ours, theirs = context.Pipe(duplex=False)
            processes.append(context.Process(target=worker_main, args=(rank, setup, theirs), daemon=True,
                                             name=f"nano-vllm-tp-rank-{rank}"))
            processes[-1].start()
            theirs.close()  # the worker holds that end now
            reports.append(ours)
        workers = _Workers(processes, reports, folder)
        try:
            workers.wait_until_joining()
            return cls(setup, workers)
        except BaseException:
            workers.stop()
            raise

    @contextmanager
    def _together(self):
        """Run a piece of work that every rank does together; if it fails, stop every worker and raise the
        worker's error when one failed (the original error otherwise)."""
        if self._why_stopped is not None:
            raise RuntimeError(f"this engine's tensor-parallel workers were stopped ({self._why_stopped}); "
                               f"create a new LLM")
        self._workers.in_step = True
        try:
            yield
        except BaseException as error:
            failure = self._workers.failure()
            self._why_stopped = failure.splitlines()[0].rstrip(":") if failure else f"{type(error).__name__} on rank 0"
            self._stopped()  # in_step: the workers are killed, not asked
            if failure is not None and not isinstance(error, KeyboardInterrupt):
                raise RuntimeError(failure) from error
            raise
        self._workers.in_step = False

    def join_profiling_pass(self, config: EngineConfig) -> None:
        """On a GPU, kv/gpu_sizing.py sizes the seats from a forward pass at the full token budget (sampling
        MAX_GPU_SEATS rows when max_num_seqs is not given); its collectives need every rank, so the workers run
        the same pass alongside rank 0's."""
        with self._together():
            self._control.send(Profile(dataclasses.replace(_portable(config),
                                                           max_num_seqs=config.max_num_seqs or MAX_GPU_SEATS)))

    def smallest_kv_budget(self, config: EngineConfig, own_budget) -> int:
        """Every rank measures the bytes its KV cache may take (own_budget() here); the smallest is everyone's."""
        with self._together():
            self._control.send(MeasureKVBudget(_portable(config)))
            return self._control.smallest(own_budget())

    def runner(self, runner: ModelRunner, config: EngineConfig) -> TensorParallelRunner:
        """Have every worker build its runner with rank 0's number of KV blocks; return rank 0's runner."""
        with self._together():
            self._control.send(Start(_portable(config), runner.kv.num_blocks, runner.kv.block_size))
            self._control.smallest(1)  # every worker is ready
        return TensorParallelRunner(runner, self)

    def step(self, runner: ModelRunner, batch: ScheduledBatch):
        """Send the step to the workers, then run it here (with sampling); returns the sampled tokens."""
        with self._together():
            copies = runner.kv.take_pending_copies()
            self._control.send(Step(copies, StepInputs.of(batch, runner.kv) if batch.seqs else None))
            runner.copy_blocks(copies)
            return runner.run(batch)  # (its own copy_blocks finds none left: they were taken above)

    def close(self) -> None:
        """Stop the workers (asked to, when they are waiting for a step; killed otherwise)."""
        if self._why_stopped is None:
            self._why_stopped = "closed"
        self._stopped()

    @property
    def alive(self) -> bool:
        return self._stopped.alive


def _portable(config: EngineConfig) -> EngineConfig:
    """config without its scheduling policy, which a worker never uses and may not be able to import (a policy
    class defined in a notebook)."""
    return dataclasses.replace(config, scheduling_policy="fcfs")


class TensorParallelRunner:
    """The runner the engine steps when the model is split: each step goes to the workers (block copies and the
    batch as flat lists), then rank 0's plain runner runs it and samples. The rest (kv_caches,
    attention_backend, ...) is the plain runner's."""

    def __init__(self, runner: ModelRunner, ranks: EngineRanks) -> None:
        self.runner = runner
        self.ranks = ranks

    def run(self, batch: ScheduledBatch):
        return self.ranks.step(self.runner, batch)

    def __getattr__(self, name: str):  # called only for names this class does not have
        if name == "runner":
            raise AttributeError(name)  # (not set yet: no recursion)
        return getattr(self.runner, name)
