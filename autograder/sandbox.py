"""Running untrusted code: where it runs, what it sees, what it may use, and the clean-up (parent side).

One `run_sandboxed` call starts the warden (warden.py: limits, clean-up) on a command, feeds the command its
job on stdin, reads its results from a pipe on fd RESULT_FD, keeps only a short tail of its output
(gigabytes of printing cost time, never memory or disk) and returns how it ended. Three modes:

- "bwrap" (what `grade` uses): bubblewrap builds the sandbox. New user, PID, network, IPC, UTS and cgroup
  namespaces (an unprivileged uid inside, no network, no UNIX socket of the host, no way to signal the
  grader), dies with its parent. It sees, read-only, only the Python runtime (its prefixes, sys.path and the
  system's library folders) and a redacted copy of the project (redact.py) mounted over the real packages'
  folders; the project folder itself is masked. /tmp, /dev/shm, /run and the scratch folder are private,
  size-limited tmpfs that vanish with it. When the grader is root and an unprivileged uid can run this
  Python, bubblewrap itself runs as a uid of its own (SANDBOX_UID + n, leased so that concurrent grading runs
  never share one), so the sandbox is unprivileged outside too and RLIMIT_NPROC bounds it.
- "container" (the fallback inside a grading service's container, where namespaces are refused and the
  grader runs as root): the command runs as a leased unprivileged uid with the redacted copy on its path.
  `check_container_mode` first proves that this uid can read neither the real project, nor the hidden tests,
  nor the output folder; files it leaves in /tmp, /var/tmp and /dev/shm are removed after the run.
- "process" (`check`, a learner's self-check of their own code): limits and clean-up only.

In every mode the warden bounds wall time, the resident memory of all the command's processes together (never
address space: a CUDA build of torch maps about 4 GB just to import), the number of processes and file sizes;
where it may create a cgroup v2 with the memory controller, the kernel enforces the memory limit too.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

WARDEN = str(Path(__file__).resolve().parent / "warden.py")
SANDBOX_UID = 61000  # + n: unprivileged uids leased to sandboxes when the grader is root
UID_RANGE = 4096
INSIDE_UID = 1000  # the learner's uid inside a bubblewrap sandbox
RESULT_FD = 3  # the command writes its result lines here
OUTPUT_TAIL = 4096  # bytes of output kept
MAX_RESULTS_BYTES = 256 * 1024 * 1024  # what the parent reads from the results pipe at most
PASS_THROUGH = ("PATH", "LANG", "LC_ALL", "SYSTEMROOT")
SCRATCH = "/scratch"  # the learner code's working directory inside a bubblewrap sandbox
MODES = ("bwrap", "container", "process")
INSTALL_HINT = ("install bubblewrap (Debian/Ubuntu: sudo apt-get install bubblewrap; Fedora: sudo dnf install "
                "bubblewrap) and allow unprivileged user namespaces (sysctl kernel.unprivileged_userns_clone=1; "
                "on Ubuntu 24.04 also kernel.apparmor_restrict_unprivileged_userns=0)")


class SandboxUnavailable(RuntimeError):
    """The machine cannot build the sandbox a command asked for; the message says what to install."""


@dataclass(frozen=True)
class Limits:
    """What one sandboxed run may use. memory_mb: resident memory of all its processes together; processes:
    how many may exist at once; file_mb: the largest file it may write, and the size of each private tmpfs."""

    wall_s: float = 300.0
    memory_mb: int = 4096
    processes: int = 64
    file_mb: int = 256


@dataclass(frozen=True)
class SandboxRun:
    status: str  # exited | signaled | timeout | memory | processes | setup (the warden's verdict)
    code: int  # exit status or signal number
    results: bytes  # what the command wrote on RESULT_FD (at most MAX_RESULTS_BYTES)
    output_tail: str
    output_bytes: int
    peak_mb: float
    mode: str
    memory_by: str = "polling"  # "cgroup" where the kernel itself enforced memory.max (warden.py)

    @property
    def ok(self) -> bool:
        return self.status == "exited" and self.code == 0


@dataclass(frozen=True)
class View:
    """What a bwrap or container sandbox sees of the project: `root` holds the redacted packages (redact.py)."""

    root: Path
    masked: tuple[str, ...] = ()  # more host paths the sandbox must not see (hidden tests, the output folder)


# -- choosing a mode ------------------------------------------------------------------------------------------


def bwrap_problem() -> str:
    """"" when bubblewrap can build our sandbox here, else why not (with what to do)."""
    return _bwrap_probe()


@functools.lru_cache(maxsize=None)
def _bwrap_probe() -> str:
    if not sys.platform.startswith("linux"):
        return "bubblewrap sandboxes need Linux"
    if shutil.which("bwrap") is None:
        return "bubblewrap (bwrap) is not installed"
    probe = subprocess.run(["bwrap", *_namespace_args(), "--ro-bind", "/", "/", "--proc", "/proc", "--dev", "/dev",
                            "true"], capture_output=True, text=True, timeout=30)
    if probe.returncode != 0:
        return f"bubblewrap cannot create namespaces here ({probe.stderr.strip()[:200]})"
    return ""


def in_container() -> bool:
    """Whether we run inside a container (Docker, Podman, Kubernetes, LXC), as grading services do."""
    if os.path.exists("/.dockerenv") or os.path.exists("/run/.containerenv"):
        return True
    try:
        with open("/proc/1/cgroup", encoding="utf-8", errors="replace") as f:
            text = f.read()
    except OSError:
        return False
    return any(word in text for word in ("docker", "kubepods", "containerd", "lxc", "podman"))


def choose_mode(requested: str = "auto") -> str:
    """The mode `grade` runs in: bwrap when it works; inside a container, as root, "container" when bubblewrap
    cannot start; otherwise SandboxUnavailable (grading without isolation is refused)."""
    if requested not in ("auto", "bwrap", "container"):
        raise ValueError(f"unknown sandbox {requested!r}: choose auto, bwrap or container")
    problem = bwrap_problem()
    if requested == "bwrap" or (requested == "auto" and not problem):
        if problem:
            raise SandboxUnavailable(f"{problem}; {INSTALL_HINT}")
        return "bwrap"
    root = hasattr(os, "geteuid") and os.geteuid() == 0
    if requested == "container" or (root and in_container()):
        if not root:
            raise SandboxUnavailable("the container sandbox needs the grader to run as root (it switches to an "
                                     f"unprivileged uid); otherwise {INSTALL_HINT}")
        if not can_drop_to_sandbox_uid():
            raise SandboxUnavailable(f"an unprivileged uid cannot run {sys.executable} and import torch: install "
                                     "the course where every user can read it (e.g. a venv under /opt)")
        return "container"
    raise SandboxUnavailable(f"grading runs student code only inside a sandbox: {problem}; {INSTALL_HINT}")


@functools.lru_cache(maxsize=None)
def can_drop_to_sandbox_uid() -> bool:
    """Whether we are root and an unprivileged uid can start this Python and import torch (found by trying)."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return False
    with lease_uid() as uid:
        run = run_sandboxed([sys.executable, "-c", "import torch"], {"PATH": os.environ.get("PATH", "")},
                            Limits(wall_s=120, memory_mb=8192), "process", uid=uid, cwd="/")
    return run.ok


