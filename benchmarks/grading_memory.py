"""What grading the solutions costs: resident-memory peak of the largest child, wall time and score, per lab.

    python benchmarks/grading_memory.py [lab0.1 lab0.2 lab0.3] [--mode bwrap|process]

The labs' default memory limits (Lab.memory_mb) are about twice the peaks this prints with PyPI's default CUDA
build of torch; run it with each torch build you support. The peak is the warden's measure (proportional share
of anonymous and shared memory of all the child's processes, sampled every 50 ms).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

from autograder.grade import find_sources
from autograder.isolate import ViewCache, run_sources
from autograder.labs import load_lab

REPO = Path(__file__).resolve().parent.parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("labs", nargs="*", default=["lab0.1", "lab0.2", "lab0.3"])
    parser.add_argument("--mode", default="bwrap", choices=("bwrap", "process"))
    args = parser.parse_args()
    print(f"torch {torch.__version__}, mode {args.mode}, {os.cpu_count()} CPUs")
    print(f"{'lab':8} {'score':>9} {'peak MB':>8} {'limit MB':>9} {'seconds':>8}")
    for name in args.labs:
        lab = load_lab(name)
        sources, unreadable = find_sources(lab, sorted((REPO / "autograder" / name).glob("*.ipynb")))
        if unreadable:
            sys.exit(f"{name}: {unreadable}")
        with tempfile.TemporaryDirectory() as staging:
            os.chmod(staging, 0o755)
            start = time.monotonic()
            run = run_sources(lab, sources, mode=args.mode, include_hidden=args.mode != "process",
                              memory_mb=16384, views=ViewCache(staging))
            seconds = time.monotonic() - start
        score = f"{sum(r.score for r in run.results):g}/{sum(r.max_score for r in run.results):g}"
        print(f"{name:8} {score:>9} {run.peak_mb:8.0f} {lab.memory_mb:9d} {seconds:8.0f}")
        for case in (c for result in run.results for c in result.cases if c.points < c.max_points):
            print(f"    lost {case.max_points - case.points:g}: {case.exercise} / {case.case} ({case.status}): "
                  f"{case.feedback[:400]}")  # the solutions must lose nothing: say where they did


if __name__ == "__main__":
    main()
