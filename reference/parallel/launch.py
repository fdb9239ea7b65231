"""One process per rank: start them, give each its torch.distributed group, and collect what each returns.

`run_ranks(fn, size, *args)` calls fn(tp, *args) in `size` fresh processes (spawned, so it works from a notebook
or a test and with CUDA) and returns the list of their results in rank order; an exception in any rank is
raised in the caller with that rank's traceback, and every rank is stopped. Backend: NCCL where each rank can
have a GPU of its own, gloo otherwise (the CPU path the tests and lab 0.4 use).
"""

from __future__ import annotations

import datetime
import os
import pickle
import tempfile
import traceback
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from .group import TensorParallel

TIMEOUT = datetime.timedelta(seconds=300)


def default_backend(size: int) -> str:
    return "nccl" if torch.cuda.is_available() and torch.cuda.device_count() >= size else "gloo"


def _rank_main(fn: Callable, rank: int, size: int, backend: str, init: str, results, args: tuple) -> None:
    try:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // size))  # the ranks share the machine's cores
        if backend == "nccl":
            torch.cuda.set_device(rank)
        dist.init_process_group(backend, init_method=init, rank=rank, world_size=size, timeout=TIMEOUT)
        try:
            # plain pickle: tensors travel by value (torch's own queue pickling would share memory through a
            # socket that closes when this process ends)
            results.put((rank, True, pickle.dumps(fn(TensorParallel(rank, size), *args))))
        finally:
            dist.destroy_process_group()
    except BaseException:
        results.put((rank, False, traceback.format_exc()))


def run_ranks(fn: Callable[..., Any], size: int, *args: Any, backend: str | None = None) -> list[Any]:
    """fn(tp, *args) on each of `size` ranks; their return values (picklable), in rank order."""
    backend = backend or default_backend(size)
    context = mp.get_context("spawn")
    with tempfile.TemporaryDirectory(prefix="nano-vllm-tp-") as folder:
        results = context.SimpleQueue()
        init = f"file://{os.path.join(folder, 'rendezvous')}"
        ranks = [context.Process(target=_rank_main, args=(fn, rank, size, backend, init, results, args), daemon=True)
                 for rank in range(size)]
        for process in ranks:
            process.start()
        answers, failure = {}, None
        try:
            while len(answers) < size and failure is None:
                rank, ok, value = results.get()
                if ok:
                    answers[rank] = pickle.loads(value)
                else:
                    failure = f"rank {rank} of {size} failed:\n{value}"
        finally:
            for process in ranks:  # after a failure the others would wait in a collective: stop them now
                if failure is not None or not answers:
                    process.kill()
                process.join(timeout=30)
                if process.is_alive():
                    process.kill()
        if failure is not None:
            raise RuntimeError(failure)
        return [answers[rank] for rank in range(size)]