def check_container_mode(protected: list[str]) -> None:
    """Raise SandboxUnavailable unless the sandbox uid can read none of `protected` (the real project, the
    hidden tests, the output folder): without namespaces, file permissions are the only wall."""
    script = ("import os, sys\nopen_ = [p for p in sys.argv[1:] if os.access(p, os.R_OK) or "
              "(os.path.isdir(p) and os.access(p, os.X_OK))]\nprint('\\n'.join(open_))")
    with lease_uid() as uid:
        run = run_sandboxed([sys.executable, "-c", script, *protected], {"PATH": os.environ.get("PATH", "")},
                            Limits(wall_s=60), "process", uid=uid, cwd="/", keep_output=True)
    readable = [line for line in run.output_tail.splitlines() if line in protected]
    if not run.ok or readable:
        raise SandboxUnavailable("container sandbox: an unprivileged uid can read "
                                 f"{', '.join(readable) or 'the protected paths'}; make them readable by their "
                                 "owner only (chmod -R go-rwx ...) before grading")


# -- running --------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def lease_uid():
    """An unprivileged uid that no other sandbox of any grading run on this machine uses meanwhile (root only;
    yields None otherwise). Leases are flock()s on files in a root-owned folder."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        yield None
        return
    folder = Path("/run/autograder-uids") if os.access("/run", os.W_OK) else Path(tempfile.gettempdir(), "autograder-uids")
    folder.mkdir(mode=0o700, exist_ok=True)
    info = os.lstat(folder)
    if info.st_uid != 0 or not os.path.isdir(folder) or os.path.islink(folder):
        raise SandboxUnavailable(f"{folder} is not a folder owned by root; remove it")
    for number in range(UID_RANGE):
        fd = os.open(folder / f"{SANDBOX_UID + number}.lock", os.O_CREAT | os.O_RDWR | os.O_NOFOLLOW, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            continue
        try:
            yield SANDBOX_UID + number
        finally:
            os.close(fd)
        return
    raise SandboxUnavailable(f"all {UID_RANGE} sandbox uids are in use")


def run_sandboxed(command: list[str], env: dict[str, str], limits: Limits, mode: str, *, stdin: bytes = b"",
                  view: View | None = None, uid: int | None = None, cwd: str | None = None,
                  keep_output: bool = False) -> SandboxRun:
    """Run `command` in `mode`, confined by `limits`; never raises for anything the command does.

    bwrap: `command` runs inside bubblewrap over `view`, in SCRATCH; uid (root only) runs bubblewrap itself as
    that uid. container: runs as `uid` in a fresh scratch folder owned by it. process: runs as is, in `cwd` or a
    fresh scratch folder. env: the command's whole environment (see sandbox_env)."""
    if mode not in MODES:
        raise ValueError(f"unknown sandbox mode {mode!r}")
    scratch = None
    if mode == "bwrap":
        command = bwrap_command(command, view, limits)
        cwd = "/"
    elif cwd is None:
        scratch = tempfile.mkdtemp(prefix="autograder-scratch-")
        if uid is not None:
            os.chown(scratch, uid, uid)
        cwd = scratch
        env = {**env, "HOME": scratch, "TMPDIR": scratch}
    if mode == "container" and view is not None:
        env = {**env, "PYTHONPATH": str(view.root)}
    verdict_read, verdict_write = os.pipe()
    results_read, results_write = os.pipe()
    config = {"wall_s": limits.wall_s, "memory_mb": limits.memory_mb, "processes": limits.processes,
              "file_mb": limits.file_mb, "uid": uid, "gid": uid, "verdict_fd": verdict_write,
              "result_fd": results_write, "result_fd_target": RESULT_FD}
    try:
        process = subprocess.Popen(
            [sys.executable, "-I", WARDEN, json.dumps(config), *command], cwd=cwd, env=env,
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
            pass_fds=(verdict_write, results_write))
    finally:
        os.close(verdict_write)
        os.close(results_write)
    feed = threading.Thread(target=_feed, args=(process.stdin, stdin), daemon=True)
    feed.start()
    output = _Drain(process.stdout, OUTPUT_TAIL if not keep_output else 1 << 20)
    results = _Drain(os.fdopen(results_read, "rb"), MAX_RESULTS_BYTES, keep_head=True)
    try:  # the warden enforces wall_s itself; this is the backstop should it be stuck
        process.wait(timeout=limits.wall_s + 60)
    except subprocess.TimeoutExpired:
        pass
    _kill_group(process.pid)
    process.wait()
    output.join(10.0)
    results.join(10.0)
    with os.fdopen(verdict_read, "rb") as f:
        line = f.readline(4096)
    try:
        verdict = json.loads(line)
    except ValueError:
        verdict = {"status": "timeout" if process.returncode < 0 else "setup", "code": process.returncode,
                   "peak_mb": 0.0}
    if scratch is not None:
        shutil.rmtree(scratch, ignore_errors=True)
    if mode == "container" and uid is not None:
        remove_files_of(uid)
    return SandboxRun(verdict["status"], int(verdict["code"]), results.data(), output.tail(), output.total,
                      float(verdict.get("peak_mb", 0.0)), mode, verdict.get("memory_by", "polling"))


