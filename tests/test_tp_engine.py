"""The engine with tensor parallelism (LLM(..., tensor_parallel_size=N)): one process per rank, gloo on the CPU.

Greedy tokens over 2 and 4 ranks agree with one rank under the written tie rule (tests/exactness.py), on random
Llama / Qwen2 / Qwen3 checkpoints with awkward GQA ratios and head dims that still split, and on SmolLM2 (whose
9 query heads and 3 KV heads split over 3 ranks only: 2 and 4 raise before any process starts). A worker's
failure comes back to rank 0 as a clear error and leaves no process behind, as does an interrupted step;
closing the LLM, garbage collection and interpreter exit stop the workers.
"""

from __future__ import annotations

import argparse
import gc
import multiprocessing
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from exactness import assert_greedy_agree
from reference import LLM, SamplingParams
from reference.attention import build_metadata
from reference.flags import add_engine_flags, engine_options
from reference.models import load_model
from reference.parallel.worker import Step

MAX_NEW = 12
# family, overrides: GQA ratio 3 with head_dim 20 and a vocabulary 4 does not divide (KV heads split over 2 and
# 4 ranks); ratio 4 with q/k/v biases and tied embeddings (KV heads replicated over 4); one KV head with Qwen3's
# q/k norms (replicated over 2 and 4).
CONFIGS = {
    "llama-12q-4kv-d20": ("llama", {"num_attention_heads": 12, "num_key_value_heads": 4, "head_dim": 20,
                                    "vocab_size": 515}),
    "qwen2-8q-2kv-tied": ("qwen2", {"num_attention_heads": 8, "num_key_value_heads": 2, "head_dim": 24,
                                    "tie_word_embeddings": True}),
    "qwen3-4q-1kv": ("qwen3", {"num_attention_heads": 4, "num_key_value_heads": 1, "head_dim": 16}),
}


def checkpoint(checkpoint_factory, name: str):
    family, overrides = CONFIGS[name]
    return checkpoint_factory(family, **overrides)


def prompts_for(vocab_size: int, count: int = 6) -> list[list[int]]:
    generator = torch.Generator().manual_seed(7)
    shared = torch.randint(0, vocab_size, (20,), generator=generator).tolist()  # a shared prefix: cached blocks
    return [shared[: 5 * i] + torch.randint(0, vocab_size, (3 + 7 * i,), generator=generator).tolist()
            for i in range(count)]


def greedy_tokens(llm: LLM, prompts: list[list[int]]) -> list[list[int]]:
    """Each prompt's greedy tokens; the last prompt runs as n=2 samples (a fork: block copies on every rank),
    which must be equal."""
    params = [SamplingParams(temperature=0, max_tokens=MAX_NEW, ignore_eos=True) for _ in prompts]
    params[-1] = SamplingParams(n=2, temperature=0, max_tokens=MAX_NEW, ignore_eos=True)
    outputs = llm.generate(prompts, params, use_tqdm=False)
    assert outputs[-1].outputs[0].token_ids == outputs[-1].outputs[1].token_ids
    return [out.outputs[0].token_ids for out in outputs]


def unsplit_logits(model):
    """reference_logits for assert_greedy_agree: the one-process model's next-token logits, teacher-forced."""

    @torch.inference_mode()
    def logits(token_ids: list[int]) -> torch.Tensor:
        positions, metadata = build_metadata([len(token_ids)], None, None, None, "cpu")
        return model.compute_logits(model(torch.tensor(token_ids), positions, metadata)[-1:])[0]

    return logits


def tp_engine(path, size: int, **options) -> LLM:
    # A small token budget chunks the prompts, so prefill chunks and decodes share steps on every rank.
    return LLM(str(path), device="cpu", tensor_parallel_size=size, max_num_seqs=4, max_num_batched_tokens=24,
               block_size=8, **options)


def assert_tp_agrees(path, sizes: tuple[int, ...]) -> None:
    model, _ = load_model(str(path), progress=False)
    prompts = prompts_for(model.config.vocab_size)
    with tp_engine(path, 1) as llm:
        one = greedy_tokens(llm, prompts)
    for size in sizes:
        with tp_engine(path, size) as llm:
            split = greedy_tokens(llm, prompts)
        assert_greedy_agree(prompts, split, one, unsplit_logits(model))


