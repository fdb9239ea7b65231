"""Which Triton kernels a workload still compiles after the engine's start-up warm-up: what the warm-up misses.

    python benchmarks/triton_compiles.py [--calls 2] [--requests 256] [--tuned]

Triton compiles a kernel once per specialisation: per constexpr value, and per class of each integer argument
(1, divisible by 16, other) and of each pointer's alignment. A compilation met inside a timed `generate` costs it
up to a second (issue 16: a fresh machine's first call trailed a warm one by about 0.7 s). With a fresh, empty
TRITON_CACHE_DIR every compilation leaves one cache entry (a directory with the kernel's <name>.json metadata and
its IR), so this script:
1. builds `LLM(checkpoint, device="cuda", dtype="bfloat16")` (--tuned: with the preset's engine sizes) on a random Qwen3-0.6B checkpoint (engine start
   includes CUDA-graph capture and the warm-up, reference/warmup.py) and lists the cache's entries;
2. runs the nano-vllm workload through the public API (256 requests, input and output uniform in [100, 1024],
   temperature 0.6, ignore EOS; call 2 on fresh prompts, workload seed 1), as benchmarks/public_api_throughput.py;
3. prints every entry that appeared during the calls (kernel, warps, and its TTIR signature: `/16` marks an
   argument specialised as divisible by 16; an integer argument that was 1 is folded away, so the signature is
   then shorter than the kernel's runtime arguments, listed beside it) and exits 1 if there is any.
Needs a CUDA GPU; no network. About a minute on an H200.
"""

from __future__ import annotations

import os
import sys
import tempfile

CACHE_DIR = tempfile.mkdtemp(prefix="triton-cache-")
os.environ["TRITON_CACHE_DIR"] = CACHE_DIR  # before anything imports triton: a fresh cache, so entries = compiles

import argparse  # noqa: E402
import json  # noqa: E402
import re  # noqa: E402
import shutil  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
sys.path.insert(0, str(Path(__file__).resolve().parent))  # for public_api_throughput's checkpoint and settings
from public_api_throughput import TEMPERATURE, TUNED, save_random_checkpoint  # noqa: E402

from reference import LLM, SamplingParams  # noqa: E402
from reference.models.presets import ARCHITECTURES  # noqa: E402
from reference.workload import make_workload  # noqa: E402

def runtime_arguments(kernel_name: str) -> list[str] | None:
    """The non-constexpr parameters of the engine's Triton kernel called `kernel_name` (None: not found)."""
    from reference import fused_sampling
    from reference.attention import triton_ops
    from reference.models import fused

    for module in (fused, triton_ops, fused_sampling):
        params = getattr(getattr(module, kernel_name, None), "params", None)  # a triton.jit function's
        if params is not None:
            return [p.name for p in params if not p.is_constexpr]
    return None


def split_top_level(text: str) -> list[str]:
    """Split at the commas outside any (), {}, <> or quotes (TTIR arguments carry attributes and locations)."""
    parts, depth, quoted, current = [], 0, False, ""
    for char in text:
        quoted ^= char == '"'
        if not quoted:
            depth += (char in "({<") - (char in ")}>")
        if char == "," and depth == 0 and not quoted:
            parts.append(current.strip())
            current = ""
        else:
            current += char
    return parts + ([current.strip()] if current.strip() else [])


def ttir_arguments(ttir: str) -> list[str] | None:
    """Each argument of the TTIR's kernel as `name:type`, `/16` added where specialised as divisible by 16
    (the name comes from the argument's location when Triton printed one)."""
    start = ttir.find("tt.func public @")
    if start < 0:
        return None
    start = ttir.index("(", start) + 1
    depth, end = 1, start
    while depth:
        depth += (ttir[end] == "(") - (ttir[end] == ")")
        end += 1
    arguments = []
    for argument in split_top_level(ttir[start:end - 1]):
        kind = re.match(r"%\w+: (!tt\.ptr<[^>]+>|\w+)", argument)
        name = re.search(r'loc\("(\w+)"', argument)
        text = ("*" + kind.group(1)[8:-1]) if kind and kind.group(1).startswith("!tt.ptr") else (kind and kind.group(1))
        text = f"{name.group(1)}:{text}" if name else str(text)
        arguments.append(text + ("/16" if "tt.divisibility = 16" in argument else ""))
    return arguments


