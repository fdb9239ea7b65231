"""`python -m autograder gradescope LAB`: a Gradescope autograder zip that runs this same grader.

Gradescope unpacks the zip into /autograder/source, runs setup.sh once (as root) when it builds the image,
then run_autograder for every submission, with the student's files in /autograder/submission; it reads
/autograder/results/results.json. The zip holds the project's Python sources (not the solution notebooks),
the hidden tests when given, and the two scripts below.

setup.sh installs bubblewrap and puts Python in a virtual environment under /opt, outside root's home, so an
unprivileged uid can run it; the project is installed editable, so its packages stay in /autograder/source,
which run_autograder closes to other users before grading. Gradescope's containers may refuse the namespaces
bubblewrap needs: the grader then falls back to its "container" mode (sandbox.py), which needs exactly that
(student code as an unprivileged uid that can read neither the project nor the hidden tests nor the results),
and the feedback says which mode graded it. run_autograder reads AUTOGRADER_ROOT and AUTOGRADER_PYTHON when set,
which is how the tests run it outside Gradescope.
"""

from __future__ import annotations

import shlex
import zipfile
from pathlib import Path

from .release import REPO_ROOT
from .spec import Lab

SOURCES = ("pyproject.toml", "README.md", "reference", "autograder")
EXECUTABLE = 0o100755 << 16  # zip external attributes of a regular file with mode 755

SETUP = """\
#!/usr/bin/env bash
# Gradescope runs this once, as root, while building the image: bubblewrap, Python, CPU-only torch, this project.
set -euo pipefail
apt-get update
apt-get install -y --no-install-recommends python3 python3-pip python3-venv bubblewrap
python3 -m venv /opt/nano-vllm-labs  # outside /root, so the sandbox's unprivileged uid can run it
/opt/nano-vllm-labs/bin/pip install --no-cache-dir --index-url https://download.pytorch.org/whl/cpu torch
/opt/nano-vllm-labs/bin/pip install --no-cache-dir -e /autograder/source  # stays in source/, closed below
"""

RUN = """\
#!/usr/bin/env bash
# Gradescope runs this for every submission: grade it and leave results/results.json.
set -uo pipefail
ROOT="${{AUTOGRADER_ROOT:-/autograder}}"
PYTHON="${{AUTOGRADER_PYTHON:-/opt/nano-vllm-labs/bin/python}}"
OUT="$(mktemp -d)"
mkdir -p "$ROOT/results"
chmod -R go-rwx "$ROOT/source" "$ROOT/results"  # the grader, the hidden tests, the results: root's alone
cd "$ROOT/source"
"$PYTHON" -m autograder grade {lab} "$ROOT/submission" --out "$OUT"{tests}
if [ -f "$OUT/submission/results.json" ]; then
  cp "$OUT/submission/results.json" "$ROOT/results/results.json"
else
  echo '{{"score": 0, "output": "The grader could not grade this submission; please tell the course staff."}}' \\
    > "$ROOT/results/results.json"
fi
"""


def build_zip(lab: Lab, out: str | Path, tests_dir: str | Path | None = None) -> Path:
    """Write the autograder zip for `lab` to `out`; returns its path."""
    out = Path(out)
    tests = ""
    hidden_file = None
    if tests_dir is not None:
        hidden_file = Path(tests_dir) / (lab.name.replace(".", "_") + ".py")
        if not hidden_file.is_file():
            raise ValueError(f"--tests {tests_dir}: expected a file {hidden_file.name}")
        tests = " --tests hidden_tests"
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as zipped:
        _add_script(zipped, "setup.sh", SETUP)
        _add_script(zipped, "run_autograder", RUN.format(lab=shlex.quote(lab.name), tests=tests))
        for path in project_files():
            zipped.write(path, path.relative_to(REPO_ROOT).as_posix())
        if hidden_file is not None:
            zipped.write(hidden_file, f"hidden_tests/{hidden_file.name}")
    return out


def project_files() -> list[Path]:
    """What pip needs to install the project: its metadata and the two packages' Python files."""
    files = []
    for name in SOURCES:
        path = REPO_ROOT / name
        if path.is_file():
            files.append(path)
        else:
            files += sorted(p for p in path.rglob("*.py") if "__pycache__" not in p.parts)
    return files


def _add_script(zipped: zipfile.ZipFile, name: str, text: str) -> None:
    info = zipfile.ZipInfo(name, date_time=(2020, 1, 1, 0, 0, 0))
    info.external_attr = EXECUTABLE
    info.compress_type = zipfile.ZIP_DEFLATED
    zipped.writestr(info, text)
