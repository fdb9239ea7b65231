"""Per-lab test modules. Each module defines `LAB`, a spec.Lab with the lab's exercises and their cases.

`load_lab("lab0.1")` imports autograder.labs.lab0_1 and returns its LAB; a new lab adds a module here and a line
to LAB_MODULES. What runs beside learner code (the preamble, drivers, references) is in the module of the same
name in autograder/harness.
"""

from __future__ import annotations

import importlib

from ..spec import Lab

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