def describe_signature(entry: Path, runtime: list[str] | None) -> str:
    """The compiled signature, and the runtime integer arguments Triton folded because they were 1."""
    for path in [*entry.glob("*.ttir"), *entry.glob("*.source")]:
        arguments = ttir_arguments(path.read_text())
        if arguments is None:
            continue
        text = "(" + ", ".join(arguments) + ")"
        names = {a.split(":")[0] for a in arguments if ":" in a}
        if runtime and names:
            folded = [n for n in runtime if n not in names]
            text += f" ==1: {', '.join(folded)}" if folded else ""
        elif runtime and len(runtime) != len(arguments):
            text += f" ({len(runtime) - len(arguments)} of {', '.join(runtime)} folded as ==1)"
        return text
    return "(no TTIR in the entry)"


def cache_entries(cache_dir: str) -> dict[str, str]:
    """{entry directory name: a line describing the kernel compiled there}, launcher builds left out."""
    entries = {}
    for metadata_path in Path(cache_dir).glob("*/*.json"):
        if metadata_path.name.startswith("__grp__"):
            continue
        metadata = json.loads(metadata_path.read_text())
        if "num_warps" not in metadata:
            continue
        name = metadata.get("name", metadata_path.stem)
        signature = describe_signature(metadata_path.parent, runtime_arguments(name))
        entries[metadata_path.parent.name] = (
            f"{name} warps={metadata['num_warps']} stages={metadata.get('num_stages')} {signature}")
    return entries


def run_workload(llm: LLM, seed: int, requests: int) -> float:
    vocab = ARCHITECTURES["qwen3-0.6b"]["vocab_size"]
    workload = make_workload(requests, (100, 1024), (100, 1024), vocab_size=vocab, seed=seed)
    params = [SamplingParams(temperature=TEMPERATURE, max_tokens=o, ignore_eos=True) for o in workload.output_lens]
    start = time.perf_counter()
    llm.generate(workload.prompt_token_ids, params, use_tqdm=False)
    return time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=2, choices=(1, 2), help="workload seeds 0 (and 1)")
    parser.add_argument("--requests", type=int, default=256)
    parser.add_argument("--tuned", action="store_true", help="the preset's engine sizes instead of the defaults")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("needs a CUDA GPU (Triton compiles nothing on the CPU)")
        return 2
    try:
        with tempfile.TemporaryDirectory() as path:
            save_random_checkpoint(path, torch.bfloat16)
            start = time.perf_counter()
            llm = LLM(path, device="cuda", dtype="bfloat16", **(TUNED if args.tuned else {}))
            warm_up = llm.engine.warm_up_seconds or 0.0
            print(f"engine start {time.perf_counter() - start:.1f} s, of which warm-up {warm_up:.2f} s")
            at_start = cache_entries(CACHE_DIR)
            print(f"\n{len(at_start)} kernels compiled by engine start (graph capture + warm-up):")
            print("\n".join(f"  {line}" for line in sorted(at_start.values())))
            for seed in range(args.calls):
                print(f"\ncall {seed + 1} (workload seed {seed}): {run_workload(llm, seed, args.requests):.2f} s")
            missed = {key: line for key, line in cache_entries(CACHE_DIR).items() if key not in at_start}
    finally:
        shutil.rmtree(CACHE_DIR, ignore_errors=True)
    print(f"\n{len(missed)} kernels compiled after the warm-up (what it misses):")
    print("\n".join(f"  {line}" for line in sorted(missed.values())) or "  none")
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