def sandbox_env(python_path: list[str], **extra: str) -> dict[str, str]:
    """A minimal environment: nothing from the grader's own (tokens, keys) reaches learner code."""
    env = {name: os.environ[name] for name in PASS_THROUGH if name in os.environ}
    env.update(HOME=SCRATCH, TMPDIR="/tmp", PYTHONPATH=os.pathsep.join(python_path), PYTHONDONTWRITEBYTECODE="1",
               PYTHONNOUSERSITE="1", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1",
               CUDA_VISIBLE_DEVICES="", PYTHONHASHSEED="0", **extra)
    return env


def remove_files_of(uid: int) -> None:
    """After a container-mode run: remove what the uid left in the world-writable folders."""
    for folder in ("/tmp", "/var/tmp", "/dev/shm"):
        with contextlib.suppress(OSError):
            for entry in os.scandir(folder):
                with contextlib.suppress(OSError):
                    if entry.stat(follow_symlinks=False).st_uid != uid:
                        continue
                    if entry.is_dir(follow_symlinks=False):
                        shutil.rmtree(entry.path, ignore_errors=True)
                    else:
                        os.unlink(entry.path)


# -- the bubblewrap command line ------------------------------------------------------------------------------


def _namespace_args() -> list[str]:
    args = ["--unshare-all", "--unshare-user", "--disable-userns", "--die-with-parent", "--new-session",
            "--uid", str(INSIDE_UID), "--gid", str(INSIDE_UID), "--hostname", "sandbox", "--cap-drop", "ALL"]
    return args


