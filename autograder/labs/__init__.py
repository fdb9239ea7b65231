"""Per-lab test modules. Each module defines `LAB`, a spec.Lab with the lab's exercises and their cases.

`load_lab("lab0.1")` imports autograder.labs.lab0_1 and returns its LAB; a new lab adds a module here and a line
to LAB_MODULES. What runs beside learner code (the preamble, drivers, references) is in the module of the same
name in autograder/harness (imported there as `harness`); a lab module holds what only the grader's parent sees:
inputs, seeds and feedback (draw.py draws the random inputs from each case's seed). Exercise signatures are
frozen once published: the notebooks' skeletons, the self-check cells and the grader all depend on them.
"""

from __future__ import annotations

import importlib

from ..spec import Lab

# The course labs' limit on the resident memory of a grading child: about twice what grading their solutions peaks
# at in one child with PyPI's CUDA build of torch 2.14 (benchmarks/RESULTS.md): lab 0.1 298 MB, lab 0.2 290 MB,
# lab 0.3 307 MB with the Triton interpreter; lab 0.4 154 MB with the CPU build of torch 2.13, as lab 0.1.
LAB_MEMORY_MB = 640

LAB_MODULES = {
    "lab0.1": "autograder.labs.lab0_1",
    "lab0.2": "autograder.labs.lab0_2",
    "lab0.3": "autograder.labs.lab0_3",
    "lab0.4": "autograder.labs.lab0_4",
    "fixture": "autograder.labs.fixture",  # a tiny lab for the autograder's own tests
}


def load_lab(name: str | Lab) -> Lab:
    """The Lab called `name` ("lab0.1"); a Lab passes through unchanged."""
    if isinstance(name, Lab):
        return name
    if name not in LAB_MODULES:
        raise ValueError(f"unknown lab {name!r}; known labs: {', '.join(LAB_MODULES)}")
    return importlib.import_module(LAB_MODULES[name]).LAB
