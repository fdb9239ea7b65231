"""The warden: a small trusted process that starts one sandboxed command, enforces its limits and cleans up
after it (stdlib only).

    python path/to/autograder/warden.py CONFIG_JSON COMMAND...

It is started as a script, not as `-m autograder.warden`, so it never imports torch or learner-facing code.
CONFIG_JSON (from sandbox.py): {"wall_s", "memory_mb", "processes", "file_mb", "uid", "gid", "verdict_fd",
"result_fd", "result_fd_target"} (the command gets the pipe result_fd as fd result_fd_target).
The isolation itself (namespaces, the read-only redacted view, private tmpfs) is bubblewrap's, which is the
command when sandbox.py chose it; the warden adds what bubblewrap does not do:

1. it becomes a child subreaper, so every process the command starts, even one detached with setsid whose
   parent died, stays below the warden instead of escaping to init;
2. it forks the command's process, which dies with the warden, limits file sizes and core files, drops to an
   unprivileged uid when asked (root only; RLIMIT_NPROC then bounds its processes) and execs the command;
3. every POLL_S it sums the resident memory of all processes below it (proportional share of anonymous and
   shared memory, so pages shared after a fork count once) and counts them: over memory_mb or processes, it
   kills them all. Never an address-space limit: a CUDA build of torch maps about 4 GB just to import;
4. after wall_s seconds it kills them all; at the end it kills every remaining descendant until none is left.

Its verdict is one JSON line on verdict_fd (a pipe the command never sees): {"status": "exited" | "signaled" |
"timeout" | "memory" | "processes" | "setup", "code": int, "peak_mb": float}. The command's output is
passed through unchanged on the warden's stdout and stderr.
"""

from __future__ import annotations

import ctypes
import json
import os
import resource
import signal
import sys
import time

PR_SET_PDEATHSIG, PR_SET_CHILD_SUBREAPER = 1, 36
SETUP_FAILED = 125  # the exit status of the forked process when it could not exec the command
SWEEP_S = 10.0  # the longest the final clean-up keeps hunting descendants
POLL_S = 0.05
LINUX = sys.platform.startswith("linux")  # elsewhere: no subreaper or /proc; limits and the wall clock only
_libc = ctypes.CDLL(None, use_errno=True)


def main(argv: list[str]) -> int:
    config, command = json.loads(argv[0]), argv[1:]
    verdict_fd = config.get("verdict_fd")
    if LINUX:
        _libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    pid = os.fork()
    if pid == 0:
        try:
            _move_fds(config)
            _become_command(config, command)
        except BaseException as exc:
            print(f"warden: cannot start {command[0]} ({exc})", file=sys.stderr, flush=True)
        finally:
            os._exit(SETUP_FAILED)
    if config.get("result_fd") is not None:
        os.close(config["result_fd"])  # the command holds the only writer, so its end is our EOF
    verdict = _watch(pid, config)
    _kill_descendants()
    if verdict_fd is not None:
        os.write(verdict_fd, (json.dumps(verdict) + "\n").encode())
    return 0


def _move_fds(config: dict) -> None:
    """In the forked process: close the verdict pipe, put the results pipe on the fd the command expects."""
    if config.get("verdict_fd") is not None:
        os.close(config["verdict_fd"])
    fd, target = config.get("result_fd"), config.get("result_fd_target")
    if fd is not None and target is not None and fd != target:
        os.dup2(fd, target)
        os.close(fd)


def _become_command(config: dict, command: list[str]) -> None:
    """In the forked process: die with the warden, set limits, drop privileges, exec."""
    if LINUX:
        _libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    mb = 1024 * 1024
    resource.setrlimit(resource.RLIMIT_FSIZE, (config["file_mb"] * mb,) * 2)
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    if os.getuid() == 0 and config.get("uid") is not None:
        # the kernel ignores RLIMIT_NPROC for root, so it is set only once we are someone else
        os.setgroups([])
        os.setgid(config["gid"])
        os.setuid(config["uid"])
        resource.setrlimit(resource.RLIMIT_NPROC, (config["processes"],) * 2)
    os.execv(command[0], command)


def _watch(pid: int, config: dict) -> dict:
    """Wait for the command, enforcing the wall clock, memory and process limits; the verdict."""
    deadline = time.monotonic() + config["wall_s"]
    limit_kb = config["memory_mb"] * 1024
    peak_kb = 0
    while True:
        reaped, status = os.waitpid(-1, os.WNOHANG)
        if reaped == pid:
            break
        if reaped:  # an orphan re-parented to us
            continue
        below = _descendants(os.getpid())
        used_kb = sum(_memory_kb(p) for p in below)
        peak_kb = max(peak_kb, used_kb)
        over = ("memory" if used_kb > limit_kb else "processes" if len(below) > config["processes"] + 2
                else "timeout" if time.monotonic() > deadline else None)  # + 2: bubblewrap's own processes
        if over:
            _kill_descendants()
            return {"status": over, "code": 0, "peak_mb": round(peak_kb / 1024, 1)}
        time.sleep(POLL_S)
    peak = round(peak_kb / 1024, 1)
    if os.WIFSIGNALED(status):
        return {"status": "signaled", "code": os.WTERMSIG(status), "peak_mb": peak}
    code = os.WEXITSTATUS(status)
    return {"status": "setup" if code == SETUP_FAILED else "exited", "code": code, "peak_mb": peak}


def _memory_kb(pid: int) -> int:
    """Resident memory a process adds: its proportional share of anonymous and shared-memory pages (files it
    merely maps, like libtorch's code, are left out). Falls back to /proc/PID/status, which every user may
    read, when smaps_rollup is closed to us (a process that made itself non-dumpable)."""
    try:
        with open(f"/proc/{pid}/smaps_rollup", "rb") as f:
            fields = dict(line.split(b":", 1) for line in f.read().splitlines() if b":" in line)
        if b"Pss_Anon" in fields:
            return sum(int(fields.get(key, b"0 kB").split()[0]) for key in (b"Pss_Anon", b"Pss_Shmem"))
    except (OSError, ValueError):
        pass
    try:
        with open(f"/proc/{pid}/status", "rb") as f:
            fields = dict(line.split(b":", 1) for line in f.read().splitlines() if b":" in line)
        return sum(int(fields.get(key, b"0 kB").split()[0]) for key in (b"RssAnon", b"RssShmem"))
    except (OSError, ValueError):
        return 0  # it ended while we looked


def _kill_descendants() -> None:
    """Kill every process below the warden, round after round, until a scan finds none (or SWEEP_S passes).

    A subreaper sees all of them as descendants, so setsid or double forks do not help them escape; a storm
    that forks while we kill is caught on the next round."""
    give_up = time.monotonic() + SWEEP_S
    while time.monotonic() < give_up:
        found = _descendants(os.getpid())
        for pid in found:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        _reap()
        if not found:
            return
        time.sleep(0.02)


def _reap() -> None:
    while True:
        try:
            reaped, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if not reaped:
            return


def _descendants(root: int) -> list[int]:
    if not LINUX:
        return []
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                fields = f.read().rsplit(b")", 1)[1].split()
        except (OSError, IndexError):
            continue  # it ended while we looked
        children.setdefault(int(fields[1]), []).append(int(entry))
    found, frontier = [], [root]
    while frontier:
        below = children.get(frontier.pop(), [])
        found += below
        frontier += below
    return found


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