def package_dirs() -> dict[str, str]:
    """Where `reference` and `autograder` really live (a checkout or site-packages)."""
    import importlib.util

    found = {}
    for name in ("reference", "autograder"):
        spec = importlib.util.find_spec(name)
        if spec is None or not spec.submodule_search_locations:
            raise SandboxUnavailable(f"cannot find the package {name}")
        found[name] = str(Path(list(spec.submodule_search_locations)[0]).resolve())
    return found


def project_paths() -> list[str]:
    """What a sandbox must never read of the project: the real packages and, for a checkout, its folder (the
    solution notebooks, the history)."""
    packages = list(package_dirs().values())
    checkouts = {str(Path(p).parent) for p in packages if (Path(p).parent / "pyproject.toml").is_file()}
    return sorted(set(packages) | checkouts)


def runtime_paths(hidden: list[str]) -> list[str]:
    """Host folders the sandbox needs read-only to run Python: the interpreter's prefixes and the sys.path
    entries inside them, minus anything that would show a folder in `hidden` (the project, hidden tests...)."""
    prefixes = {os.path.realpath(p) for p in (sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix)}
    paths = []
    for path in [*sorted(prefixes), *[os.path.realpath(p) for p in sys.path if p]]:
        if not os.path.isdir(path) or path in paths or path == "/":
            continue
        if not any(_inside(path, prefix) for prefix in prefixes):
            continue  # the current folder, PYTHONPATH: not the runtime
        if any(_inside(secret, path) for secret in hidden):
            continue  # e.g. the project root on sys.path: it would show everything
        paths.append(path)
    return paths


