"""Mutation score of the lab tests: how many plausible wrong solutions (tests/mutants/) the grading cases catch.

    python benchmarks/mutation_score.py                 # killed/total per lab (the table in the lab READMEs)
    python benchmarks/mutation_score.py --by-exercise   # and per exercise, with any survivor named
    python benchmarks/mutation_score.py --grade lab0.2  # the same mutants through the sandboxed `grade` (slow)

A mutant is killed when it loses at least one point of its exercise, hidden cases included; a trivial mutant
(identity, constants, None, the input returned) only when it scores 0 there. By default every mutant is judged in
this process with the grader's own cases, comparisons and codec round trip (autograder.runner.run_in_process, as
tests/test_mutants.py does); --grade writes packed folder submissions (one mutant per exercise each, exercises
being judged independently) plus the solution as a control, and grades them with `grade` in its sandbox.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
os.environ.setdefault("TRITON_INTERPRET", "1")  # the Triton exercise runs in the interpreter, as in the grader

import torch  # noqa: E402

from mutants import LABS, Verdict, evaluate, load_catalogue, packed, write_submission  # noqa: E402


def graded_verdicts(lab_name: str, jobs: int) -> list[Verdict]:
    from autograder.grade import GradeOptions, grade
    from autograder.labs import load_lab

    lab = load_lab(lab_name)
    mutants = [m for items in load_catalogue(lab_name).values() for m in items]
    groups = packed(mutants)
    with tempfile.TemporaryDirectory(prefix="mutants-") as folder:
        paths = [write_submission(lab_name, Path(folder) / "control", [])]
        paths += [write_submission(lab_name, Path(folder) / f"pack{i:02d}", group) for i, group in enumerate(groups)]
        grades = {g.student: g for g in grade(lab, paths, GradeOptions(jobs=jobs, progress=True))}
    verdicts = []
    for result in grades["control"].results:
        verdicts.append(Verdict(None, result.exercise, result.score, result.max_score))
    for i, group in enumerate(groups):
        results = {r.exercise: r for r in grades[f"pack{i:02d}"].results}
        for mutant in group:
            result = results[mutant.exercise]
            failed = [f"{c.case}: {c.status}" for c in result.cases if not c.passed]
            verdicts.append(Verdict(mutant, mutant.exercise, result.score, result.max_score, failed))
    return verdicts


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("labs", nargs="*", default=list(LABS))
    parser.add_argument("--by-exercise", action="store_true")
    parser.add_argument("--grade", action="store_true", help="grade the mutants with `grade` (sandbox; slow)")
    parser.add_argument("-j", "--jobs", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(1)
    how = "by `grade` in its sandbox" if args.grade else "in process, with the grader's cases"
    print(f"Mutation score (hidden cases included; judged {how})\n")
    print("| lab | exercises | mutants | of which trivial | killed | score |")
    print("|---|---|---|---|---|---|")
    details, problems = [], []
    for lab_name in args.labs:
        start = time.monotonic()
        verdicts = graded_verdicts(lab_name, args.jobs) if args.grade else evaluate(lab_name)
        controls = [v for v in verdicts if v.mutant is None]
        mutants = [v for v in verdicts if v.mutant is not None]
        problems += [f"{lab_name} {v.exercise}: the solution scores {v.score:g}/{v.max_score:g}"
                     for v in controls if v.score != v.max_score]
        killed = sum(v.killed for v in mutants)
        trivial = sum(v.mutant.trivial for v in mutants)
        print(f"| {lab_name} | {len({v.exercise for v in mutants})} | {len(mutants)} | {trivial} | {killed} | "
              f"{killed}/{len(mutants)} ({100 * killed / max(1, len(mutants)):.0f}%) |")
        for exercise in dict.fromkeys(v.exercise for v in mutants):
            mine = [v for v in mutants if v.exercise == exercise]
            survivors = [v.mutant.name for v in mine if not v.killed]
            details.append(f"| {lab_name} | {exercise} | {len(mine)} | {sum(v.killed for v in mine)} | "
                           f"{', '.join(survivors) or '-'} |")
        print(f"<!-- {lab_name}: {time.monotonic() - start:.0f} s -->", file=sys.stderr)
    if args.by_exercise:
        print("\n| lab | exercise | mutants | killed | survivors |\n|---|---|---|---|---|")
        print("\n".join(details))
    for problem in problems:
        print("PROBLEM:", problem)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
