"""The warden's cgroup v2 path: where it may create a cgroup with the memory controller (root on a machine or
VM of its own, as on the GPU machine or a grading service's VM), the kernel enforces memory.max and pids.max.

These tests run only where the warden reports that it used a cgroup (skipped elsewhere, e.g. on a cgroup v1
machine or as an unprivileged user); the polling path, used everywhere else, is tested in
test_sandbox_modes.py. Every limit is checked on what the command did, and on the clean-up."""

from __future__ import annotations

import importlib.util
import os
import sys
import textwrap

import pytest

from autograder import sandbox

WARDEN_SPEC = importlib.util.spec_from_file_location("warden_under_test", sandbox.WARDEN)
warden = importlib.util.module_from_spec(WARDEN_SPEC)
WARDEN_SPEC.loader.exec_module(warden)


def run_python(code: str, memory_mb: int = 300, processes: int = 16) -> sandbox.SandboxRun:
    limits = sandbox.Limits(wall_s=60, memory_mb=memory_mb, processes=processes)
    return sandbox.run_sandboxed([sys.executable, "-c", textwrap.dedent(code)], sandbox.sandbox_env([]), limits,
                                 "process", keep_output=True)


def cgroup_problem() -> str:
    if not sys.platform.startswith("linux"):
        return "not Linux"
    run = run_python("print('hello')")
    return "" if run.memory_by == "cgroup" else "the warden cannot create a cgroup v2 with memory.max here"


needs_cgroup = pytest.mark.skipif(bool(cgroup_problem()), reason=cgroup_problem() or "")


def leftover_cgroups() -> list[str]:
    return [path for parent in warden._cgroup_parents() if os.path.isdir(parent)
            for path in os.listdir(parent) if path.startswith("autograder-")]


@needs_cgroup
def test_reserving_16_gb_while_touching_50_mb_passes_under_a_300_mb_cgroup():
    run = run_python("""
        import mmap
        noreserve = getattr(mmap, 'MAP_NORESERVE', 0x4000)  # Linux's value; Python < 3.13 lacks the name
        reserved = mmap.mmap(-1, 16 << 30, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | noreserve)
        touched = bytearray(b'x' * (50 << 20))
        print('done', len(touched))
    """)
    assert run.ok and run.memory_by == "cgroup", run.output_tail
    assert "done 52428800" in run.output_tail
    assert 50 <= run.peak_mb < 300


@needs_cgroup
def test_a_burst_past_memory_max_is_killed_by_the_kernel_and_reported_as_memory():
    run = run_python("""
        print('start', flush=True)
        burst = b'x' * (1536 << 20)  # 1.5 GB in one allocation: faster than one polling interval
        print('survived', len(burst))
    """)
    assert run.status == "memory" and run.memory_by == "cgroup", (run.status, run.output_tail)
    assert "start" in run.output_tail and "survived" not in run.output_tail
    assert leftover_cgroups() == []


@needs_cgroup
def test_the_cgroup_alone_stops_a_burst_the_poll_never_saw():
    """The Cgroup class on its own, with no polling at all: the kernel kills the process at memory.max."""
    import subprocess

    group = warden.Cgroup.create(memory_mb=200, processes=8)
    assert group is not None
    try:
        gate_read, gate_write = os.pipe()
        child = subprocess.Popen([sys.executable, "-c", "import os; os.read(0, 1); b = b'x' * (1 << 30)"],
                                 stdin=gate_read)
        assert group.take(child.pid)
        os.write(gate_write, b"g")
        assert child.wait(timeout=60) == -9  # SIGKILL from the OOM killer
        assert group.out_of_memory()
    finally:
        group.kill()
        group.remove()
    assert not os.path.exists(group.path)


@needs_cgroup
def test_a_fork_storm_is_bounded_by_pids_max_and_reported_as_processes():
    run = run_python("""
        import os, time
        children = 0
        try:
            for _ in range(200):
                if os.fork() == 0:
                    time.sleep(30)
                    os._exit(0)
                children += 1
        except OSError as error:
            print('fork refused after', children, error.errno, flush=True)
        raise SystemExit(1)
    """, processes=16)
    assert run.status == "processes" and run.memory_by == "cgroup", (run.status, run.output_tail)
    assert leftover_cgroups() == []


def test_cgroup_parents_name_existing_folders_on_linux():
    """Cheap and everywhere: the mount parsing finds real folders (or none, off Linux or without cgroup2)."""
    parents = warden._cgroup_parents()
    assert all(os.path.isdir(path) for path in parents)
    if sys.platform.startswith("linux") and os.path.exists("/sys/fs/cgroup/cgroup.controllers"):
        assert parents  # a pure cgroup v2 machine always has its mount point as a candidate
