"""Where student code runs: the bubblewrap sandbox, the container fallback, the refusal, and the limits.

- bwrap: its own user, PID and network namespaces, a private /tmp, and a process storm that leaves nothing;
- limits measure what matters: reserving 16 GB of address space while touching 50 MB passes (a CUDA build of
  torch maps about 4 GB just to import), touching more than the limit is a "memory limit" that costs only
  that exercise, and the other students of the batch keep their marks;
- without bubblewrap, `grade` refuses and prints the install command;
- "container" mode (a grading service's container, root, no namespaces): student code runs as an unprivileged
  uid that cannot read the project, and the feedback says which mode graded it;
- concurrent grading runs never share a sandbox uid.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import nbformat
import pytest

from autograder import sandbox
from autograder.grade import GradeOptions, grade
from autograder.labs import load_lab

from test_autograder_grade import ADD, COUNTER, MEMORY_MB, STORM_MARK, add_doing, notebook, storm_survivors

REPO = Path(__file__).resolve().parent.parent
FIXTURE = load_lab("fixture")
needs_bwrap = pytest.mark.skipif(bool(sandbox.bwrap_problem()), reason=f"bubblewrap: {sandbox.bwrap_problem()}")


def graded_batch(tmp_path: Path, cells: dict[str, tuple[str, str]], **options) -> dict:
    paths = []
    for name, (add, counter) in cells.items():
        nbformat.write(notebook(add, counter), str(tmp_path / f"{name}.ipynb"))
        paths.append(tmp_path / f"{name}.ipynb")
    grades = grade(FIXTURE, paths, GradeOptions(progress=False, **options))
    return {graded.student: graded for graded in grades}


def points(graded) -> tuple[float, float]:
    scored = {result.exercise: result.score for result in graded.results}
    return scored["add"], scored["counter"]


HOST_CANARY = f"autograder-canary-{os.getpid()}"  # a file the host puts in its /tmp: the sandbox must not see it
PROBE = textwrap.dedent(f"""\
    import os, socket, subprocess
    storm = [subprocess.Popen(['sleep', '{STORM_MARK}'], start_new_session=True) for _ in range(20)]
    try:
        socket.create_connection(('1.1.1.1', 80), timeout=1)
        network = 'network'
    except OSError:
        network = 'no-network'
    open('/tmp/written-inside', 'w').write('x')
    host_file = '/tmp/{HOST_CANARY}'
    print(network, os.getuid(), os.getpid(), sum(e.isdigit() for e in os.listdir('/proc')), os.path.exists(host_file))
