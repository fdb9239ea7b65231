"""The CPU's default seats and token budget come from the model's size and the KV budget (EngineConfig.cpu_sizes),
and torch's thread count: every core where OpenMP's idle threads sleep, else the cores other programs leave free
(runtime.CpuThreads)."""

from __future__ import annotations

import pytest
import torch

from reference.engine_config import EngineConfig, cpu_sizes
from reference.models.presets import preset_config
from reference.runtime import CpuThreads

GIB = 1 << 30
SMOLLM2 = preset_config("smollm2-135m")


def test_smollm2_in_one_gib():
    # A token multiplies by 134,479,872 weights (30 layers x 3,538,944 + the 576 x 49,152 LM head): 269 MFLOP;
    # 32 GFLOP / 269 MFLOP = 119 tokens -> the nearest power of two, 128. KV: 2 x 30 x 3 x 64 x 4 = 46,080 bytes a
    # token, so 1 GiB holds 23,301 tokens: 45 seats of 2048 / 4 = 512 tokens.
    assert cpu_sizes(SMOLLM2, 4, GIB, 2048) == (45, 128)


def test_seats_follow_the_kv_budget_and_the_cache_kind():
    assert cpu_sizes(SMOLLM2, 4, GIB // 4, 2048) == (11, 128)  # 5,825 tokens / 512
    assert cpu_sizes(SMOLLM2, 4, GIB, 2048, kv_cache="contiguous") == (11, 128)  # a seat reserves 2048
    assert cpu_sizes(SMOLLM2, 2, GIB, 2048) == (91, 128)  # bfloat16: 23,040 bytes a token -> 46,603 tokens / 512
    assert cpu_sizes(SMOLLM2, 4, GIB, 256) == (128, 128)  # 364 seats fit; no more than the budget can decode
    assert cpu_sizes(SMOLLM2, 4, 1000, 2048) == (1, 128)  # always one seat (make_kv_manager refuses too small a KV)


def test_the_budget_shrinks_as_the_model_grows():
    # Qwen3-0.6B: 595,984,384 weights a token -> 1.19 GFLOP; 32 / 1.19 = 27 -> 32 tokens. KV 229,376 bytes a token:
    # 4,681 tokens in 1 GiB -> 9 seats of 512.
    assert cpu_sizes(preset_config("qwen3-0.6b"), 4, GIB, 2048) == (9, 32)
    # Llama-3-8B: 15 GFLOP a token -> 2 tokens, raised to the floor of 16; 4,096 KV tokens -> 8 seats.
    assert cpu_sizes(preset_config("llama-3-8b"), 4, GIB, 2048) == (8, 16)


def filled(**options) -> EngineConfig:
    config = EngineConfig(**options)
    config.fill_defaults(torch.device("cpu"), SMOLLM2, 4)
    return config


def test_fill_defaults_on_the_cpu():
    config = filled()
    assert (config.max_num_seqs, config.max_num_batched_tokens, config.max_model_len) == (45, 128, 2048)
    assert filled(max_num_batched_tokens=32).max_num_seqs == 32  # seats never exceed a given budget
    assert filled(max_num_seqs=3).max_num_batched_tokens == 128
    assert filled(cpu_kv_cache_bytes=GIB // 4, max_model_len=1024).max_num_seqs == 22  # 5,825 / 256
    # Without chunked prefill a whole prompt must fit one step: the default budget rises, a given one is checked.
    assert filled(enable_chunked_prefill=False).max_num_batched_tokens == 2048
    with pytest.raises(ValueError, match="without chunked prefill"):
        filled(enable_chunked_prefill=False, max_num_batched_tokens=512)


def test_cpu_threads_setting_is_kept_and_validated():
    before = torch.get_num_threads()
    try:
        threads = CpuThreads(1)
        assert threads.adjust() == 1 and torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
    with pytest.raises(ValueError, match="cpu_threads must be a positive integer"):
        EngineConfig(cpu_threads=0)


def test_cpu_threads_follow_the_free_cores_where_idle_threads_spin(monkeypatch):
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)  # OpenMP's default: idle threads spin
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    samples = iter([(0.0, 0.0, 0.0),  # (wall s, CPU-s of all programs, CPU-s of this process)
                    (0.5, 1.0, 0.0),  # under a second later: not rechecked yet
                    (2.0, 3.0, 1.0),  # 2 s: others ran 3 - 1 = 2 CPU-s -> 1 core busy, 1 free
                    (4.0, 4.0, 2.5),  # others ran 0.5 CPU-s in 2 s -> 0.25 of a core: 2 free
                    (6.0, 7.8, 2.5)])  # others 3.8 CPU-s in 2 s: 1.9 cores busy -> still 1 thread, never 0
    monkeypatch.setattr("reference.runtime._cpu_sample", lambda: next(samples))
    try:
        threads = CpuThreads()
        assert [threads.adjust() for _ in range(4)] == [2, 1, 2, 1]
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("policy", ["PASSIVE", "passive"])
def test_cpu_threads_use_every_core_where_idle_threads_sleep(monkeypatch, policy):
    monkeypatch.setenv("OMP_WAIT_POLICY", policy)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    # Both cores busy elsewhere at every look: two sleeping-idle threads still get more CPU than one.
    samples = iter([(2.0 * i, 2.0 * i, 0.0) for i in range(5)])
    monkeypatch.setattr("reference.runtime._cpu_sample", lambda: next(samples))
    try:
        threads = CpuThreads()
        assert [threads.adjust() for _ in range(4)] == [2, 2, 2, 2]
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
