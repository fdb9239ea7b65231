"""The warden: a small trusted process that confines one child run and cleans up after it (stdlib only).

    python path/to/autograder/warden.py CONFIG_JSON COMMAND...

It is started as a script, not as `-m autograder.warden`, so it never imports torch or learner-facing code.
CONFIG_JSON (from sandbox.py): {"wall_s", "memory_mb", "processes", "file_mb", "cwd", "uid", "gid", "mode"}.

What it does, in order:
1. becomes a child subreaper, so every process the command starts, even one detached with setsid whose
   parent died, is re-parented to the warden instead of escaping to init;
2. mode "namespaces": new network and PID namespaces (no network; killing the namespace's first process kills
   them all); "user-namespaces": the same inside a new user namespace (unprivileged users); "none": neither;
3. forks the command's process, which sets its own limits (address space, file size, no core files, process
   count where the kernel enforces it), mounts a /proc that shows only its own PID namespace, moves to the
   scratch directory, drops to an unprivileged uid (root only) and execs the command;
4. waits up to wall_s seconds, then kills it, then kills every remaining descendant until none is left.

Exit status: the command's own (0-255), 128 + N when a signal N ended it, TIMED_OUT when the wall-clock limit
did, SETUP_FAILED when the sandbox could not be built. Output is the command's stdout and stderr, unchanged.
"""

from __future__ import annotations

import ctypes
import json
import os
import resource
import signal
import sys
import time

CLONE_NEWNS, CLONE_NEWUSER, CLONE_NEWPID, CLONE_NEWNET = 0x00020000, 0x10000000, 0x20000000, 0x40000000
MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REC, MS_PRIVATE = 0x2, 0x4, 0x8, 0x4000, 0x40000
PR_SET_PDEATHSIG, PR_SET_CHILD_SUBREAPER = 1, 36
TIMED_OUT, SETUP_FAILED = 124, 125
SWEEP_S = 10.0  # the longest the final clean-up keeps hunting descendants
POLL_S = 0.02

_libc = ctypes.CDLL(None, use_errno=True)
LINUX = sys.platform.startswith("linux")  # elsewhere: no subreaper, namespaces or /proc; limits and killpg only


def main(argv: list[str]) -> int:
    config, command = json.loads(argv[0]), argv[1:]
    if LINUX:
        _libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    try:
        _enter_namespaces(config["mode"])
    except OSError as exc:
        print(f"warden: cannot build the sandbox ({exc})", file=sys.stderr, flush=True)
        return SETUP_FAILED
    deadline = time.monotonic() + config["wall_s"]
    pid = os.fork()
    if pid == 0:
        try:
            _become_command(config, command)
        except BaseException as exc:
            print(f"warden: cannot start {command[0]} ({exc})", file=sys.stderr, flush=True)
        finally:
            os._exit(SETUP_FAILED)
    status = _wait(pid, deadline)
    _kill_descendants()
    if status is None:
        return TIMED_OUT
    return 128 + os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)


def _enter_namespaces(mode: str) -> None:
    if mode == "none":
        return
    flags = CLONE_NEWNET | CLONE_NEWPID | (CLONE_NEWUSER if mode == "user-namespaces" else 0)
    uid, gid = os.getuid(), os.getgid()
    if _libc.unshare(flags) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, os.strerror(errno))
    if mode == "user-namespaces":  # map our own ids into the new user namespace, or files could not be created
        for path, text in (("setgroups", "deny"), ("uid_map", f"{uid} {uid} 1"), ("gid_map", f"{gid} {gid} 1")):
            with open(f"/proc/self/{path}", "w") as f:
                f.write(text)


def _become_command(config: dict, command: list[str]) -> None:
    """In the forked process: die with the warden, set limits, drop privileges, exec."""
    if LINUX:
        _libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if config["mode"] != "none":
        _own_proc()
    mb = 1024 * 1024
    try:
        resource.setrlimit(resource.RLIMIT_AS, (config["memory_mb"] * mb,) * 2)
    except (ValueError, OSError):  # macOS refuses address-space limits
        pass
    resource.setrlimit(resource.RLIMIT_FSIZE, (config["file_mb"] * mb,) * 2)
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    os.chdir(config["cwd"])
    if os.getuid() == 0 and config.get("uid") is not None:
        # the kernel ignores RLIMIT_NPROC for root, so it is set only once we are someone else
        os.setgroups([])
        os.setgid(config["gid"])
        os.setuid(config["uid"])
        resource.setrlimit(resource.RLIMIT_NPROC, (config["processes"],) * 2)
    os.execv(command[0], command)


def _own_proc() -> None:
    """A private mount namespace with a /proc of the new PID namespace only, so the command cannot read the
    command lines or environments of processes outside it. Best effort: without it the rest still holds."""
    if _libc.unshare(CLONE_NEWNS) != 0:
        return
    if _libc.mount(None, b"/", None, MS_REC | MS_PRIVATE, None) == 0:
        _libc.mount(b"proc", b"/proc", b"proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, None)


def _wait(pid: int, deadline: float) -> int | None:
    """The command's wait status, or None when the deadline came first (it is then killed). Orphans that were
    re-parented to us are reaped along the way."""
    while True:
        reaped, status = os.waitpid(-1, os.WNOHANG)
        if reaped == pid:
            return status
        if reaped:
            continue
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            return None
        time.sleep(POLL_S)


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
        time.sleep(POLL_S)


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