""")


@needs_bwrap
def test_bwrap_gives_its_own_uid_pid_and_network_namespaces_and_leaves_no_process(tmp_path):
    staging = Path(tempfile.mkdtemp(prefix="autograder-test-"))
    canary = Path("/tmp") / HOST_CANARY
    canary.write_text("the host's")
    try:
        os.chmod(staging, 0o755)
        from autograder.isolate import ViewCache

        view = ViewCache(staging).get(())
        run = sandbox.run_sandboxed([sys.executable, "-c", PROBE], sandbox.sandbox_env(["/grading"]),
                                    sandbox.Limits(wall_s=60), "bwrap", view=view, keep_output=True)
    finally:
        shutil.rmtree(staging)
        canary.unlink()
    assert run.ok, run.output_tail
    network, uid, pid, processes, sees_host_tmp = run.output_tail.split()
    assert network == "no-network" and int(uid) == sandbox.INSIDE_UID
    assert int(pid) < 10 and int(processes) < 40  # its own PID namespace: 20 sleeps, bwrap, python
    # a private /tmp (not counted by entries: a runtime installed under the host's /tmp is bound in below it)
    assert sees_host_tmp == "False" and not os.path.exists("/tmp/written-inside")
    assert storm_survivors() == []


RESERVE_16_GB = add_doing("return a + b", before=(
    "import mmap\n"
    "noreserve = getattr(mmap, 'MAP_NORESERVE', 0x4000)  # Linux's value; Python < 3.13 lacks the name\n"
    "reserved = mmap.mmap(-1, 16 << 30, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | noreserve)\n"
    "touched = torch.ones(12_500_000)  # 50 MB\n"))
TOUCH_3_GB = add_doing("return a + b", before="touched = [torch.ones(250_000_000) for _ in range(3)]\n")


@needs_bwrap
def test_memory_limit_counts_touched_memory_not_address_space_and_costs_one_exercise(tmp_path):
    grades = graded_batch(tmp_path, {"reserves": (RESERVE_16_GB, COUNTER), "touches": (TOUCH_3_GB, COUNTER),
                                     "honest": (ADD, COUNTER)}, jobs=2, memory_mb=MEMORY_MB)
    assert points(grades["reserves"]) == (4, 2)
    assert points(grades["touches"]) == (0, 2)  # counter, in the same child, ran again in a fresh one
    assert {case.status for case in grades["touches"].results[0].cases} == {"memory limit"}
    assert f"memory limit: the code used more than {MEMORY_MB} MB" in grades["touches"].results[0].cases[0].feedback
    assert points(grades["honest"]) == (4, 2)


def test_grade_refuses_without_bubblewrap_and_names_the_install_command(tmp_path):
    path = tmp_path / "student.ipynb"
    nbformat.write(notebook(), str(path))
    bin_dir = tmp_path / "bin"  # a PATH without bwrap
    bin_dir.mkdir()
    run = subprocess.run([sys.executable, "-m", "autograder", "grade", "fixture", str(path), "--out",
                          str(tmp_path / "out"), "--sandbox", "bwrap"], cwd=REPO, capture_output=True, text=True,
                         env={"PATH": str(bin_dir), "PYTHONPATH": str(REPO)}, timeout=120)
    assert run.returncode == 3
    assert "bubblewrap (bwrap) is not installed" in run.stderr and "apt-get install bubblewrap" in run.stderr
    assert not (tmp_path / "out").exists()


def test_auto_mode_outside_a_container_refuses_rather_than_running_unconfined(monkeypatch):
    monkeypatch.setattr(sandbox, "bwrap_problem", lambda: "bubblewrap (bwrap) is not installed")
    monkeypatch.setattr(sandbox, "in_container", lambda: False)
    with pytest.raises(sandbox.SandboxUnavailable, match="apt-get install bubblewrap"):
        sandbox.choose_mode("auto")
    monkeypatch.setattr(sandbox, "in_container", lambda: True)
    monkeypatch.setattr(os, "geteuid", lambda: 1000)  # a container, but not root: no uid to switch to
    with pytest.raises(sandbox.SandboxUnavailable):
        sandbox.choose_mode("auto")


def test_concurrent_runs_lease_different_sandbox_uids():
    if os.geteuid() != 0:
        pytest.skip("only root leases sandbox uids")
    holder = subprocess.Popen([sys.executable, "-c", "from autograder import sandbox\nimport sys\n"
                               "with sandbox.lease_uid() as uid:\n    print(uid, flush=True)\n    sys.stdin.read()"],
                              cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        theirs = int(holder.stdout.readline())
        with sandbox.lease_uid() as mine, sandbox.lease_uid() as second:
            assert len({theirs, mine, second}) == 3
    finally:
        holder.communicate("")


# -- container mode: root, no namespaces --------------------------------------------------------------------

CONTAINER_SCRIPT = """\
set -euo pipefail
# Inside a private mount namespace (this test's, not the grader's): give the unprivileged uid a way to the
# Python runtime through folders that are closed to it (a checkout in a mode-700 temp dir, root's home), and
# hide the checkout itself: the grader runs from a private copy, as on a grading service.
for closed in $CLOSED; do
  stage="$(mktemp -d)"
  mount --bind "$closed" "$stage"
  mount -t tmpfs -o mode=755 tmpfs "$closed"
  for keep in $KEEP; do
    case "$keep" in "$closed"/*)
      relative="${keep#$closed/}"; mkdir -p "$closed/$relative"; mount --bind "$stage/$relative" "$closed/$relative";;
    esac
  done
done
cd "$COPY"
PYTHONPATH="$COPY" "$PYTHON" -m autograder grade fixture "$SUBMISSIONS"/*.ipynb --out "$OUT" --sandbox container
"""


def test_container_mode_runs_student_code_as_an_unprivileged_uid_that_cannot_read_the_project(tmp_path):
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        pytest.skip("container mode needs root (and unshare to stage the test)")
    private = Path(tempfile.mkdtemp(prefix="autograder-container-"))  # mode 700: the project's private copy
    copy = private / "project"
    copy.mkdir()
    for name in ("pyproject.toml", "reference", "autograder"):
        if (REPO / name).is_dir():
            shutil.copytree(REPO / name, copy / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(REPO / name, copy / name)
    submissions = tmp_path / "submissions"
    submissions.mkdir()
    reader = add_doing("return a + b", before=(
        "import os\n"
        f"for path in {[str(copy / 'autograder' / 'harness' / 'fixture.py'), str(REPO / 'reference' / 'llm.py')]!r}:\n"
        "    try:\n        open(path).read()\n        raise SystemExit('READ ' + path)\n"
        "    except OSError:  # PermissionError, or FileNotFoundError where the folder is hidden\n        pass\n"
        "assert os.getuid() != 0\n"))
    nbformat.write(notebook(reader, COUNTER), str(submissions / "reader.ipynb"))
    nbformat.write(notebook(add_doing("from autograder.harness.fixture import ref_add\nreturn ref_add(a, b)"),
                            COUNTER), str(submissions / "uses_reference.ipynb"))
    runtime = {os.path.realpath(p) for p in (sys.prefix, sys.base_prefix, os.path.dirname(sys.executable))}
    closed = sorted({str(a) for p in runtime for a in Path(p).parents
                     if a != Path("/") and not os.stat(a).st_mode & 0o001} | {str(REPO)})
    env = dict(os.environ, CLOSED=" ".join(closed), KEEP=" ".join(sorted(runtime)), COPY=str(copy),
               PYTHON=sys.executable, SUBMISSIONS=str(submissions), OUT=str(tmp_path / "out"))
    env.pop("PYTHONPATH", None)
    try:
        run = subprocess.run(["unshare", "--mount", "--propagation", "private", "bash", "-c", CONTAINER_SCRIPT],
                             env=env, capture_output=True, text=True, timeout=600)
    finally:
        shutil.rmtree(private)
    if "unshare failed" in run.stderr or "mount:" in run.stderr:
        pytest.skip(f"cannot stage the container test here: {run.stderr.strip()[-300:]}")
    assert run.returncode == 0, run.stderr[-2000:]
    assert "reader: 6/6 (ok)" in run.stdout
    assert "uses_reference: 2/6" in run.stdout  # the reference is absent there too
    feedback = (tmp_path / "out" / "reader" / "feedback.md").read_text()
    assert "graded in container mode" in feedback
