"""Attacks on what the grading sandbox can see, reach and write.

One hostile fixture-lab submission, graded in one batch with an honest control (which keeps full marks, 6).
Its `add` cell tries to read /etc/shadow, a classmate's notebook in the host's /tmp, earlier gradebooks (in /tmp
and /var/tmp), the grader's environment (a secret the test puts there) and the checkout's folder (solution
notebooks, .git), and to connect to host UNIX sockets (a path in /tmp, an abstract name) and to the network
(an outside address, a TCP server on the host's 127.0.0.1). Anything it gets goes first into its error message,
which is visible feedback; every server greets with the secret and counts its clients. Its `counter` cell
writes a file of a unique name to /tmp, /dev/shm, /var/tmp, /scratch, $HOME and its working folder, and tries
to change the real grader files and put a .pth file in the runtime's site-packages; it reports which worked.
Passing tests prove: the secret is in no feedback, no server saw a client, each failure has the expected
errno, the host holds none of the written files afterwards, and the grader files are byte for byte unchanged.
A third submission fills the sandbox's own root folder with files (memory that no process holds) and then
answers correctly: it must not get past the memory limit.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import socket
import sys
import threading
import uuid
from pathlib import Path

import nbformat
import pytest

import autograder
from autograder import sandbox
from autograder.grade import GradeOptions, grade
from autograder.labs import load_lab

pytestmark = pytest.mark.skipif(bool(sandbox.bwrap_problem()),
                                reason=f"bubblewrap cannot start here: {sandbox.bwrap_problem()}")

HOST_ROOT = Path(autograder.__file__).resolve().parent.parent
FIXTURE = load_lab("fixture")
MEMORY_MB = 512  # the control's child peaks near 150 MB
TAG = uuid.uuid4().hex[:12]
SECRET = f"secret-{TAG}"  # in every file, socket greeting and environment variable the attacker must not reach
WRITTEN = f"attack-written-{TAG}"  # the name of every file the attacker writes
GRADER_FILES = [HOST_ROOT / "autograder" / "warden.py", HOST_ROOT / "autograder" / "grade.py"]
SITE_PACKAGES = [p for p in sys.path if p.endswith("site-packages") and os.path.isdir(p)]

ADD = "def add(a, b):\n    return a + b\n"
COUNTER = (
    "class Counter:\n    def __init__(self, start):\n        self.total = start\n\n"
    "    def increment(self, by):\n        if by < 0:\n            raise ValueError('negative')\n"
    "        self.total += by\n        return self.total\n"
)

# add: every read or connection either fails (its errno name, or the exception's type, goes into the report)
# or succeeds (then "LEAK:" and what it got go first in the report, so nothing is clipped).
READER = """\
import errno, os, socket

def _why(exc):
    return errno.errorcode.get(getattr(exc, "errno", None) or 0, type(exc).__name__)

def _read(path):
    with open(path, errors="replace") as f:
        return f.read(200)

def _connect(family, address):
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.settimeout(1.0)
        s.connect(address)
        return s.recv(200).decode(errors="replace")

def _environment():
    texts = [repr(dict(os.environ))]
    for pid in os.listdir("/proc"):
        for name in ("environ", "cmdline"):
            try:
                texts.append(_read(f"/proc/{{pid}}/{{name}}"))
            except OSError:
                pass
    hits = [text for text in texts if {secret_prefix!r} in text]
    if hits:
        return hits[0]
    raise LookupError("no secret")

def _checkout():
    found = []
    for folder, subfolders, files in os.walk({host_root!r}):
        subfolders[:] = [d for d in subfolders if d != ".venv"]  # the runtime
        found += [f for f in files if f.endswith(".ipynb")] + [d for d in subfolders if d == ".git"]
    if found:
        return " ".join(found)
    raise FileNotFoundError(errno.ENOENT, "nothing")

ATTEMPTS = {{
    "shadow": lambda: _read("/etc/shadow"),
    "classmate": lambda: _read({classmate!r}),
    "gradebook_tmp": lambda: _read({gradebook_tmp!r}),
    "gradebook_var": lambda: _read({gradebook_var!r}),
    "environment": _environment,
    "checkout": _checkout,
    "unix_path": lambda: _connect(socket.AF_UNIX, {unix_path!r}),
    "unix_abstract": lambda: _connect(socket.AF_UNIX, {unix_abstract!r}),
    "internet": lambda: _connect(socket.AF_INET, ("1.1.1.1", 80)),
    "host_tcp": lambda: _connect(socket.AF_INET, ("127.0.0.1", {tcp_port})),
}}

def add(a, b):
    leaks, report = [], []
    for name, attempt in ATTEMPTS.items():
        try:
            leaks.append(f"LEAK:{{name}}:{{attempt()[:80]}}")
        except Exception as exc:
            report.append(f"{{name}}={{_why(exc)}}")
    raise LookupError(" ".join(leaks + report))
"""

# counter: writes a file named WRITTEN everywhere, then Counter(start) raises a report of what worked.
WRITER = """\
import errno, os

