"""The workers of a tensor-parallel engine: ranks 1..N-1, one process each (rank 0 is the engine's own process;
its side is ranks.py).

A worker joins the process group, loads its slices of the model (load_model(tp=...)) and then does what rank 0
tells it. Rank 0's messages come by torch.distributed broadcast over a second group that is always gloo, the
control group: they are small Python objects, and a worker may wait for the next one as long as the engine sits
idle, so this group's timeout is long while the model's own collectives keep a short one.

    Profile(config)                         join rank 0's profiling pass on a GPU (for its collectives)
    MeasureKVBudget(config)                 measure this rank's KV memory budget; all ranks take the smallest
    Start(config, num_blocks, block_size)   build the plain runner (model_runner.py) with that KV cache
    Step(block_copies, inputs)              run this rank's share of one step's forward pass
    None                                    stop

A worker's step is model_runner.py's forward pass on the same StepInputs as rank 0's. The all-reduces inside the
layers keep the ranks in step; the logits (the LM head's all-gather gives them to every rank) are dropped: only
rank 0 samples. A worker never sees a sequence or the scheduler.
"""

from __future__ import annotations

import datetime
import os
import signal
import traceback
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..engine_config import EngineConfig
from ..kv.sizing import gpu_memory_for_kv
from ..model_runner import ModelRunner, StepInputs
from ..models import load_model
from .group import TensorParallel

COLLECTIVE_TIMEOUT = datetime.timedelta(seconds=300)  # a rank that misses a collective this long has failed
IDLE_TIMEOUT = datetime.timedelta(days=365)  # how long a worker waits for rank 0's next message


@dataclass(frozen=True)
class RankSetup:
    """What every rank needs to join the group and load its slices."""

    model: str  # what load_model reads: a checkpoint directory (rank 0 resolved it) or "random:<architecture>"
    size: int
    device: torch.device  # rank 0's; rank r takes the r-th GPU after it
    dtype: torch.dtype
    seed: int | None
    init_method: str  # file:// rendezvous in a folder rank 0 made

    def device_of(self, rank: int) -> torch.device:
        if self.device.type == "cuda":
            return torch.device("cuda", (self.device.index or 0) + rank)
        return self.device

    @property
    def backend(self) -> str:
        return "nccl" if self.device.type == "cuda" else "gloo"


@dataclass
class Profile:
    config: EngineConfig  # as rank 0's profiling pass sees it (kv/gpu_sizing.py sizes the seats from that pass)


@dataclass
class MeasureKVBudget:
    config: EngineConfig


@dataclass
class Start:
    config: EngineConfig
    num_blocks: int
    block_size: int


@dataclass
class Step:
    block_copies: list[tuple[int, int]]  # (source, destination) blocks, applied before the forward pass
    inputs: StepInputs | None  # None: no sequence runs this step


@dataclass
class KVShape:
    """What a worker's runner needs of a KV manager: the cache's size (the blocks are rank 0's to manage)."""

    num_blocks: int
    block_size: int


class Control:
    """The control group: rank 0 broadcasts messages, every rank can agree on the smallest of a number."""

    def __init__(self, device: torch.device) -> None:
        self.group = dist.new_group(backend="gloo", timeout=IDLE_TIMEOUT)
        self.device = device

    def send(self, message: object) -> None:
        dist.broadcast_object_list([message], src=0, group=self.group)

    def receive(self) -> object:
        box = [None]
        dist.broadcast_object_list(box, src=0, group=self.group)
        return box[0]

    def smallest(self, value: int) -> int:
        """The smallest `value` over the ranks (on the model's group: a rank that does not come times out)."""
        found = torch.tensor([value], dtype=torch.int64, device=self.device)
        dist.all_reduce(found, op=dist.ReduceOp.MIN)
        return int(found.item())


def join_group(setup: RankSetup, rank: int) -> tuple[TensorParallel, Control]:
    """Join the engine's process group as `rank` (rank 0 too) and open the control group."""
    device = setup.device_of(rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    else:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // setup.size))  # the ranks share the machine's cores
    dist.init_process_group(setup.backend, init_method=setup.init_method, rank=rank, world_size=setup.size,
                            timeout=COLLECTIVE_TIMEOUT)
    return TensorParallel(rank, setup.size), Control(device)


def rank_kv_budget(model: torch.nn.Module, device: torch.device, config: EngineConfig) -> int:
    """Bytes this rank's KV cache may take (as LLMEngine._kv_memory_budget, for this rank's slices)."""
    return gpu_memory_for_kv(model, device, config) if device.type == "cuda" else config.cpu_kv_cache_bytes


def worker_main(rank: int, setup: RankSetup, report) -> None:
    """A worker process. `report`: its end of a pipe to rank 0: "joining" before it joins the group, and its
    traceback if anything fails."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is rank 0's to handle: it stops the workers
    try:
        report.send("joining")
        tp, control = join_group(setup, rank)
        if setup.seed is not None:
            torch.manual_seed(setup.seed)
        model, _ = load_model(setup.model, setup.device_of(rank), setup.dtype, progress=False, tp=tp)
        serve(model, control, setup.dtype)
        dist.destroy_process_group()
    except BaseException:
        report.send(traceback.format_exc())
        report.close()
        os._exit(1)  # now, without waiting on a process group whose other ranks may be gone


@torch.inference_mode()
def serve(model: torch.nn.Module, control: Control, dtype: torch.dtype) -> None:
    """Do what rank 0 says until it says stop."""
    runner = None
    while (message := control.receive()) is not None:
        if isinstance(message, Profile):
            gpu_memory_for_kv(model, control.device, message.config)  # the same forward pass, the same collectives
        elif isinstance(message, MeasureKVBudget):
            control.smallest(rank_kv_budget(model, control.device, message.config))
        elif isinstance(message, Start):
            runner = ModelRunner(model, KVShape(message.num_blocks, message.block_size), dtype,
                                 attention_backend=message.config.attention_backend,
                                 fused_kernels=message.config.fused_kernels,
                                 pack_projections=message.config.pack_projections)
            control.smallest(1)  # ready: rank 0 learns now, not at the first step, if a worker failed to start
        else:
            runner.copy_blocks(message.block_copies)
            if message.inputs is not None:
                runner.forward(message.inputs)
