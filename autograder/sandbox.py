"""Running untrusted code: limits, a scratch directory, a minimal environment, capped output, and clean-up.

The parent side of the isolation; warden.py is the process that enforces it. One `run_sandboxed` call starts
the warden (its own session) on a command, drains the command's output through a pipe keeping only a short
tail (gigabytes of printing cost time, never memory or disk), and returns how it ended.

How strong the sandbox is depends on the machine, and `isolation_mode()` says which applies:
- "namespaces" (root, namespaces allowed) or "user-namespaces" (unprivileged user namespaces allowed): no
  network, and a PID namespace whose processes all die with its first one;
- "none": limits and the warden's clean-up only; the network stays reachable.
When the grader runs as root (Gradescope does) and an unprivileged uid can run this Python and import torch
and the autograder (`drops_privileges()`; not when Python lives under a private /root), the command also runs
as an unprivileged uid of its own (SANDBOX_UID + slot): it cannot write the grader's files or the output
folder, and RLIMIT_NPROC bounds its processes. Otherwise it runs as the grader's own user, and only the
namespaces keep it from signalling the grader. In every mode processes are found by ancestry (the warden is a
subreaper) and, as a last resort, `kill_marked` kills anything carrying the run's environment marker.
"""

from __future__ import annotations

import functools
import json
import os
import signal
import subprocess
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

WARDEN = str(Path(__file__).resolve().parent / "warden.py")
SANDBOX_UID = 61000  # + slot: one unprivileged uid per parallel run (when drops_privileges())
MARKER = "AUTOGRADER_SANDBOX"  # environment variable naming the grading run a process belongs to
TIMED_OUT, SETUP_FAILED = 124, 125  # the warden's exit statuses
OUTPUT_TAIL = 4096  # bytes of output kept
PASS_THROUGH = ("PATH", "LANG", "LC_ALL", "LD_LIBRARY_PATH", "CONDA_PREFIX", "VIRTUAL_ENV", "SYSTEMROOT")


@dataclass(frozen=True)
class Limits:
    """What one child run may use. memory_mb limits address space (RLIMIT_AS), which is larger than resident
    memory (a child that imports torch maps several hundred MB before doing anything). processes (RLIMIT_NPROC,
    threads included) is enforced only when the command runs as the sandbox uid."""

    wall_s: float = 300.0
    memory_mb: int = 4096
    processes: int = 64
    file_mb: int = 256
    mode: str | None = None  # None: isolation_mode(); "none" forces the weakest (for tests of the clean-up)


@dataclass(frozen=True)
class SandboxRun:
    exit_status: int  # the warden's
    output_tail: str
    output_bytes: int
    mode: str

    @property
    def timed_out(self) -> bool:
        return self.exit_status == TIMED_OUT


@functools.lru_cache(maxsize=None)
def isolation_mode() -> str:
    """The strongest mode this machine allows, found by trying it once."""
    if not sys.platform.startswith("linux"):
        return "none"
    for mode in ("namespaces", "user-namespaces"):
        config = _config(Limits(wall_s=10.0, mode=mode), "/", mode, uid=None)
        probe = subprocess.run([sys.executable, WARDEN, json.dumps(config), "/bin/sh", "-c", "exit 0"],
                               capture_output=True, timeout=30)
        if probe.returncode == 0:
            return mode
    return "none"


@functools.lru_cache(maxsize=None)
def drops_privileges() -> bool:
    """Whether commands run as an unprivileged uid: we are root and that uid can start Python and find the
    packages a child imports (found by trying)."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return False
    config = _config(Limits(wall_s=30.0), "/", "none", uid=SANDBOX_UID)
    find = "import importlib.util as u, sys; sys.exit(0 if u.find_spec('torch') and u.find_spec('autograder') else 1)"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    probe = subprocess.run([sys.executable, WARDEN, json.dumps(config), sys.executable, "-c", find],
                           capture_output=True, timeout=60, env=env)
    return probe.returncode == 0


def sandbox_env(scratch: str, token: str, python_path: list[str]) -> dict[str, str]:
    """A minimal environment: nothing from the grader's own (tokens, keys) leaks into learner code."""
    env = {name: os.environ[name] for name in PASS_THROUGH if name in os.environ}
    env.update(HOME=scratch, TMPDIR=scratch, PYTHONPATH=os.pathsep.join(python_path), PYTHONDONTWRITEBYTECODE="1",
               PYTHONNOUSERSITE="1", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1",
               **{MARKER: token})
    return env


def prepare_scratch(scratch: str, writable: list[str], slot: int) -> None:
    """Hand the scratch directory and the files the command writes to the sandbox uid."""
    if not drops_privileges():
        return
    for path in [scratch, *writable]:
        os.chown(path, SANDBOX_UID + slot, SANDBOX_UID + slot)


def run_sandboxed(command: list[str], scratch: str, env: dict[str, str], limits: Limits, slot: int = 0) -> SandboxRun:
    """Run `command` confined by `limits` in `scratch`; never raises for anything the command does."""
    mode = limits.mode or isolation_mode()
    config = _config(limits, scratch, mode, SANDBOX_UID + slot if drops_privileges() else None)
    process = subprocess.Popen([sys.executable, WARDEN, json.dumps(config), *command], cwd=scratch, env=env,
                               stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               start_new_session=True)
    drain = _Drain(process.stdout)
    try:  # the warden enforces wall_s itself; this is the backstop should it be stuck
        process.wait(timeout=limits.wall_s + 30)
    except subprocess.TimeoutExpired:
        _kill_group(process.pid)
        process.wait()
    _kill_group(process.pid)
    drain.join(5.0)
    return SandboxRun(process.returncode, drain.tail(), drain.total, mode)


def kill_marked(token: str) -> int:
    """Kill every process whose environment carries this run's marker; the number killed."""
    needle = f"{MARKER}={token}".encode()
    killed = 0
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as f:
                marked = needle in f.read().split(b"\0")
        except OSError:
            continue
        if marked:
            try:
                os.kill(int(entry), signal.SIGKILL)
                killed += 1
            except ProcessLookupError:
                pass
    return killed


def _config(limits: Limits, scratch: str, mode: str, uid: int | None) -> dict:
    return {"wall_s": limits.wall_s, "memory_mb": limits.memory_mb, "processes": limits.processes,
            "file_mb": limits.file_mb, "cwd": scratch, "mode": mode, "uid": uid, "gid": uid}


def _kill_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


class _Drain(threading.Thread):
    """Reads a pipe to its end, counting bytes and keeping only the last OUTPUT_TAIL of them."""

    def __init__(self, pipe) -> None:
        super().__init__(daemon=True)
        self.pipe, self.total, self._tail = pipe, 0, b""
        self.start()

    def run(self) -> None:
        fd = self.pipe.fileno()
        while chunk := os.read(fd, 1 << 16):
            self.total += len(chunk)
            self._tail = (self._tail + chunk)[-OUTPUT_TAIL:]

    def tail(self) -> str:
        return self._tail.decode("utf-8", errors="replace")
