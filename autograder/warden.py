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
3. where it can create one (root on a machine whose cgroup v2 hierarchy has the memory controller), it puts
   the command in a cgroup of its own: memory.max = memory_mb and no swap, so the kernel itself stops a
   submission that allocates faster than any polling sees, and pids.max bounds its processes;
4. every POLL_S it sums the resident memory of all processes below it (proportional share of anonymous and
   shared memory, so pages shared after a fork count once) and counts them: over memory_mb or processes, it
   kills them all. Never an address-space limit: a CUDA build of torch maps about 4 GB just to import;
5. after wall_s seconds it kills them all; at the end it kills every remaining descendant until none is left,
   and removes its cgroup.

Its verdict is one JSON line on verdict_fd (a pipe the command never sees): {"status": "exited" | "signaled" |
"timeout" | "memory" | "processes" | "setup", "code": int, "peak_mb": float, "memory_by": "cgroup" | "polling"}.
The command's output is passed through unchanged on the warden's stdout and stderr.
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
    group = Cgroup.create(config["memory_mb"], config["processes"]) if config.get("cgroup", True) else None
    go_read, go_write = os.pipe()  # the command waits on it until it is inside its cgroup
    pid = os.fork()
    if pid == 0:
        try:
            os.close(go_write)
            os.read(go_read, 1)
            _move_fds(config)
            _become_command(config, command)
        except BaseException as exc:
            print(f"warden: cannot start {command[0]} ({exc})", file=sys.stderr, flush=True)
        finally:
            os._exit(SETUP_FAILED)
    os.close(go_read)
    if group is not None and not group.take(pid):
        group = None
    os.write(go_write, b"g")
    os.close(go_write)
    if config.get("result_fd") is not None:
        os.close(config["result_fd"])  # the command holds the only writer, so its end is our EOF
    verdict = _watch(pid, config, group)
    _kill_descendants(group)
    if group is not None:
        group.remove()
    verdict["memory_by"] = "cgroup" if group is not None else "polling"
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


def wait_reaping(pid: int, deadline: float, stop_reason=None, poll_s: float = POLL_S) -> tuple[int | None, str | None]:
    """Wait for process `pid` to end, reaping any other child on the way (orphans re-parented to us: we are a
    subreaper, or the first process of a PID namespace). Every poll_s, `stop_reason()` may name a reason to stop
    waiting; past `deadline` (time.monotonic()) the reason is "timeout".

    Returns (pid's wait status, None) once it ended, or (None, reason) when we stopped waiting (pid still runs:
    the caller kills it). Shared by the warden and autograder/child.py, whose exercise processes it waits for."""
    while True:
        reaped, status = os.waitpid(-1, os.WNOHANG)
        if reaped == pid:
            return status, None
        if reaped:
            continue
        reason = stop_reason() if stop_reason is not None else None
        if reason is None and time.monotonic() > deadline:
            reason = "timeout"
        if reason is not None:
            return None, reason
        time.sleep(poll_s)


def _watch(pid: int, config: dict, group: Cgroup | None) -> dict:
    """Wait for the command, enforcing the wall clock, memory and process limits; the verdict."""
    limit_kb = config["memory_mb"] * 1024
    peak_kb = 0

    def over_limit() -> str | None:
        nonlocal peak_kb
        below = _descendants(os.getpid())
        used_kb = sum(_memory_kb(p) for p in below)
        peak_kb = max(peak_kb, used_kb)
        if used_kb > limit_kb or (group and group.out_of_memory()):
            return "memory"
        return "processes" if len(below) > config["processes"] + 2 else None  # + 2: bubblewrap's own processes

    status, stopped = wait_reaping(pid, time.monotonic() + config["wall_s"], over_limit)
    peak = round(peak_kb / 1024, 1)
    if stopped is not None:
        _kill_descendants(group)
        return {"status": stopped, "code": 0, "peak_mb": peak}
    if group is not None and group.out_of_memory():  # the kernel killed it at memory.max between two polls
        return {"status": "memory", "code": 0, "peak_mb": max(peak, float(config["memory_mb"]))}
    if group is not None and group.hit_process_limit() and not (os.WIFEXITED(status) and status == 0):
        return {"status": "processes", "code": 0, "peak_mb": peak}
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


