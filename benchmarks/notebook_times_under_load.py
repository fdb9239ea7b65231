"""How long each solution notebook takes while other work keeps the CPU busy (a learner's laptop with a browser open).

    python benchmarks/notebook_times_under_load.py [--load N] [--save DIR] [NOTEBOOK ...]

Starts N busy-loop processes (default: one per CPU, so the notebook shares every core with one of them), then runs
each solution notebook (autograder/lab0.x/*.ipynb, or the paths given) top to bottom in a fresh Jupyter kernel with
nbclient, with torch's default thread count, as a learner would; prints seconds per notebook and whether it ran to
the end. --save keeps the executed notebooks (with outputs) in DIR. Times only: nothing here is a test.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import platform
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CELL_TIMEOUT_S = 600  # a hang guard only: no cell of a solution notebook should come near it


def busy_loop() -> None:
    while True:
        pass


def run_notebook(path: Path, save: Path | None) -> tuple[float, str]:
    import nbformat
    from nbclient import NotebookClient

    notebook = nbformat.read(str(path), as_version=4)
    client = NotebookClient(notebook, timeout=CELL_TIMEOUT_S, kernel_name="python3",
                            resources={"metadata": {"path": str(path.parent)}})
    start = time.perf_counter()
    try:
        client.execute()
        status = "ok"
    except Exception as error:  # a failing cell, a cell past the timeout, a dead kernel: report it and go on
        ran = sum(1 for cell in notebook.cells if cell.get("execution_count"))
        status = f"{type(error).__name__} after {ran} code cells: {str(error).strip().splitlines()[-1][:80]}"
    seconds = time.perf_counter() - start
    if save is not None:
        save.mkdir(parents=True, exist_ok=True)
        nbformat.write(notebook, str(save / f"{path.parent.name}_{path.name}"))
    return seconds, status


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("notebooks", nargs="*", type=Path)
    parser.add_argument("--load", type=int, default=os.cpu_count(), help="busy-loop processes (default: one per CPU)")
    parser.add_argument("--save", type=Path, default=None, help="folder for the executed notebooks")
    args = parser.parse_args()
    notebooks = args.notebooks or sorted((REPO / "autograder").glob("lab0.*/*.ipynb"))
    print(f"{os.cpu_count()} CPUs ({platform.processor() or platform.machine()}), {args.load} busy-loop processes")
    workers = [multiprocessing.Process(target=busy_loop, daemon=True) for _ in range(args.load)]
    for worker in workers:
        worker.start()
    try:
        print(f"| {'notebook':<45} | {'seconds':>8} | result |")
        print(f"|{'-' * 47}|{'-' * 10}|--------|")
        total = 0.0
        for path in notebooks:
            seconds, status = run_notebook(path.resolve(), args.save)
            total += seconds
            print(f"| {path.parent.name + '/' + path.name:<45} | {seconds:8.0f} | {status} |", flush=True)
        print(f"| {'total':<45} | {total:8.0f} | |")
    finally:
        for worker in workers:
            worker.terminate()


if __name__ == "__main__":
    main()
