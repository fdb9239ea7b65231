"""Tensor parallelism: one workload at tp=1, 2 and 4, its tokens/s, and the share of step time in collectives.

    python benchmarks/tensor_parallel.py [--model PATH | random:ARCH] [--sizes 1,2,4] [--device cpu|cuda]
                                         [--num-prompts 8] [--input-len 32] [--output-len 32]

Each size builds LLM(..., tensor_parallel_size=size) (gloo ranks on the CPU; on cuda one GPU per rank, NCCL),
warms it up, then runs the workload: random token-id prompts of one length, greedy, a fixed number of output
tokens. Rank 0 times its collectives (parallel/group.py's CollectiveTimer; the wait for slower ranks counts,
as it does in the step) and the engine's step log gives the time of the steps, so the all-reduce share is
seconds inside all-reduces / seconds of steps. Every size's tokens are compared with the first size's.

Without --model, a random Llama-shaped checkpoint (16 query and 4 KV heads, hidden 1024, 8 layers, about 190M
parameters, float32) is written to a temporary folder first, so that every rank reads only its slices.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch

from reference import LLM, SamplingParams
from reference.parallel.group import CollectiveTimer, TensorParallel


def make_checkpoint(folder: str) -> str:
    """A random Llama of about 190M parameters, its LM head scaled up so that greedy tokens are not near-ties."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(vocab_size=32000, hidden_size=1024, intermediate_size=4096, num_hidden_layers=8,
                         num_attention_heads=16, num_key_value_heads=4, max_position_embeddings=2048,
                         bos_token_id=None, eos_token_id=None, pad_token_id=None)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(8.0)
    model.save_pretrained(folder)
    return folder


def run_size(model: str, size: int, device: str, prompts: list[list[int]], params: SamplingParams) -> dict:
    """Run the workload on an engine of `size` ranks: its tokens and timings."""
    with LLM(model, device=device, tensor_parallel_size=size, max_num_seqs=len(prompts)) as llm:
        llm.generate(prompts[:2], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True), use_tqdm=False)
        llm.engine.step_log.clear()
        TensorParallel.timer = timer = CollectiveTimer()
        try:
            start = time.perf_counter()
            outputs = llm.generate(prompts, params, use_tqdm=True)
            wall = time.perf_counter() - start
        finally:
            TensorParallel.timer = None
        steps = llm.engine.step_log
    step_seconds = sum(record.end - record.start for record in steps)
    tokens = [out.outputs[0].token_ids for out in outputs]
    return {"size": size, "tokens": tokens, "tokens_per_s": sum(map(len, tokens)) / wall,
            "step_ms": 1e3 * step_seconds / len(steps),
            "all_reduce_share": timer.seconds["all_reduce"] / step_seconds,
            "all_gather_share": timer.seconds["all_gather"] / step_seconds,
            "all_reduces_per_step": timer.calls["all_reduce"] / len(steps)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="a checkpoint directory or random:<architecture>")
    parser.add_argument("--sizes", default="1,2,4", help="tensor-parallel sizes, comma-separated")
    parser.add_argument("--device", default="cpu", help="cpu (gloo ranks) or cuda (one GPU per rank, NCCL)")
    parser.add_argument("--num-prompts", type=int, default=8)
    parser.add_argument("--input-len", type=int, default=32)
    parser.add_argument("--output-len", type=int, default=32)
    args = parser.parse_args()
    sizes = [int(size) for size in args.sizes.split(",")]
    with tempfile.TemporaryDirectory(prefix="tp-bench-") as folder:
        model = args.model or make_checkpoint(folder)
        generator = torch.Generator().manual_seed(0)
        prompts = torch.randint(0, 1000, (args.num_prompts, args.input_len), generator=generator).tolist()
        params = SamplingParams(temperature=0, max_tokens=args.output_len, ignore_eos=True)
        results = []
        for size in sizes:
            print(f"tp={size}: starting {size} rank(s) on {args.device}")
            results.append(run_size(model, size, args.device, prompts, params))
    print(f"\n{args.num_prompts} prompts x {args.input_len} tokens in, {args.output_len} out, greedy, {args.device}; "
          f"model {args.model or 'random Llama 190M (16 / 4 heads, hidden 1024, 8 layers)'}")
    print("| tp | tokens/s | ms per step | all-reduce share | all-gather share | all-reduces per step "
          "| prompts whose tokens equal the first size's |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        same = sum(a == b for a, b in zip(r["tokens"], results[0]["tokens"]))
        print(f"| {r['size']} | {r['tokens_per_s']:.1f} | {r['step_ms']:.1f} | {r['all_reduce_share']:.1%} "
              f"| {r['all_gather_share']:.1%} | {r['all_reduces_per_step']:.0f} | {same}/{len(prompts)} |")


if __name__ == "__main__":
    main()