def _kill_descendants(group: Cgroup | None = None) -> None:
    """Kill every process below the warden, round after round, until a scan finds none (or SWEEP_S passes).

    A subreaper sees all of them as descendants, so setsid or double forks do not help them escape; a storm
    that forks while we kill is caught on the next round. A cgroup is killed whole by the kernel first."""
    if group is not None:
        group.kill()
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


class Cgroup:
    """A cgroup v2 of the command's own, with memory.max and pids.max. Made only where the kernel lets us: the
    cgroup2 hierarchy is mounted, has the memory controller, and we may create a child under our own cgroup or
    under the hierarchy's root (root in a VM or container of its own). Elsewhere `create` returns None and the
    limits rest on polling alone."""

    def __init__(self, path: str) -> None:
        self.path = path

    @classmethod
    def create(cls, memory_mb: int, processes: int) -> Cgroup | None:
        for parent in _cgroup_parents():
            path = os.path.join(parent, f"autograder-{os.getpid()}")
            try:
                _enable_controllers(parent)
                os.mkdir(path)
            except OSError:
                continue
            group = cls(path)
            try:
                group._write("memory.max", str(memory_mb << 20))
                group._write("memory.oom.group", "1")  # an OOM kill takes the whole submission, not one thread
                group._write("memory.swap.max", "0", optional=True)  # swapping out would dodge memory.max
                group._write("pids.max", str(processes + 3), optional=True)  # + bubblewrap's and our fork
                return group
            except OSError:
                group.remove()
        return None

    def take(self, pid: int) -> bool:
        try:
            self._write("cgroup.procs", str(pid))
            return True
        except OSError:
            self.remove()
            return False

    def out_of_memory(self) -> bool:
        return self._event("memory.events", "oom_kill") > 0

    def hit_process_limit(self) -> bool:
        return self._event("pids.events", "max") > 0

    def kill(self) -> None:
        try:
            self._write("cgroup.kill", "1")  # Linux 5.14+; older kernels: the /proc sweep does it
        except OSError:
            pass

    def remove(self) -> None:
        give_up = time.monotonic() + SWEEP_S
        while True:
            try:
                os.rmdir(self.path)  # succeeds once its last process is gone
                return
            except FileNotFoundError:
                return
            except OSError:
                if time.monotonic() > give_up:
                    return
                _reap()
                time.sleep(0.02)

    def _write(self, name: str, value: str, optional: bool = False) -> None:
        if optional and not os.path.exists(os.path.join(self.path, name)):
            return
        with open(os.path.join(self.path, name), "w") as f:
            f.write(value)

    def _event(self, name: str, key: str) -> int:
        try:
            with open(os.path.join(self.path, name)) as f:
                counts = dict(line.split() for line in f if line.strip())
            return int(counts.get(key, 0))
        except (OSError, ValueError):
            return 0


def _cgroup_parents() -> list[str]:
    """Where a child cgroup may be made: our own cgroup, then the root of the cgroup2 mount."""
    if not LINUX:
        return []
    try:
        with open("/proc/self/mountinfo") as f:
            mounts = [line.split(" - ")[0].split() for line in f if " - cgroup2 " in line]
        with open("/proc/self/cgroup") as f:
            own = next((line[3:].strip() for line in f if line.startswith("0::")), None)
    except OSError:
        return []
    if not mounts or own is None:
        return []
    mount_root, mount_point = mounts[0][3], mounts[0][4]
    parents = []
    relative = os.path.relpath(own, mount_root)
    if not relative.startswith(".."):
        parents.append(os.path.normpath(os.path.join(mount_point, relative)))
    return parents + [mount_point] if mount_point not in parents else parents


def _enable_controllers(parent: str) -> None:
    """Make sure children of `parent` get the memory controller (and pids, where there is one)."""
    with open(os.path.join(parent, "cgroup.subtree_control")) as f:
        enabled = f.read().split()
    if "memory" not in enabled:
        with open(os.path.join(parent, "cgroup.subtree_control"), "w") as f:
            f.write("+memory")  # refused (EBUSY) where `parent` itself holds processes and is not the root
    if "pids" not in enabled:
        try:
            with open(os.path.join(parent, "cgroup.subtree_control"), "w") as f:
                f.write("+pids")
        except OSError:
            pass


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