def worker_processes(llm: LLM) -> list[multiprocessing.Process]:
    return list(llm.engine.ranks._workers.processes)


# -- quick ----------------------------------------------------------------------------------------------------
def test_tp2_engine_generates_one_rank_tokens_and_close_stops_its_workers(checkpoint_factory):
    path = checkpoint(checkpoint_factory, "llama-12q-4kv-d20")
    model, _ = load_model(str(path), progress=False)
    prompts = prompts_for(model.config.vocab_size, count=4)
    with tp_engine(path, 1) as llm:
        one = greedy_tokens(llm, prompts)
    llm = tp_engine(path, 2)
    workers = worker_processes(llm)
    assert len(workers) == 1 and workers[0].is_alive()
    # Rank 0's KV cache holds its own 2 of the 4 KV heads: [blocks, block_size, kv_heads, head_dim].
    assert llm.engine.runner.kv_caches[0][0].shape[1:] == (8, 2, 20)
    # On the CPU every rank packs its slices of q/k/v and gate/up (the tokens below cover the workers' too).
    assert llm.engine.runner.pack_projections and llm.engine.model.model.layers[0].self_attn.packed_qkv is not None
    assert_greedy_agree(prompts, greedy_tokens(llm, prompts), one, unsplit_logits(model))
    llm.close()
    assert not workers[0].is_alive() and workers[0].exitcode == 0  # asked to stop, and it did
    assert not torch.distributed.is_initialized()


def test_bad_tensor_parallel_sizes_raise_before_any_process_starts():
    for bad in (0, -2, 1.5, True, "2"):
        with pytest.raises(ValueError, match="tensor_parallel_size must be a positive integer"):
            LLM("random:smollm2-135m", tensor_parallel_size=bad)
    with pytest.raises(ValueError, match="async_scheduling is not available with tensor_parallel_size > 1"):
        LLM("random:smollm2-135m", tensor_parallel_size=3, async_scheduling=True)
    # SmolLM2's 9 query heads and 3 KV heads: 3 ranks, not 2 or 4 (plan.py raises; nothing is padded)
    for size in (2, 4):
        with pytest.raises(ValueError, match=r"9 query heads, 3 key/value heads.*use one of \[1, 3\]"):
            LLM("random:smollm2-135m", device="cpu", tensor_parallel_size=size)
    assert multiprocessing.active_children() == []


def test_the_flag_comes_from_the_engine_config():
    parser = argparse.ArgumentParser()
    add_engine_flags(parser)
    assert engine_options(parser.parse_args(["--tensor-parallel-size", "2"])) == {"tensor_parallel_size": 2}
    assert "tensor_parallel_size" not in engine_options(parser.parse_args([]))


def test_a_worker_error_reaches_rank_0_with_its_traceback_and_no_process_is_left(checkpoint_factory):
    path = checkpoint(checkpoint_factory, "qwen3-4q-1kv")
    llm = tp_engine(path, 2)
    workers = worker_processes(llm)
    llm.engine.ranks._control.send(Step([(10**6, 0)], None))  # a block copy only the worker is asked to make
    with pytest.raises(RuntimeError, match=r"(?s)rank 1 of 2 raised an exception:.*IndexError: index 1000000"):
        llm.generate([[1, 2, 3]], SamplingParams(temperature=0, max_tokens=2), use_tqdm=False)
    assert not any(process.is_alive() for process in workers)
    with pytest.raises(RuntimeError, match="workers were stopped .*rank 1 of 2 raised.*create a new LLM"):
        llm.generate([[1, 2, 3]], SamplingParams(temperature=0, max_tokens=2), use_tqdm=False)
    llm.close()  # closing a stopped engine is harmless
    assert not torch.distributed.is_initialized()


# -- slow -----------------------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("name", CONFIGS)
def test_greedy_tokens_over_2_and_4_ranks_agree_with_one_rank(checkpoint_factory, name):
    assert_tp_agrees(checkpoint(checkpoint_factory, name), (2, 4))


@pytest.mark.slow
def test_smollm2_over_3_ranks_agrees_with_one_rank(smollm2):
    model, model_dir = smollm2
    prompts = prompts_for(model.config.vocab_size, count=4)
    with LLM("smollm2", device="cpu") as llm:
        one = greedy_tokens(llm, prompts)
    with LLM("smollm2", device="cpu", tensor_parallel_size=3) as llm:
        assert llm.engine.runner.kv_caches[0][0].shape[2] == 1  # 3 KV heads, one per rank
        split = greedy_tokens(llm, prompts)
    assert_greedy_agree(prompts, split, one, unsplit_logits(model))