def bwrap_command(command: list[str], view: View | None, limits: Limits) -> list[str]:
    """The bwrap argument list that runs `command` over `view` (see the module docstring)."""
    if view is None:
        raise ValueError("a bwrap sandbox needs a View")
    packages = package_dirs()
    hidden = [p for p in project_paths() if p not in packages.values()] + list(view.masked)  # packages: overlaid
    size = str(limits.file_mb * 1024 * 1024)
    mounts: list[tuple[str, list[str]]] = []  # (destination, arguments); applied shallowest first
    for top in ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32"):
        if os.path.islink(top):
            mounts.append((top, ["--symlink", os.readlink(top), top]))
        elif os.path.isdir(top):
            mounts.append((top, ["--ro-bind", top, top]))
    for path in ("/etc/ld.so.cache", "/etc/ld.so.conf", "/etc/ld.so.conf.d", "/etc/localtime", "/etc/alternatives"):
        if os.path.exists(path):
            mounts.append((path, ["--ro-bind", path, path]))
    for name in ("passwd", "group"):
        mounts.append((f"/etc/{name}", ["--ro-bind", str(view.root / "etc" / name), f"/etc/{name}"]))
    for path in runtime_paths(hidden):
        if not any(path == top or path.startswith(top + "/") for top in ("/usr", "/bin", "/lib", "/lib64")):
            mounts.append((path, ["--ro-bind", path, path]))
    for secret in hidden:  # a folder inside a bound one (a venv inside the project, say): masked by a tmpfs
        if any(_inside(secret, dest) for dest, _ in mounts):
            mounts.append((secret, ["--tmpfs", secret, "--remount-ro", secret]))
    for name, real in packages.items():
        mounts.append((real, ["--ro-bind", str(view.root / name), real]))
    mounts.append(("/grading", ["--ro-bind", str(view.root), "/grading"]))
    for folder in ("/tmp", "/dev/shm", "/run", SCRATCH):
        mounts.append((folder, ["--size", size, "--tmpfs", folder]))
    mounts.sort(key=lambda item: item[0].rstrip("/").count("/"))
    args = ["bwrap", *_namespace_args(), "--proc", "/proc", "--dev", "/dev"]
    for _, mount_args in mounts:
        args += mount_args
    args += ["--remount-ro", "/dev", "--remount-ro", "/"]  # only the sized tmpfs mounts stay writable
    args += ["--chdir", SCRATCH]
    return [shutil.which("bwrap") or "bwrap", *args[1:], *command]


def write_identity(root: Path) -> None:
    """The sandbox's /etc/passwd and /etc/group: only its own user (getpass and torch look it up)."""
    etc = root / "etc"
    etc.mkdir(exist_ok=True)
    (etc / "passwd").write_text(f"learner:x:{INSIDE_UID}:{INSIDE_UID}:learner:{SCRATCH}:/bin/sh\n")
    (etc / "group").write_text(f"learner:x:{INSIDE_UID}:\n")


def _inside(path: str, folder: str) -> bool:
    """Whether `path` is `folder` or lies below it."""
    path, folder = path.rstrip("/") or "/", folder.rstrip("/") or "/"
    return path == folder or path.startswith(folder + "/") or folder == "/"


# -- plumbing -------------------------------------------------------------------------------------------------


def _feed(pipe, data: bytes) -> None:
    with contextlib.suppress(OSError):
        pipe.write(data)
    with contextlib.suppress(OSError):
        pipe.close()


def _kill_group(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)


class _Drain(threading.Thread):
    """Reads a pipe to its end, counting bytes and keeping the last (or first) `keep` of them."""

    def __init__(self, pipe, keep: int, keep_head: bool = False) -> None:
        super().__init__(daemon=True)
        self.pipe, self.keep, self.keep_head, self.total = pipe, keep, keep_head, 0
        self._chunks: list[bytes] = []
        self._kept = 0
        self.start()

    def run(self) -> None:
        fd = self.pipe.fileno()
        while chunk := os.read(fd, 1 << 16):
            self.total += len(chunk)
            if self.keep_head:
                if self._kept < self.keep:
                    self._chunks.append(chunk[: self.keep - self._kept])
                    self._kept += len(self._chunks[-1])
            else:
                self._chunks = [(b"".join(self._chunks) + chunk)[-self.keep:]]
        self.pipe.close()

    def data(self) -> bytes:
        return b"".join(self._chunks)

    def tail(self) -> str:
        return self.data().decode("utf-8", errors="replace")

