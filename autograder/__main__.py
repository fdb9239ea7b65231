"""Command line: `python -m autograder SUBCOMMAND ...`.

Subcommands live in COMMANDS as (help, add_arguments, run): check, release, grade, gradescope; a new one adds
a function pair and a line there. `run(args) -> int` is the exit status.
"""

from __future__ import annotations

import argparse
import os
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


def _grade_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("lab", help="the lab, e.g. lab0.1")
    parser.add_argument("submissions", nargs="+", help="notebooks, folders or zips, one per student")
    parser.add_argument("--out", required=True, help="folder for grades.csv and one folder per student")
    parser.add_argument("--tests", help="folder with hidden tests (<lab>.py defining CASES; see grade.py)")
    parser.add_argument("-j", "--jobs", type=int, default=1, help="submissions graded in parallel")
    parser.add_argument("--timeout", type=float, help="wall-clock budget per submission in seconds (default: 240)")
    parser.add_argument("--memory", type=int, help="resident memory per submission in MB, all its processes "
                        "together (default: the lab's)")
    parser.add_argument("--sandbox", choices=("auto", "bwrap", "container"), default="auto",
                        help="bwrap: bubblewrap namespaces (the default where it works); container: an unprivileged "
                        "uid without namespaces, for a grading service's container running as root")
    parser.add_argument("--allow-reference", action="store_true",
                        help="keep the reference implementations of the graded exercises in the sandbox")


def _grade(args: argparse.Namespace) -> int:
    from . import sandbox
    from .grade import GradeOptions, grade, load_hidden_tests
    from .gradebook import check_out_dir, write_gradebook
    from .labs import load_lab
    from .report import points

    if args.jobs < 1:
        raise ValueError("-j must be at least 1")
    lab = load_lab(args.lab)
    if args.tests:
        lab = load_hidden_tests(lab, args.tests)
    masked = tuple(str(Path(p).resolve()) for p in [args.out, args.tests] if p)
    options = GradeOptions(timeout_s=args.timeout, memory_mb=args.memory, jobs=args.jobs,
                           allow_reference=args.allow_reference, sandbox=args.sandbox, masked=masked)
    try:
        mode = sandbox.choose_mode(args.sandbox)
    except sandbox.SandboxUnavailable as exc:
        print(f"error: cannot grade: {exc}", file=sys.stderr)
        return 3
    check_out_dir(args.out)  # a folder we may not write into is found before grading, not after
    if mode == "bwrap" and os.name == "posix" and os.geteuid() == 0 and not sandbox.can_drop_to_sandbox_uid():
        print(f"note: bubblewrap runs as root here (inside, student code is an unprivileged uid in its own user "
              f"namespace): an unprivileged user cannot run {sys.executable}; install the course where every user "
              "can read it, such as /opt, to run the sandbox as an unprivileged user outside too", file=sys.stderr)
    grades = grade(lab, args.submissions, options)
    path = write_gradebook(lab, grades, args.out)
    for graded in grades:
        print(f"{graded.student}: {points(graded.score)}/{points(lab.points)} ({graded.status})")
    print(f"wrote {path} and {len(grades)} student folders")
    return 0


def _gradescope_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("lab", help="the lab, e.g. lab0.1")
    parser.add_argument("--out", help="the zip to write (default: <lab>-gradescope.zip)")
    parser.add_argument("--tests", help="folder with hidden tests to ship inside the zip")


def _gradescope(args: argparse.Namespace) -> int:
    from .gradescope import build_zip
    from .labs import load_lab

    lab = load_lab(args.lab)
    path = build_zip(lab, args.out or f"{lab.name}-gradescope.zip", args.tests)
    print(f"wrote {path}: upload it as the assignment's autograder (Ubuntu image)")
    return 0


COMMANDS = {
    "check": ("run a lab's visible tests on your notebooks (exit 0 only at full marks)", _check_arguments, _check),
    "release": ("regenerate the learner notebooks from the solution notebooks", _release_arguments, _release),
    "grade": ("grade submissions in sandboxed processes; write grades.csv and Gradescope results",
              _grade_arguments, _grade),
    "gradescope": ("build a Gradescope autograder zip that runs this grader", _gradescope_arguments, _gradescope),
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
