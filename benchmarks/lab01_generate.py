"""Lab 0.1 generation speed on CPU: SmolLM2 load time, and tokens/s of our generate (with and without the KV
cache) next to transformers' `generate`, in one run on the same prompts.

    python benchmarks/lab01_generate.py [--batch 1] [--max-tokens 64] [--threads N]

Prints a table; copy it into benchmarks/RESULTS.md with the machine, date and command.
"""

from __future__ import annotations

import argparse
import time

import torch


def timed(fn):
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    import transformers
    from transformers import AutoModelForCausalLM

    from reference.generate import generate
    from reference.models import load_model
    from reference.models.loader import embedded_gguf_path
    from reference.sampling import SamplingParams
    from reference.tokenizer import Tokenizer

    transformers.logging.set_verbosity_error()
    (model, model_dir), load_s = timed(lambda: load_model("smollm2", progress=False))
    tokenizer = Tokenizer(model_dir)
    gguf = embedded_gguf_path("smollm2")
    hf, hf_load_s = timed(lambda: AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name))
    questions = ["What is the capital of France?", "Write a haiku about the sea.", "Explain gravity briefly.",
                 "Name three colours.", "What is 12 times 7?", "Who wrote Hamlet?", "Describe a cat.", "Say hi."]
    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": q}]) for q in questions[: args.batch]]
    params = SamplingParams(temperature=0, max_tokens=args.max_tokens, ignore_eos=True)
    new_tokens = args.batch * args.max_tokens

    rows = []
    generate(model, prompts, SamplingParams(temperature=0, max_tokens=2))  # warm-up
    for label, use_cache in (("ours, KV cache", True), ("ours, no cache", False)):
        _, seconds = timed(lambda: generate(model, prompts, params, use_cache=use_cache))
        rows.append((label, seconds))

    def hf_generate():
        for p in prompts:  # one at a time: no padding, same work as ours
            ids = torch.tensor([p])
            hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=args.max_tokens,
                        min_new_tokens=args.max_tokens, do_sample=False, pad_token_id=0)

    with torch.no_grad():
        _, seconds = timed(hf_generate)
    rows.append(("transformers generate", seconds))

    print(f"SmolLM2-135M-Instruct, float32, CPU threads {torch.get_num_threads()}, batch {args.batch}, "
          f"{args.max_tokens} new tokens each")
    print(f"load: ours {load_s:.2f} s (converted cache), transformers from GGUF {hf_load_s:.2f} s")
    print(f"| {'engine':<22} | {'seconds':>8} | {'tokens/s':>8} |")
    print(f"|{'-' * 24}|{'-' * 10}|{'-' * 10}|")
    for label, seconds in rows:
        print(f"| {label:<22} | {seconds:>8.2f} | {new_tokens / seconds:>8.1f} |")


if __name__ == "__main__":
    main()
