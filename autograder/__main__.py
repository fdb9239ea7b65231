"""Command line: `python -m autograder SUBCOMMAND ...`.

Subcommands live in COMMANDS as (help, add_arguments, run); a new one (grade, gradescope) adds a function pair
and a line there. `run(args) -> int` is the exit status.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _check_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("lab", help="the lab, e.g. lab0.1")
    parser.add_argument("notebooks", nargs="*", help="notebooks to check (default: the lab's notebooks in its folder)")
    parser.add_argument("--timeout", type=float, default=None, help="wall-clock limit in seconds per notebook")


def _check(args: argparse.Namespace) -> int:
    from .isolate import run_notebook
    from .labs import load_lab
    from .notebook import NotebookError
    from .release import REPO_ROOT
    from .report import format_results

    lab = load_lab(args.lab)
    paths = [Path(p) for p in args.notebooks] or [REPO_ROOT / lab.folder / name for name in lab.notebooks]
    full_marks = True
    for path in paths:
        try:
            results = run_notebook(lab, path, timeout_s=args.timeout)
        except NotebookError as exc:
            print(f"cannot check: {exc}")
            full_marks = False
            continue
        print(format_results(results, title=f"{lab.name} · {path.name}"))
        print()
        full_marks = full_marks and all(result.full_marks for result in results)
    return 0 if full_marks else 1


def _release_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("labs", nargs="*", help="labs to release (default: every lab with solution notebooks)")
    parser.add_argument("--check", action="store_true", help="only report notebooks that are out of date (exit 1)")


def _release(args: argparse.Namespace) -> int:
    from .release import lab_folders, release_lab

    stale = []
    for lab in args.labs or lab_folders():
        changed = release_lab(lab, check_only=args.check)
        stale += changed
        for path in changed:
            print(f"{'out of date' if args.check else 'wrote'}: {path}")
    if not stale:
        print("learner notebooks are up to date")
    return 1 if (args.check and stale) else 0


COMMANDS = {
    "check": ("run a lab's visible tests on your notebooks (exit 0 only at full marks)", _check_arguments, _check),
    "release": ("regenerate the learner notebooks from the solution notebooks", _release_arguments, _release),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m autograder", description="nano-vLLM Labs autograder")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (help_text, add_arguments, _) in COMMANDS.items():
        add_arguments(sub.add_parser(name, help=help_text, description=help_text))
    args = parser.parse_args(argv)
    try:
        return COMMANDS[args.command][2](args)
    except ValueError as exc:  # unknown lab, release errors...: a message, not a traceback
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
