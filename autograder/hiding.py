"""Hiding the reference implementations of the exercises being graded from learner code (child side).

Learner code reaches `reference` through `import` statements, so the learner's namespace gets its own
`__import__`: it hands out views of `reference` modules in which the hidden symbols cannot be read. A hidden
symbol is matched by identity, so a re-export (`reference.attention.build_metadata` for
`reference.attention.metadata.build_metadata`) is hidden too. Reading one raises ImportError naming it and
records the attempt, which the grader reports. Everything else in `reference` works, and reference code
itself (including the stand-ins the grader binds) still calls the real functions.

This is a guard against handing in the reference, not a wall: a learner can copy the (open-book) source into
the notebook, or dig through sys.modules; the grader makes the easy path fail loudly and visibly.
"""

from __future__ import annotations

import builtins
import sys
import types
from typing import Any

PACKAGE = "reference"


class HiddenImports:
    """An `__import__` for learner code that hides `names` (dotted: "reference.models.llama.RMSNorm")."""

    def __init__(self, names: list[str]) -> None:
        self.attempts: list[str] = []
        self.names = list(names)

    @property
    def hidden(self) -> dict[int, str]:
        """id of each hidden object -> its dotted name, for the modules imported so far. Resolved when asked,
        never by importing: a module imported too early could behave differently (Triton reads
        TRITON_INTERPRET when it is first imported, and a lab's preamble sets it)."""
        found = {}
        for name in self.names:
            module_name, _, attribute = name.rpartition(".")
            module = sys.modules.get(module_name)
            if module is not None and hasattr(module, attribute):
                found[id(getattr(module, attribute))] = name
        return found

    def builtins(self) -> dict[str, Any]:
        """A copy of the builtins with this `__import__`; goes in the learner namespace as `__builtins__`."""
        table = dict(vars(builtins))
        table["__import__"] = self.import_
        return table

    def import_(self, name: str, globals=None, locals=None, fromlist=(), level: int = 0) -> Any:
        module = builtins.__import__(name, globals, locals, fromlist, level)
        if level == 0 and name.split(".")[0] == PACKAGE and self.names:
            return _ModuleView(module, self)
        return module

    def check(self, module_name: str, attribute: str, value: Any) -> Any:
        name = self.hidden.get(id(value)) if callable(value) else None
        if name is not None:
            self.attempts.append(name)
            raise ImportError(f"{name} is hidden while grading: this exercise must be your own code "
                              f"(reached as {module_name}.{attribute})")
        if isinstance(value, types.ModuleType) and value.__name__.split(".")[0] == PACKAGE:
            return _ModuleView(value, self)
        return value


class _ModuleView(types.ModuleType):
    """A stand-in for a `reference` module whose attributes pass through HiddenImports.check."""

    def __init__(self, module: types.ModuleType, guard: HiddenImports) -> None:
        super().__init__(module.__name__, module.__doc__)
        object.__setattr__(self, "_module", module)
        object.__setattr__(self, "_guard", guard)

    def __getattribute__(self, attribute: str) -> Any:
        if attribute in ("_module", "_guard", "__class__"):
            return object.__getattribute__(self, attribute)
        module = object.__getattribute__(self, "_module")
        guard = object.__getattribute__(self, "_guard")
        if attribute == "__dict__":  # `from reference.x import *` and vars() see a copy without hidden symbols
            hidden = guard.hidden
            return {key: value for key, value in vars(module).items() if id(value) not in hidden}
        return guard.check(module.__name__, attribute, getattr(module, attribute))

    def __dir__(self) -> list[str]:
        return dir(object.__getattribute__(self, "_module"))
