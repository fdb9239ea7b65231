"""How long other streams wait while a long prompt is prefilled on the CPU, by token budget (issue 17 item 5).

    python benchmarks/cpu_long_prompt_gap.py [--budgets 128,512,2048] [--prompt-len 2047] [--streams 8]

For each budget, an engine (SmolLM2 float32, otherwise default settings) starts --streams greedy streams of
random-id prompts, lets them decode a few steps, then receives one fresh prompt of --prompt-len random ids.
Printed per budget: the streams' longest gap between two tokens while that prompt is prefilled, their median
gap before it arrived, and the long prompt's time to first token. In-process, engine.step() only (the server
adds its own overheads: `python -m reference bench --serve --long-prompt`). Times only.
"""

from __future__ import annotations

import argparse
import random
import statistics
import time


def measure(budget: int, prompt_len: int, streams: int) -> dict[str, float]:
    from reference import LLMEngine, SamplingParams

    engine = LLMEngine("smollm2", device="cpu", dtype="float32", max_num_batched_tokens=budget,
                       max_num_seqs=max(streams + 1, 2), enable_prefix_caching=False)
    rng = random.Random(budget)
    vocab = engine.model_config.vocab_size
    stream_params = SamplingParams(temperature=0, max_tokens=10_000 // 8, ignore_eos=True)
    for i in range(streams):
        engine.add_request(f"stream-{i}", [rng.randrange(vocab) for _ in range(32)], stream_params)
    last_token, gaps_before, gaps_during = {}, [], []
    long_arrived = first_token = None
    for step in range(10_000):
        if step == 8:
            long_arrived = time.monotonic()
            engine.add_request("long", [rng.randrange(vocab) for _ in range(prompt_len)],
                               SamplingParams(temperature=0, max_tokens=1, ignore_eos=True))
        outputs = engine.step()
        now = time.monotonic()
        for out in outputs:
            if out.request_id == "long" and out.outputs[0].token_ids:
                first_token = now
            elif out.request_id != "long":
                if out.request_id in last_token:
                    (gaps_during if long_arrived and first_token is None else gaps_before).append(
                        now - last_token[out.request_id])
                last_token[out.request_id] = now
        if first_token is not None:
            break
    for i in range(streams):
        engine.abort(f"stream-{i}")
    return {"budget": budget, "median_gap_before_ms": 1e3 * statistics.median(gaps_before),
            "longest_gap_during_ms": 1e3 * max(gaps_during), "long_prompt_ttft_s": first_token - long_arrived}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budgets", default="128,512,2048")
    parser.add_argument("--prompt-len", type=int, default=2047)
    parser.add_argument("--streams", type=int, default=8)
    args = parser.parse_args()
    print("| token budget | streams' median gap before (ms) | longest gap during the prefill (ms) | "
          "long prompt's TTFT (s) |")
    print("|---|---|---|---|")
    for budget in (int(b) for b in args.budgets.split(",")):
        row = measure(budget, args.prompt_len, args.streams)
        print(f"| {budget} | {row['median_gap_before_ms']:.0f} | {row['longest_gap_during_ms']:.0f} | "
              f"{row['long_prompt_ttft_s']:.1f} |", flush=True)


if __name__ == "__main__":
    main()
