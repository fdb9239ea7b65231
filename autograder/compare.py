"""Comparisons between a learner's result and the expected value, with the tolerance written down.

Both sides are *decoded* values (see codec.py): plain numbers, strings, lists, tuples, dicts and tensors built
by the decoder. Nothing the learner created reaches a comparison, so no learner `__eq__` or `__float__` runs.
A comparison returns an Outcome: whether it passed, a short kind of failure that is safe to show for hidden
cases ("wrong shape", "wrong values"...), and a detail line for visible cases (shapes, dtypes, largest error).
Lists and tuples are interchangeable (both are "sequences"), because JSON-minded code returns either.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from .codec import describe


@dataclass(frozen=True)
class Outcome:
    passed: bool
    kind: str = ""  # safe for hidden cases: what went wrong, never a value
    detail: str = ""  # for visible cases: where and by how much

    @staticmethod
    def ok() -> "Outcome":
        return Outcome(True)


class Comparison:
    """Base class: `compare(got, expected) -> Outcome` and `describe()` for the feedback text."""

    def compare(self, got: Any, expected: Any) -> Outcome:
        raise NotImplementedError

    def describe(self) -> str:
        raise NotImplementedError

    # Leaves are numbers and tensors; structure (sequences, dicts, types) is checked the same way by everyone.
    def _leaf_tensor(self, got: torch.Tensor, expected: torch.Tensor, where: str) -> Outcome:
        raise NotImplementedError

    def _leaf_float(self, got: float, expected: float, where: str) -> Outcome:
        raise NotImplementedError

    def _walk(self, got: Any, expected: Any, where: str) -> Outcome:
        if isinstance(expected, torch.Tensor):
            if not isinstance(got, torch.Tensor):
                return Outcome(False, "wrong type", f"{where}: expected a tensor, got {describe(got)}")
            if got.shape != expected.shape:
                return Outcome(False, "wrong shape",
                               f"{where}: expected shape {list(expected.shape)}, got {list(got.shape)}")
            if getattr(self, "check_dtype", True) and got.dtype != expected.dtype:
                return Outcome(False, "wrong dtype", f"{where}: expected dtype {expected.dtype}, got {got.dtype}")
            return self._leaf_tensor(got, expected, where)
        if isinstance(expected, (list, tuple)):
            if not isinstance(got, (list, tuple)):
                return Outcome(False, "wrong type", f"{where}: expected a sequence, got {describe(got)}")
            if len(got) != len(expected):
                return Outcome(False, "wrong length", f"{where}: expected length {len(expected)}, got {len(got)}")
            for i, (g, e) in enumerate(zip(got, expected)):
                outcome = self._walk(g, e, f"{where}[{i}]")
                if not outcome.passed:
                    return outcome
            return Outcome.ok()
        if isinstance(expected, dict):
            if not isinstance(got, dict):
                return Outcome(False, "wrong type", f"{where}: expected a dict, got {describe(got)}")
            if set(got) != set(expected):
                missing, extra = sorted(map(str, set(expected) - set(got))), sorted(map(str, set(got) - set(expected)))
                return Outcome(False, "wrong keys", f"{where}: missing keys {missing}, unexpected keys {extra}")
            for key in expected:
                outcome = self._walk(got[key], expected[key], f"{where}[{key!r}]")
                if not outcome.passed:
                    return outcome
            return Outcome.ok()
        if isinstance(expected, bool) or expected is None or isinstance(expected, str):
            if type(got) is not type(expected) or got != expected:
                return Outcome(False, "wrong value", f"{where}: expected {expected!r}, got {_short(got)}")
            return Outcome.ok()
        if isinstance(expected, int):
            if type(got) is not int:
                return Outcome(False, "wrong type", f"{where}: expected an int, got {describe(got)} {_short(got)}")
            if got != expected:
                return Outcome(False, "wrong value", f"{where}: expected {expected}, got {got}")
            return Outcome.ok()
        if isinstance(expected, float):
            if type(got) not in (int, float):
                return Outcome(False, "wrong type", f"{where}: expected a number, got {describe(got)}")
            return self._leaf_float(float(got), expected, where)
        raise TypeError(f"expected value of type {type(expected).__name__} is not plain data")  # our bug


def _short(value: Any) -> str:
    text = repr(value) if isinstance(value, (int, float, str, bool, type(None))) else describe(value)
    return text if len(text) <= 60 else text[:57] + "..."


@dataclass(frozen=True)
class Exact(Comparison):
    """Equal structure, shapes, dtypes (unless check_dtype=False) and values; NaN equals NaN."""

    check_dtype: bool = True

    def describe(self) -> str:
        return "exact match"

    def compare(self, got: Any, expected: Any) -> Outcome:
        return self._walk(got, expected, "result")

    def _leaf_tensor(self, got, expected, where):
        if expected.dtype.is_floating_point:
            same = torch.equal(torch.nan_to_num(got.double(), nan=0.5), torch.nan_to_num(expected.double(), nan=0.5))
            same = same and torch.equal(got.isnan(), expected.isnan())
        else:
            same = torch.equal(got.to(expected.dtype), expected)
        if same:
            return Outcome.ok()
        wrong = (got.double() != expected.double()).nonzero()
        first = wrong[0].tolist() if len(wrong) else []
        return Outcome(False, "wrong values", f"{where}: {len(wrong)} of {expected.numel()} entries differ, "
                                              f"first at index {first}")

    def _leaf_float(self, got, expected, where):
        if got == expected or (math.isnan(got) and math.isnan(expected)):
            return Outcome.ok()
        return Outcome(False, "wrong value", f"{where}: expected {expected!r}, got {got!r}")


@dataclass(frozen=True)
class Close(Comparison):
    """|got - expected| <= atol + rtol * |expected| elementwise (torch.allclose's rule); NaNs must match."""

    atol: float
    rtol: float = 0.0
    check_dtype: bool = True

    def describe(self) -> str:
        return f"|yours - expected| <= {self.atol:g} + {self.rtol:g} * |expected| everywhere"

    def compare(self, got: Any, expected: Any) -> Outcome:
        return self._walk(got, expected, "result")

    def _leaf_tensor(self, got, expected, where):
        g, e = got.double(), expected.double()
        nan_mismatch = g.isnan() != e.isnan()
        error = (g - e).abs().nan_to_num(nan=0.0, posinf=math.inf)
        error = torch.where(g == e, torch.zeros_like(error), error)  # equal infinities are fine
        allowed = self.atol + self.rtol * e.abs().nan_to_num(nan=0.0)
        bad = (error > allowed) | nan_mismatch
        if not bad.any():
            return Outcome.ok()
        worst = int(torch.where(bad, error.nan_to_num(nan=math.inf), torch.zeros_like(error)).argmax())
        index = list(torch.unravel_index(torch.tensor(worst), e.shape)) if e.dim() else []
        index = [int(i) for i in index]
        return Outcome(False, "wrong values",
                       f"{where}: {int(bad.sum())} of {e.numel()} entries outside tolerance; largest error "
                       f"{float(error.reshape(-1)[worst]):.3g} at index {index} (allowed {self.atol:g} + "
                       f"{self.rtol:g} * |expected|)")

    def _leaf_float(self, got, expected, where):
        if got == expected or (math.isnan(got) and math.isnan(expected)):
            return Outcome.ok()
        if abs(got - expected) <= self.atol + self.rtol * abs(expected):
            return Outcome.ok()
        return Outcome(False, "wrong value", f"{where}: expected {expected:.6g}, got {got:.6g} "
                                             f"(allowed {self.atol:g} + {self.rtol:g} * |expected|)")


@dataclass(frozen=True)
class Trace(Comparison):
    """A stateful exercise's trace: a list of steps compared one by one; the first differing step is reported.

    step_names: a label per step (what operation produced it), shown in feedback; missing labels read "step i".
    Each step is compared with
    `step` (any Comparison). A step that is {"error": "ValueError"} in the expected trace passes when the
    learner's step is {"error": "ValueError: <any message>"} (same exception type).
    """

    step: Comparison
    step_names: tuple[str, ...] = ()

    def describe(self) -> str:
        return f"step by step, each step: {self.step.describe()}"

    def compare(self, got: Any, expected: Any) -> Outcome:
        if not isinstance(got, (list, tuple)):
            return Outcome(False, "wrong type", f"expected a trace (list of steps), got {describe(got)}")
        for i, want in enumerate(expected):
            name = self.step_names[i] if i < len(self.step_names) else f"step {i}"
            if i >= len(got):
                return Outcome(False, "trace too short", f"{name}: your trace stopped after {len(got)} steps")
            have = got[i]
            if isinstance(want, dict) and set(want) == {"error"}:
                want_type = str(want["error"]).split(":")[0]
                have_error = have.get("error") if isinstance(have, dict) and set(have) == {"error"} else None
                if not isinstance(have_error, str) or have_error.split(":")[0] != want_type:
                    return Outcome(False, f"{name}: expected {want_type}",
                                   f"{name}: expected it to raise {want_type}, got {_trace_step(have)}")
                continue
            if isinstance(have, dict) and set(have) == {"error"}:
                return Outcome(False, f"{name}: raised", f"{name}: raised {str(have['error'])[:200]}")
            outcome = self.step.compare(have, want)
            if not outcome.passed:
                return Outcome(False, f"{name}: {outcome.kind}", f"{name}: {outcome.detail}")
        if len(got) > len(expected):
            return Outcome(False, "trace too long", f"expected {len(expected)} steps, got {len(got)}")
        return Outcome.ok()


def _trace_step(step: Any) -> str:
    if isinstance(step, dict) and set(step) == {"error"}:
        return f"an exception {str(step['error'])[:200]}"
    return describe(step)
