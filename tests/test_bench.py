"""The benchmark draws reproducible workloads, counts tokens right, and honours arrival times.

Engine runs use a tiny random checkpoint on CPU. Nothing here asserts on speed: only on counts, ranges and order.
"""

from __future__ import annotations

import argparse
import json
import math

import pytest

from reference.bench import add_bench_arguments, engine_line, run_bench, run_engine, run_hf_baseline
from reference.workload import PRESETS, REAL_QUESTIONS, make_workload, parse_range, parse_rate, workload_options

VOCAB = 512  # the tiny checkpoints' vocabulary


@pytest.fixture(scope="module")
def tiny_path(checkpoint_factory):
    return checkpoint_factory("llama")


@pytest.fixture(scope="module")
def tiny_engine(tiny_path):
    from reference.engine import LLMEngine

    return LLMEngine(str(tiny_path), device="cpu", max_num_seqs=4, max_num_batched_tokens=64, max_model_len=128)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser()
    add_bench_arguments(p)
    return p


# -- parsing ------------------------------------------------------------------------------------------------------
def test_parse_range_accepts_a_range_or_a_fixed_length():
    assert parse_range("32:256") == (32, 256)
    assert parse_range("64") == (64, 64)
    assert parse_range("5:5") == (5, 5)


@pytest.mark.parametrize("text, message", [
    ("abc", "not a length or a range"), ("1:2:3", "not a length or a range"), ("8:", "not a length or a range"),
    ("0", "at least 1"), ("0:4", "at least 1"), ("-3", "at least 1"), ("256:32", "empty range"),
])
def test_parse_range_rejects_bad_values_clearly(text, message):
    with pytest.raises(ValueError, match=message):
        parse_range(text, "--input-len")


def test_bad_range_flag_is_a_usage_error_naming_the_flag(capsys):
    with pytest.raises(SystemExit) as exc:
        parser().parse_args(["--output-len", "9:3"])
    assert exc.value.code == 2
    assert "--output-len '9:3' is an empty range" in capsys.readouterr().err


def test_parse_rate():
    assert parse_rate("inf") == math.inf
    assert parse_rate("2.5") == 2.5
    for bad in ("0", "-1", "nan", "fast"):
        with pytest.raises(ValueError, match="rate"):
            parse_rate(bad)


def test_flags_default_then_preset_then_explicit_override():
    assert workload_options(parser().parse_args([])) == dict(
        num_requests=32, input_len=(32, 256), output_len=(16, 128), prompts="random", ignore_eos=True)
    preset = workload_options(parser().parse_args(["--preset", "nano-vllm"]))
    assert preset == PRESETS["nano-vllm"] == dict(
        num_requests=256, input_len=(100, 1024), output_len=(100, 1024), prompts="random", ignore_eos=True)
    overridden = workload_options(parser().parse_args(["--preset", "nano-vllm", "--num-requests", "4",
                                                       "--output-len", "7", "--no-ignore-eos"]))
    assert overridden == dict(num_requests=4, input_len=(100, 1024), output_len=(7, 7), prompts="random",
                              ignore_eos=False)


def test_preset_brings_the_engine_it_is_published_for_and_flags_still_win():
    from reference.bench import PRESET_ENGINES, engine_options

    assert engine_options(parser().parse_args([])) == dict(
        model="smollm2", dtype=None, max_num_seqs=None, max_num_batched_tokens=None, max_model_len=None)
    assert engine_options(parser().parse_args(["--preset", "nano-vllm"])) == PRESET_ENGINES["nano-vllm"] == dict(
        model="random:qwen3-0.6b", dtype="bfloat16", max_num_seqs=256, max_num_batched_tokens=8192,
        max_model_len=2048)
    mine = engine_options(parser().parse_args(["--preset", "nano-vllm", "--model", "random:llama-3-8b",
                                               "--max-num-seqs", "64"]))
    assert mine == dict(model="random:llama-3-8b", dtype="bfloat16", max_num_seqs=64,
                        max_num_batched_tokens=8192, max_model_len=2048)


