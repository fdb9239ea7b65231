"""SmolLM2's CPU GEMMs, one step's worth, in each weight layout the engine could use (issue 21).

    python benchmarks/cpu_gemm_packing.py [--rows 8,45,128] [--repeats 8]

For each row count (a decode step's sequences, or a 128-token mixed step) it times the 30 layers' q/k/v, o,
gate/up and down projections, every layer with its own random weights so they stream from memory as in the
engine, then the 49,152 x 576 LM head, as:
- sgemm, row-major: F.linear on the usual [out, in] weight;
- sgemm, column-major: F.linear on the weight stored transposed (models/packing.py's layout before this);
- oneDNN: torch.ops.mkldnn._linear_pointwise on a weight reordered once (_reorder_linear_weight);
- MKL packed: torch.ops.mkl._mkl_linear on a weight packed once for 64 rows (models/mkl_packed.py).
Prints the median over the repeats (ms) and the largest difference from sgemm's product. Times only.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

LAYER_SHAPES = [(960, 576), (576, 576), (3072, 576), (576, 1536)]  # q/k/v packed, o, gate/up packed, down
LM_HEAD = (49152, 576)
LAYERS = 30


def layouts(weight: torch.Tensor) -> dict:
    """Each way to multiply x by weight.T, as a function of x."""
    column_major = weight.t().contiguous().t()
    reordered = torch.ops.mkldnn._reorder_linear_weight(weight, None)
    packed = torch.ops.mkl._mkl_reorder_linear_weight(weight, 64)
    return {
        "sgemm, row-major": lambda x: F.linear(x, weight),
        "sgemm, column-major": lambda x: F.linear(x, column_major),
        "oneDNN": lambda x: torch.ops.mkldnn._linear_pointwise(x, reordered, None, "none", [], ""),
        "MKL packed": lambda x: torch.ops.mkl._mkl_linear(x, packed, weight, None, x.shape[0]),
    }


def time_all(weights: list[torch.Tensor], rows: int, repeats: int) -> dict[str, tuple[float, float]]:
    """kind -> (median ms to run every weight once, largest difference from sgemm row-major)."""
    generator = torch.Generator().manual_seed(rows)
    inputs = [torch.randn(rows, w.shape[1], generator=generator) for w in weights]
    kinds = [layouts(w) for w in weights]
    error = {kind: max((fns[kind](x) - F.linear(x, w)).abs().max().item() for fns, x, w in zip(kinds, inputs, weights))
             for kind in kinds[0]}
    times = {kind: [] for kind in kinds[0]}
    for _ in range(repeats):
        for kind in times:  # interleaved, so a machine whose speed drifts moves every kind alike
            start = time.perf_counter()
            for fns, x in zip(kinds, inputs):
                fns[kind](x)
            times[kind].append(time.perf_counter() - start)
    return {kind: (1e3 * statistics.median(t), error[kind]) for kind, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default="8,45,128")
    parser.add_argument("--repeats", type=int, default=8)
    args = parser.parse_args()
    torch.manual_seed(0)
    layers = [torch.randn(out, inp) / inp**0.5 for _ in range(LAYERS) for out, inp in LAYER_SHAPES]
    lm_head = [torch.randn(*LM_HEAD) / LM_HEAD[1] ** 0.5]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print("| rows | GEMMs | " + " | ".join(layouts(lm_head[0])) + " |")
    for rows in (int(r) for r in args.rows.split(",")):
        for name, weights in ((f"{LAYERS} layers", layers), ("LM head", lm_head)):
            result = time_all(weights, rows, args.repeats)
            cells = " | ".join(f"{ms:.1f} ms ({error:.0e})" for ms, error in result.values())
            print(f"| {rows} | {name} | {cells} |", flush=True)


if __name__ == "__main__":
    main()
