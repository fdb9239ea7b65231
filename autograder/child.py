"""The child process: runs exercise cells and calls the learner's code on inputs the parent sent.

    python -m autograder.child JOB_FILE RESULT_FILE

JOB_FILE (JSON, written by the parent): {"lab": "lab0.1", "exercises": [{"name", "source", "cases": [{"name",
"inputs": <wire text>, "timeout_s"}]}]}. For each exercise, in a fresh namespace: the lab's preamble, then the
reference stand-ins of the exercises it uses, then its cell; then each case's driver call. One JSON line per case
is appended to RESULT_FILE: {"exercise", "case", "status", "result" (wire text) or "message"}.

Everything this process writes is untrusted by the parent: it decodes the lines with the safe codec, compares the
results itself, and treats missing lines as a crash or a timeout. This module only has to be honest when the
learner's code is; isolation (limits, scratch directory, hiding references) is the caller's business.
"""

from __future__ import annotations

import json
import sys


def main(argv: list[str]) -> int:
    job_path, result_path = argv
    with open(job_path, encoding="utf-8") as f:
        job = json.load(f)

    import torch

    torch.set_num_threads(1)  # graders run many children side by side

    from .labs import load_lab
    from .runner import call_learner, describe_exception

    lab = load_lab(job["lab"])
    out = open(result_path, "a", encoding="utf-8")

    def report(exercise: str, case: str, status: str, **fields) -> None:
        out.write(json.dumps({"exercise": exercise, "case": case, "status": status, **fields}) + "\n")
        out.flush()

    for item in job["exercises"]:
        exercise = lab.exercise(item["name"])
        namespace: dict = {"__name__": "__exercise__"}
        problem = None
        try:
            exec(compile(lab.preamble, "<preamble>", "exec"), namespace)
            namespace.update(lab.stand_ins(exercise))
            exec(compile(item["source"], f"<exercise:{exercise.name}>", "exec"), namespace)
            obj = namespace.get(exercise.symbol)
            if obj is None or not callable(obj):
                problem = f"the cell does not define {exercise.symbol}"
        except KeyboardInterrupt:
            raise
        except BaseException as exc:  # the cell itself failed: syntax error, import error, sys.exit...
            problem = f"the exercise cell failed to run: {describe_exception(exc)}"
        for case in item["cases"]:
            if problem is not None:
                report(exercise.name, case["name"], "error", message=problem)
                continue
            outcome = call_learner(exercise, obj, case["inputs"], case["timeout_s"])
            report(exercise.name, case["name"], outcome.status, result=outcome.result_wire, message=outcome.message)
    out.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