# -- the workload -------------------------------------------------------------------------------------------------
def test_workload_is_reproducible_and_respects_ranges():
    def make(seed):
        return make_workload(50, (3, 9), (2, 5), vocab_size=VOCAB, avoid_token_ids={0, 1}, seed=seed)

    first, again, other = make(0), make(0), make(1)
    assert first.prompt_token_ids == again.prompt_token_ids and first.output_lens == again.output_lens
    assert first.prompt_token_ids != other.prompt_token_ids
    assert all(3 <= n <= 9 for n in first.input_lens) and set(first.input_lens) != {first.input_lens[0]}
    assert all(2 <= n <= 5 for n in first.output_lens) and {2, 5} <= set(first.output_lens)
    ids = {t for p in first.prompt_token_ids for t in p}
    assert ids <= set(range(2, VOCAB))
    assert first.arrival_times == [0.0] * 50  # rate inf: all at once


def test_fixed_lengths_and_poisson_arrivals_keep_the_same_requests():
    at_once = make_workload(20, (6, 6), (4, 4), vocab_size=VOCAB, seed=3)
    poisson = make_workload(20, (6, 6), (4, 4), vocab_size=VOCAB, seed=3, rate=10.0)
    assert at_once.input_lens == [6] * 20 and at_once.output_lens == [4] * 20
    assert poisson.prompt_token_ids == at_once.prompt_token_ids  # the rate changes only the arrivals
    gaps = [b - a for a, b in zip(poisson.arrival_times, poisson.arrival_times[1:])]
    assert poisson.arrival_times[0] == 0.0 and all(g > 0 for g in gaps)
    assert 0.02 < sum(gaps) / len(gaps) < 0.5  # mean 1/rate = 0.1 s; wide bounds, 19 samples


def test_workload_rejects_bad_requests():
    with pytest.raises(ValueError, match="vocab_size"):
        make_workload(2, (1, 2), (1, 2))
    with pytest.raises(ValueError, match="prompts='words'"):
        make_workload(2, (1, 2), (1, 2), prompts="words", vocab_size=VOCAB)
    with pytest.raises(ValueError, match="temperature"):
        make_workload(2, (1, 2), (1, 2), vocab_size=VOCAB, temperature=-1.0)


def test_real_prompts_need_a_tokenizer(tiny_engine):
    with pytest.raises(ValueError, match="tokenizer"):
        make_workload(2, (1, 2), (1, 2), prompts="real", tokenizer=tiny_engine.tokenizer)


@pytest.mark.slow
def test_real_prompts_are_chat_templated_questions_at_natural_length():
    from reference.models import resolve_model_dir
    from reference.tokenizer import Tokenizer

    tokenizer = Tokenizer(resolve_model_dir("smollm2", progress=False))
    workload = make_workload(len(REAL_QUESTIONS) + 2, (32, 256), (4, 8), prompts="real", tokenizer=tokenizer)
    first = REAL_QUESTIONS[0]
    assert workload.prompt_token_ids[0] == tokenizer.apply_chat_template([{"role": "user", "content": first}])
    assert first in tokenizer.decode(workload.prompt_token_ids[0])
    assert workload.prompt_token_ids[len(REAL_QUESTIONS)] == workload.prompt_token_ids[0]  # the list repeats
    assert workload.input_len is None and len(set(workload.input_lens)) > 1


# -- running ------------------------------------------------------------------------------------------------------
def test_engine_run_generates_exactly_the_requested_tokens(tiny_engine):
    workload = make_workload(8, (4, 40), (1, 12), vocab_size=VOCAB, seed=5)
    run = run_engine(tiny_engine, workload, use_tqdm=False)
    assert [len(o.outputs[0].token_ids) for o in run.outputs] == workload.output_lens
    assert [o.prompt_token_ids for o in run.outputs] == workload.prompt_token_ids
    assert run.summary.num_requests == 8
    assert run.summary.output_tokens == sum(workload.output_lens)
    assert run.summary.prompt_tokens == sum(workload.input_lens)
    assert run.summary.output_throughput > 0 and run.summary.total_throughput > run.summary.output_throughput
    stats = run.step_stats()
    assert stats["steps"] == len(run.steps) > 0
    # Every prompt token is prefilled once; every output token but each request's last is fed back once.
    assert sum(s.num_prefill_tokens for s in run.steps) == sum(workload.input_lens)
    assert sum(s.num_decode_tokens for s in run.steps) == sum(workload.output_lens) - workload.num_requests
    assert stats["mean_prefill_tokens_per_step"] == pytest.approx(sum(workload.input_lens) / len(run.steps))
    assert stats["preemptions"] == 0 and 0 < stats["peak_kv_usage"] <= 1
    assert not any(rid.startswith("warmup") for s in run.steps for rid, _, _ in s.scheduled)  # not counted