@pytest.mark.slow
def test_a_killed_worker_is_reported_and_an_interrupted_step_stops_the_workers(checkpoint_factory, monkeypatch):
    path = checkpoint(checkpoint_factory, "qwen3-4q-1kv")
    params = SamplingParams(temperature=0, max_tokens=2)
    llm = tp_engine(path, 2)
    os.kill(worker_processes(llm)[0].pid, signal.SIGKILL)
    with pytest.raises(RuntimeError, match=r"rank 1 of 2 died \(exit code -9\)"):
        llm.generate([[1, 2, 3]], params, use_tqdm=False)

    llm = tp_engine(path, 2)
    workers = worker_processes(llm)

    def interrupted(batch):
        raise KeyboardInterrupt  # Ctrl-C after the step went to the workers: they wait in a collective

    monkeypatch.setattr(llm.engine.runner.runner, "run", interrupted)
    with pytest.raises(KeyboardInterrupt):
        llm.generate([[1, 2, 3]], params, use_tqdm=False)
    assert not any(process.is_alive() for process in workers)
    with pytest.raises(RuntimeError, match="workers were stopped \\(KeyboardInterrupt on rank 0\\)"):
        llm.generate([[1, 2, 3]], params, use_tqdm=False)


EXIT_WITHOUT_CLOSING = """
import sys
from reference import LLM
llm = LLM(sys.argv[1], device="cpu", tensor_parallel_size=2)
print(*[process.pid for process in llm.engine.ranks._workers.processes])
"""


@pytest.mark.slow
def test_workers_stop_when_the_llm_is_garbage_collected_and_at_interpreter_exit(checkpoint_factory):
    path = checkpoint(checkpoint_factory, "qwen3-4q-1kv")
    llm = tp_engine(path, 2)
    workers = worker_processes(llm)
    del llm
    gc.collect()
    assert [process.exitcode for process in workers] == [0]  # asked to stop, and did
    done = subprocess.run([sys.executable, "-c", EXIT_WITHOUT_CLOSING, str(path)], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    for pid in map(int, done.stdout.split()):
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)  # no such process: it stopped with its rank 0


GENERATE_UNTIL_INTERRUPTED = """
import sys
from reference import LLM, SamplingParams
llm = LLM(sys.argv[1], device="cpu", tensor_parallel_size=2)
print(*[process.pid for process in llm.engine.ranks._workers.processes], flush=True)
while True:
    llm.generate([[1, 2, 3]] * 4, SamplingParams(max_tokens=100, ignore_eos=True), use_tqdm=False)
"""


@pytest.mark.slow
def test_ctrl_c_stops_rank_0_and_its_workers(checkpoint_factory):
    """Ctrl-C in a terminal sends SIGINT to the whole foreground process group: the workers ignore it, rank 0
    raises KeyboardInterrupt and stops them."""
    path = checkpoint(checkpoint_factory, "qwen3-4q-1kv")
    child = subprocess.Popen([sys.executable, "-c", GENERATE_UNTIL_INTERRUPTED, str(path)], start_new_session=True,
                             preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),  # as in a terminal
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    workers = [int(pid) for pid in child.stdout.readline().split()]
    time.sleep(2)  # generating
    os.killpg(child.pid, signal.SIGINT)
    _, stderr = child.communicate(timeout=120)
    assert workers and "KeyboardInterrupt" in stderr
    for pid in workers:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_tp2_engine_on_two_gpus_with_nccl_agrees_with_one_gpu(checkpoint_factory):
    path = checkpoint(checkpoint_factory, "qwen2-8q-2kv-tied")
    model, _ = load_model(str(path), progress=False)
    prompts = prompts_for(model.config.vocab_size)
    with LLM(str(path), device="cuda", dtype="float32", enforce_eager=True) as llm:
        one = greedy_tokens(llm, prompts)
    with LLM(str(path), device="cuda", dtype="float32", tensor_parallel_size=2) as llm:
        assert torch.distributed.get_backend() == "nccl"
        split = greedy_tokens(llm, prompts)
    assert_greedy_agree(prompts, split, one, unsplit_logits(model))
