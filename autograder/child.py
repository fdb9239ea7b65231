"""The child process: runs exercise cells and calls the learner's code on inputs the parent sent.

    python -m autograder.child        (the job on stdin, result lines on fd sandbox.RESULT_FD)

The job (JSON, built by isolate.py) holds everything the child needs, so it never imports autograder.labs
(which a grading sandbox does not have): {"preamble": source, "hidden": [dotted reference names to hide],
"exercises": [{"name", "symbol", "source", "driver": "module:qualname", "stand_ins": {symbol:
"module:qualname"}, "cell_timeout_s", "cases": [{"name", "inputs": <wire text>, "timeout_s"}]}]}. Drivers and
stand-ins live in autograder.harness (or reference), which the sandbox's redacted view has.

On Linux each exercise runs in a forked process of its own, so an exercise that exits, crashes or breaks
the interpreter (monkeypatching torch, say) costs only its own points. In that process, in a fresh namespace: the
preamble, the exercise's stand-ins, its cell, then each case's driver call.

One JSON line per case: {"exercise", "case", "status", "result" (wire text) or "message"}. Lines with an empty
"case" are notes about the exercise: status "process" (how its process ended, written after it ended, which
explains any case without a line) or "hidden reference" (it tried to use a hidden reference symbol).

Everything this process writes is untrusted by the parent: it decodes the lines with the safe codec, compares the
results itself, and treats missing lines as a crash or a timeout. This module only has to be honest when the
learner's code is; isolation, limits and clean-up are the sandbox's business (sandbox.py, warden.py).
"""

from __future__ import annotations

import importlib
import json
import os
import signal
import sys
import time

_exit = os._exit  # kept before any learner code can replace it
SLACK_S = 5.0  # beyond an exercise's own limits, before its process is stopped
RESULT_FD = 3  # sandbox.RESULT_FD (not imported: this module stays small and self-contained)
MAX_JOB_BYTES = 512 * 1024 * 1024
# A process per exercise on Linux; elsewhere forking after importing torch is unsafe (macOS) or impossible.
FORK_PER_EXERCISE = sys.platform.startswith("linux")


def main() -> int:
    job = json.loads(sys.stdin.buffer.read(MAX_JOB_BYTES))
    out = os.fdopen(RESULT_FD, "w", encoding="utf-8")
    os.set_inheritable(RESULT_FD, False)

    import torch

    torch.set_num_threads(1)  # graders run many children side by side

    from .hiding import HiddenImports

    guard = HiddenImports(job.get("hidden", []))

    def report(exercise: str, case: str, status: str, **fields) -> None:
        out.write(json.dumps({"exercise": exercise, "case": case, "status": status, **fields}) + "\n")
        out.flush()

    for item in job["exercises"]:
        if not FORK_PER_EXERCISE:
            run_exercise(job["preamble"], item, guard, report)
            continue
        limit_s = item["cell_timeout_s"] + sum(case["timeout_s"] for case in item["cases"]) + SLACK_S
        pid = os.fork()
        if pid == 0:
            status = 1
            try:
                run_exercise(job["preamble"], item, guard, report)
                status = 0
            finally:
                _exit(status)
        report(item["name"], "", "process", message=wait_for(pid, limit_s))
    out.close()
    return 0


def resolve(dotted: str):
    """The object named "package.module:Qualified.name"."""
    module_name, _, qualname = dotted.partition(":")
    found = importlib.import_module(module_name)
    for part in qualname.split("."):
        found = getattr(found, part)
    return found


def run_exercise(preamble: str, item: dict, guard, report) -> None:
    """In the exercise's own process: run its cell, then its cases, reporting each."""
    from .runner import CaseTimeout, call_learner, describe_exception, time_limit

    name, symbol = item["name"], item["symbol"]
    namespace: dict = {"__name__": "__exercise__", "__builtins__": guard.builtins()}
    problem, problem_status, obj = None, "error", None
    driver = resolve(item["driver"])
    stand_ins = {key: resolve(value) for key, value in item["stand_ins"].items()}
    try:
        with time_limit(item["cell_timeout_s"]):
            exec(compile(preamble, "<preamble>", "exec"), namespace)
            namespace.update(stand_ins)
            exec(compile(item["source"], f"<exercise:{name}>", "exec"), namespace)
        obj = namespace.get(symbol)
        if obj is None or not callable(obj):
            problem = f"the cell does not define {symbol}"
    except CaseTimeout:
        problem_status = "timeout"
        problem = f"the exercise cell did not finish running within {item['cell_timeout_s']:g} s"
    except BaseException as exc:  # the cell itself failed: syntax error, import error, sys.exit, its time limit...
        problem = f"the exercise cell failed to run: {describe_exception(exc)}"
    for case in item["cases"]:
        if problem is not None:
            report(name, case["name"], problem_status, message=problem)
            continue
        outcome = call_learner(driver, obj, case["inputs"], case["timeout_s"], interruptible=False)
        report(name, case["name"], outcome.status, result=outcome.result_wire, message=outcome.message)
    if guard.attempts:
        report(name, "", "hidden reference", message=", ".join(sorted(set(guard.attempts))))


def wait_for(pid: int, limit_s: float) -> str:
    """Wait for an exercise's process and say how it ended. Stray processes that were re-parented to us (we
    may be the first process of a PID namespace) are reaped on the way."""
    from .warden import wait_reaping  # the warden's loop; imported here, where exercises fork (Linux)

    status, stopped = wait_reaping(pid, time.monotonic() + limit_s, poll_s=0.02)
    if stopped is not None:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        return f"timeout: the exercise was stopped after {limit_s:g} s"
    if os.WIFSIGNALED(status):
        return f"crashed: the exercise's process was killed by signal {os.WTERMSIG(status)}"
    return f"crashed: the exercise's process ended (exit status {os.WEXITSTATUS(status)}) before reporting"


if __name__ == "__main__":
    sys.exit(main())