TARGETS = {{
    "tmp": "/tmp", "shm": "/dev/shm", "var_tmp": "/var/tmp", "scratch": "/scratch", "home": os.environ["HOME"],
    "cwd": os.getcwd(),
}}
REPORT = []
for name, folder in TARGETS.items():
    try:
        with open(os.path.join(folder, {written!r}), "w") as f:
            f.write({secret!r})
        REPORT.append(f"{{name}}=ok")
    except OSError as exc:
        REPORT.append(f"{{name}}={{errno.errorcode.get(exc.errno, '?')}}")
for name, path in {grader_files!r}:  # the grader's own files, and a .pth file that every Python start would read
    try:
        with open(path, "a") as f:
            f.write("\\n")  # enough to change the file's bytes, harmless should it ever get through
        REPORT.append(f"{{name}}=ok")
    except OSError as exc:
        REPORT.append(f"{{name}}={{errno.errorcode.get(exc.errno, '?')}}")

class Counter:
    def __init__(self, start):
        raise LookupError(" ".join(REPORT))
"""

# add: fill the sandbox's own folders outside its size-limited tmpfs (its root, /dev, /etc...) with files
# worth more than the memory limit, then answer correctly: points only if that memory went unnoticed.
FILLER = f"""\
import os

def _fill(total_mb, chunk=b"\\1" * (1 << 24)):
    written = 0
    for index in range(total_mb // 64):
        for folder in ("/", "/dev", "/etc", "/work", "/root"):
            try:
                with open(os.path.join(folder, f"fill-{{index}}"), "wb") as f:
                    for _ in range(4):  # 4 x 16 MB
                        f.write(chunk)
                written += 64
                break
            except OSError:
                continue
        else:
            raise OSError(f"nowhere to write after {{written}} MB")
    return written

FILLED = _fill({MEMORY_MB + 256})

def add(a, b):
    return a + b
"""


class Listener:
    """A server on the host that greets every client with SECRET and counts them (in a thread)."""

    def __init__(self, family: int, address) -> None:
        self.server = socket.socket(family, socket.SOCK_STREAM)
        self.server.bind(address)
        self.server.listen(8)
        self.server.settimeout(0.2)
        self.accepted = 0
        self.address = self.server.getsockname()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self.server.accept()
            except (socket.timeout, OSError):
                continue
            self.accepted += 1
            with contextlib.suppress(OSError), client:
                client.sendall(SECRET.encode())

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.server.close()


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def fixture_notebook(add: str, counter: str) -> nbformat.NotebookNode:
    cells = [nbformat.v4.new_code_cell(add, metadata={"tags": ["exercise:add"]}),
             nbformat.v4.new_code_cell(counter, metadata={"tags": ["exercise:counter"]})]
    for index, cell in enumerate(cells):
        cell.id = f"cell-{index}"
    return nbformat.v4.new_notebook(cells=cells)


@pytest.fixture(scope="module")
def attacked(tmp_path_factory):
    """Plant the secrets and servers, grade the control, the attacker and the filler in one batch (-j 2),
    and return what the host looks like afterwards."""
    folder = tmp_path_factory.mktemp("filesystem_attacks")
    classmate = Path(f"/tmp/classmate-{TAG}.ipynb")
    classmate.write_text(nbformat.writes(fixture_notebook(f"# {SECRET}\n" + ADD, COUNTER)))
    gradebook_tmp = tmp_path_factory.mktemp("earlier_gradebook")
    gradebook_var = Path(f"/var/tmp/gradebook-{TAG}")
    for book in (gradebook_tmp, gradebook_var):
        book.mkdir(exist_ok=True)
        (book / "grades.csv").write_text(f"student,total\n{SECRET},6\n")
    unix_path = Listener(socket.AF_UNIX, f"/tmp/attack-{TAG}.sock")
    unix_abstract = Listener(socket.AF_UNIX, f"\0attack-{TAG}")
    tcp = Listener(socket.AF_INET, ("127.0.0.1", 0))
    before = {path: sha256(path) for path in GRADER_FILES}
    pth = [("site_packages", os.path.join(p, f"{WRITTEN}.pth")) for p in SITE_PACKAGES]
    reader = READER.format(secret_prefix=SECRET, host_root=str(HOST_ROOT), classmate=str(classmate),
                           gradebook_tmp=str(gradebook_tmp / "grades.csv"),
                           gradebook_var=str(gradebook_var / "grades.csv"), unix_path=f"/tmp/attack-{TAG}.sock",
                           unix_abstract=f"\0attack-{TAG}", tcp_port=tcp.address[1])
    writer = WRITER.format(written=WRITTEN, secret=SECRET,
                           grader_files=[("warden", str(GRADER_FILES[0])), ("grade", str(GRADER_FILES[1])), *pth])
    submissions = {"control": (ADD, COUNTER), "attacker": (reader, writer), "filler": (FILLER, COUNTER)}
    paths = []
    for name, (add, counter) in submissions.items():
        nbformat.write(fixture_notebook(add, counter), str(folder / f"{name}.ipynb"))
        paths.append(folder / f"{name}.ipynb")
    os.environ["AUTOGRADER_ATTACK_SECRET"] = SECRET  # in the grader's environment, never in the sandbox's
    try:
        grades = grade(FIXTURE, paths, GradeOptions(jobs=2, progress=False, memory_mb=MEMORY_MB))
    finally:
        del os.environ["AUTOGRADER_ATTACK_SECRET"]
        for server in (unix_path, unix_abstract, tcp):
            server.close()
        classmate.unlink()
        for book in (gradebook_var,):
            (book / "grades.csv").unlink()
            book.rmdir()
        with contextlib.suppress(OSError):
            os.unlink(f"/tmp/attack-{TAG}.sock")
    after = {path: sha256(path) for path in GRADER_FILES}
    leftovers = [os.path.join(top, name) for top in ("/tmp", "/dev/shm", "/var/tmp", "/", "/work", "/root", "/etc",
                                                       str(HOST_ROOT), *SITE_PACKAGES)
                 for name in (WRITTEN, f"{WRITTEN}.pth") if os.path.lexists(os.path.join(top, name))]
    for path in leftovers:  # ours (a unique name): found, reported, and not left behind
        os.unlink(path)
    return {
        "grades": {graded.student: graded for graded in grades},
        "accepted": {"unix_path": unix_path.accepted, "unix_abstract": unix_abstract.accepted, "tcp": tcp.accepted},
        "hashes": (before, after),
        "leftovers": leftovers,
    }


def points(student) -> dict[str, float]:
    return {result.exercise: result.score for result in student.results}


def every_text(student) -> str:
    """All feedback, notes and statuses of a student, hidden cases included."""
    parts = [student.status, *student.notes]
    for result in student.results:
        parts.append(result.note)
        parts += [f"{case.status} {case.feedback}" for case in result.cases]
    return "\n".join(parts)


def report(attacked, exercise: str) -> dict[str, str]:
    """name -> how it failed, from the attacker's first visible case of `exercise`."""
    (result,) = [r for r in attacked["grades"]["attacker"].results if r.exercise == exercise]
    text = result.cases[0].feedback.split("LookupError: ", 1)[1].split(" (line")[0]
    return dict(item.split("=", 1) for item in text.split() if "=" in item)


def test_the_honest_control_keeps_full_marks(attacked):
    control = attacked["grades"]["control"]
    assert points(control) == {"add": 4, "counter": 2} and control.status == "ok", every_text(control)


def test_no_secret_reaches_any_feedback(attacked):
    for student in attacked["grades"].values():
        assert SECRET not in every_text(student)
        assert "LEAK:" not in every_text(student)
    assert points(attacked["grades"]["attacker"]) == {"add": 0, "counter": 0}


@pytest.mark.parametrize("name, why", [
    ("shadow", "ENOENT"),  # /etc holds only what Python needs
    ("classmate", "ENOENT"),  # /tmp is the sandbox's own
    ("gradebook_tmp", "ENOENT"),
    ("gradebook_var", "ENOENT"),  # there is no /var at all
    ("environment", "LookupError"),  # neither its environment nor any process it sees holds the grader's
    ("checkout", "ENOENT"),  # no notebook and no .git below the checkout's folder
])
def test_host_files_and_the_grader_environment_cannot_be_read(attacked, name, why):
    assert report(attacked, "add").get(name) == why, every_text(attacked["grades"]["attacker"])


@pytest.mark.parametrize("name, why", [
    ("unix_path", "ENOENT"),  # the socket's folder is the sandbox's own /tmp
    ("unix_abstract", "ECONNREFUSED"),  # abstract names belong to the network namespace
    ("internet", "ENETUNREACH"),
    ("host_tcp", "ECONNREFUSED"),  # its 127.0.0.1 is its own
])
def test_no_host_socket_or_network_is_reachable(attacked, name, why):
    assert report(attacked, "add").get(name) == why, every_text(attacked["grades"]["attacker"])


def test_no_host_server_saw_a_connection(attacked):
    assert attacked["accepted"] == {"unix_path": 0, "unix_abstract": 0, "tcp": 0}


def test_writes_land_in_private_folders_only_and_vanish(attacked):
    written = report(attacked, "counter")
    assert {name: written.get(name) for name in ("tmp", "shm", "scratch", "home", "cwd")} == dict.fromkeys(
        ("tmp", "shm", "scratch", "home", "cwd"), "ok")  # the sandbox's own tmpfs: writable...
    assert written.get("var_tmp") == "ENOENT"
    assert attacked["leftovers"] == []  # ...and nothing of it is on the host afterwards


def test_the_grader_files_and_the_runtime_are_read_only(attacked):
    written = report(attacked, "counter")
    assert written.get("warden") == "EROFS" and written.get("grade") == "EROFS"
    assert written.get("site_packages") == "EROFS"  # a .pth file there would run in every later Python
    before, after = attacked["hashes"]
    assert before == after


def test_files_in_the_sandbox_root_cannot_get_past_the_memory_limit(attacked):
    filler = attacked["grades"]["filler"]
    assert points(filler)["add"] == 0, every_text(filler)