def test_thorough_warm_up_runs_every_kind_of_step_the_workload_will(tiny_engine):
    """On the GPU the warm-up must compile every kernel variant before the clock starts (bench._warm_up)."""
    from reference.bench import _warm_up

    engine = tiny_engine
    first = len(engine.step_log)
    _warm_up(engine, every_step_kind=True)
    steps = engine.step_log[first:]
    budget = engine.config.max_num_batched_tokens
    long_chunks = [n for s in steps for rid, _, n in s.scheduled if rid == "warmup-long"]
    assert long_chunks[0] == budget - 3 * 8, "the long prompt's first chunk fills what the short prompts leave"
    assert len(long_chunks) >= 3, "then a chunk over its cached first one, then decode"
    assert any(s.num_prefill_tokens and s.num_decode_tokens for s in steps), "a mixed prefill + decode step"
    assert any(s.num_decode_tokens and not s.num_prefill_tokens for s in steps), "decode-only steps"
    assert not engine.has_unfinished_requests()
    assert engine.kv_manager.num_free_blocks == engine.kv_manager.num_blocks


def test_poisson_run_completes_with_increasing_arrival_times(tiny_engine):
    workload = make_workload(6, (4, 10), (2, 6), vocab_size=VOCAB, rate=200.0, seed=2)
    run = run_engine(tiny_engine, workload, use_tqdm=False)
    arrivals = [o.metrics.arrival_time for o in run.outputs]
    assert all(b > a for a, b in zip(arrivals, arrivals[1:]))
    start = arrivals[0]  # the first request arrives at offset 0
    assert [a - start for a in arrivals] == pytest.approx(workload.arrival_times, abs=1e-9)
    assert run.summary.output_tokens == sum(workload.output_lens)
    for out in run.outputs:  # latencies count from the scheduled arrival, which precedes everything else
        m = out.metrics
        assert m.arrival_time <= m.first_scheduled_time <= m.first_token_time <= m.finish_time
    assert run.summary.wall_time >= workload.arrival_times[-1]


def test_hf_baseline_counts_only_requested_tokens(tiny_path):
    workload = make_workload(3, (3, 8), (1, 9), vocab_size=VOCAB, seed=0)
    workload.output_lens = [2, 5, 3]  # fixed, so the padded total is known: batches [2, 5] and [3]
    run = run_hf_baseline(tiny_path, workload, batch_size=2, use_tqdm=False)
    assert run.useful_output_tokens == 10
    assert run.generated_tokens == 2 * 5 + 1 * 3
    assert run.padding_waste == pytest.approx(3 / 13)
    assert run.prompt_tokens == sum(workload.input_lens)
    assert run.output_throughput == pytest.approx(10 / run.wall_time)


def test_run_bench_prints_the_table_and_writes_json(tiny_path, tmp_path, capsys):
    json_path = tmp_path / "bench.json"
    args = parser().parse_args([
        "--model", str(tiny_path), "--device", "cpu", "--num-requests", "5", "--input-len", "4:16",
        "--output-len", "3", "--max-num-seqs", "2", "--max-model-len", "64", "--baseline", "hf",
        "--hf-subsample", "3", "--json", str(json_path),
    ])
    report = run_bench(args)
    printed = capsys.readouterr().out
    for expected in ("5 requests, random token-id prompts", "output tok/s", "TTFT", "TPOT", "end-to-end",
                     "preemptions", "peak KV usage", "ours / HF output throughput"):
        assert expected in printed
    assert json.loads(json_path.read_text()) == report
    assert report["results"]["output_tokens"] == 15
    assert report["engine"]["max_num_seqs"] == 2 and report["engine"]["tensor_parallel_size"] == 1
    assert "tensor parallel" not in printed
    assert engine_line({**report["engine"], "tensor_parallel_size": 2}).endswith(
        ", tensor parallel over 2 ranks (weights, KV and the floor per rank)")
    hf = report["hf_baseline"]
    assert hf["num_requests"] == 3 and hf["useful_output_tokens"] == 9 and hf["generated_tokens"] == 9
    assert hf["ours_over_hf_output_throughput"] == pytest.approx(
        report["results"]["output_throughput"] / hf["output_throughput"])


def test_run_bench_rejects_a_workload_longer_than_max_model_len(tiny_path):
    args = parser().parse_args(["--model", str(tiny_path), "--device", "cpu", "--num-requests", "2",
                                "--input-len", "40", "--output-len", "30", "--max-model-len", "64"])
    with pytest.raises(ValueError, match="max_model_len is 64"):
        run_bench(args)
