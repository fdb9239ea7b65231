"""How often each attention backend needs the tie rule against transformers in bf16 (tests/exactness.py), on more
prompts than tests/test_gpu.py's 30, and how many near-ties transformers' own greedy path meets.

    python benchmarks/tie_rates.py [--prompts 150] [--dtype bfloat16] [--backends triton,flash+graphs]
                                   [--reference-cache FILE]

The model is test_gpu.py's (a random Qwen3-0.6B-shaped checkpoint with its tied LM head scaled up, same seed);
prompts are random token ids of 5-299 tokens, 10 new tokens each. For each backend: sequences equal to
transformers', excused at a near-tie (the first difference where transformers' top-2 gap is within the
tolerance), and failed (a difference past it). "Near-ties on the path" counts the positions of transformers'
own continuations whose top-2 gap is within the tolerance: the chances a correct engine has to differ. This is
the calibration of the test's 10% cap, not a test.

Time: transformers' greedy, one `generate` a prompt, is the slow part (about 0.35 s a prompt on an H200, so 600
prompts take some 3.5 minutes); --reference-cache keeps its continuations for the next run on the same machine.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch
from tqdm.auto import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from exactness import first_difference, hf_greedy, tie_tolerance  # noqa: E402
from reference import LLM, SamplingParams  # noqa: E402
from reference.models.presets import ARCHITECTURES  # noqa: E402

MAX_NEW, LM_HEAD_SCALE = 10, 8.0  # tests/test_gpu.py's
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # the CPU only to try the script out
# Ours as "backend" (eager) or "backend+graphs"; "transformers-eager" is transformers with eager attention instead
# of SDPA: a second correct implementation, the rate a correct engine can be held to.
BACKENDS = ["transformers-eager", "triton", "triton+graphs", "flash", "auto+graphs"]


def twin(path: str, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM, Qwen3Config

    arch = {k: v for k, v in ARCHITECTURES["qwen3-0.6b"].items() if k not in ("model_type", "qk_norm")}
    torch.manual_seed(0)
    with torch.device(DEVICE):
        hf = AutoModelForCausalLM.from_config(Qwen3Config(**arch, bos_token_id=None, eos_token_id=None,
                                                          pad_token_id=None), dtype=dtype)
    with torch.no_grad():
        hf.get_output_embeddings().weight.mul_(LM_HEAD_SCALE)
    hf.save_pretrained(path)
    return hf.eval()


@torch.no_grad()
def path_gaps(hf, prompt: list[int], continuation: list[int]) -> list[tuple[float, float]]:
    """(top-2 gap, top logit) of transformers' logits at each new token of its own continuation."""
    ids = torch.tensor([prompt + continuation[:-1]], device=DEVICE)
    logits = hf(ids).logits[0, len(prompt) - 1:].float()
    top2 = torch.topk(logits, 2, dim=-1).values
    return [(a - b, a) for a, b in top2.tolist()]


def continuations(path: str, dtype: str, name: str, prompts: list[list[int]]) -> list[list[int]]:
    """Greedy continuations from one of BACKENDS."""
    if name == "transformers-eager":
        from transformers import AutoModelForCausalLM

        other = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype),
                                                     attn_implementation="eager").to(DEVICE).eval()
        return [hf_greedy(other, p, MAX_NEW) for p in prompts]
    backend, _, graphs = name.partition("+")
    llm = LLM(path, device=DEVICE, dtype=dtype, attention_backend=backend, enforce_eager=not graphs,
              max_num_seqs=8, max_num_batched_tokens=512, max_model_len=512, num_kv_blocks=1024)
    outputs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=MAX_NEW), use_tqdm=False)
    return [o.outputs[0].token_ids for o in outputs]


def transformers_path(hf, prompts, cache: str | None) -> tuple[list[list[int]], list[list[tuple[float, float]]]]:
    """transformers' greedy continuations and their (top-2 gap, top logit) per position; from `cache` if it holds
    them for these prompts (the slow part: one generate per prompt), else computed and saved there."""
    if cache and Path(cache).exists():
        saved = torch.load(cache)
        if saved["prompts"] == prompts:
            return saved["reference"], saved["gaps"]
    reference = [hf_greedy(hf, p, MAX_NEW) for p in tqdm(prompts, desc="transformers greedy", leave=False)]
    gaps = [path_gaps(hf, p, r) for p, r in zip(prompts, reference)]
    if cache:
        torch.save(dict(prompts=prompts, reference=reference, gaps=gaps), cache)
    return reference, gaps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=150)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--backends", default=",".join(BACKENDS),
                        help="comma-separated, from: " + ", ".join(BACKENDS))
    parser.add_argument("--reference-cache", help="a file for transformers' continuations, reused across runs")
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    with tempfile.TemporaryDirectory() as path:
        hf = twin(path, dtype)
        generator = torch.Generator().manual_seed(1)
        lengths = torch.randint(5, 300, (args.prompts,), generator=generator).tolist()
        prompts = [torch.randint(0, 151936, (n,), generator=generator).tolist() for n in lengths]
        reference, gaps = transformers_path(hf, prompts, args.reference_cache)
        near = [[gap <= tie_tolerance(dtype, top) for gap, top in row] for row in gaps]
        card = torch.cuda.get_device_name() if DEVICE == "cuda" else "CPU"
        print(f"{card}, {args.dtype}; {args.prompts} prompts x {MAX_NEW} tokens; near-ties on "
              f"transformers' path: {sum(map(sum, near))} of {args.prompts * MAX_NEW} positions, in "
              f"{sum(map(any, near))} sequences")
        print("| engine | equal | excused | failed | excused % | excused in the first 5 tokens |")
        print("|---|---|---|---|---|---|")
        for name in args.backends.split(","):
            counts = {"equal": 0, "excused": 0, "failed": 0}
            early = 0  # what a test of 5 new tokens would excuse (greedy: the first 5 of 10 are those of 5)
            for ours, ref, row in zip(continuations(path, args.dtype, name, prompts), reference, near):
                i = first_difference(ours, ref)
                counts["equal" if i is None else "excused" if row[i] else "failed"] += 1
                early += i is not None and i < 5 and row[i]
            print(f"| {name} | {counts['equal']} | {counts['excused']} | {counts['failed']} | "
                  f"{100 * counts['excused'] / args.prompts:.1f} | {early} ({100 * early / args.prompts:.1f}%) |")
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
