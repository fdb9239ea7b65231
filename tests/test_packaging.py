"""The install story stays true: environment.yml mirrors pyproject, and `import reference` stays light."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def environment_yml_pip_deps() -> list[str]:
    deps, in_pip = [], False
    for line in (ROOT / "environment.yml").read_text().splitlines():
        stripped = line.strip()
        if stripped == "- pip:":
            in_pip = True
        elif in_pip and stripped.startswith("- "):
            deps.append(stripped[2:].strip())
        elif in_pip and stripped and not stripped.startswith("#"):
            in_pip = False
    return deps


def test_environment_yml_matches_pyproject():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    expected = project["dependencies"] + project["optional-dependencies"]["dev"]
    assert environment_yml_pip_deps() == expected


def test_import_reference_does_not_import_triton():
    code = "import sys, reference, reference.models, reference.generate; print('triton' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert result.stdout.strip() == "False"


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    assert "make test" in readme and "make test" in ci


def test_ci_takes_the_torch_a_new_user_gets():
    """CI must not preinstall a CPU torch: pip then brings PyPI's default (CUDA) build, which the grader must
    survive (it maps about 4 GB of address space just to import), as most learners have it."""
    ci = (ROOT / ".ci" / "run").read_text()
    commands = [line for line in ci.splitlines() if not line.lstrip().startswith("#")]
    assert not any("pip" in line and "torch" in line for line in commands)
    assert "bubblewrap" in ci and "bubblewrap" in (ROOT / "README.md").read_text()
