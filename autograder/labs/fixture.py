"""A tiny lab for testing the autograder itself (and for graders' fast tests): no model, instant cases.

Exercise `add` (function `add(a, b) -> a + b` on tensors) and exercise `counter` (class `Counter` with
`increment(by) -> new total`, a stateful trace). Every case has a limit of a few seconds, so a hanging
submission is cut off quickly. Learner notebooks for it are built by the tests in a temporary folder.
`add` hides a real reference symbol (`reference.kv.layout.kv_bytes_per_token`) so the grader's tests can check
that hiding works and that the rest of `reference` still does. The preamble, references and driver are in
autograder/harness/fixture.py.
"""

from __future__ import annotations

import torch

from ..compare import Close, Exact, Trace
from ..harness.fixture import PREAMBLE, ReferenceCounter, drive_counter, ref_add
from ..spec import Case, Exercise, Lab

ADD = Exercise(
    name="add", symbol="add", notebook="fixture.ipynb", signature="add(a: Tensor, b: Tensor) -> Tensor",
    reference=ref_add,
    cases=(
        Case("vectors", lambda g: {"a": torch.randn(4, generator=g), "b": torch.randn(4, generator=g)},
             Close(1e-6, 0.0), "elementwise sum of two float32 vectors", points=2.0, seed=1, timeout_s=2.0),
        Case("slow_guard", lambda g: {"a": torch.ones(2, 2), "b": torch.ones(2, 2)}, Exact(),
             "a 2x2 sum, within 2 seconds", timeout_s=2.0),
        Case("hidden_matrix", lambda g: {"a": torch.randn(3, 5, generator=g), "b": torch.randn(3, 5, generator=g)},
             Close(1e-6, 0.0), "elementwise sum of two matrices", visible=False, seed=2, timeout_s=2.0),
    ),
    hides=("reference.kv.layout.kv_bytes_per_token",),
)

COUNTER = Exercise(
    name="counter", symbol="Counter", notebook="fixture.ipynb",
    signature="class Counter: __init__(self, start: int); increment(self, by: int) -> int (ValueError if by < 0)",
    reference=ReferenceCounter, driver=drive_counter,
    cases=(
        Case("counts_up", lambda g: {"start": 3, "steps": [1, 2, 0, 5]}, Trace(Exact()), "3, then +1, +2, +0, +5",
             timeout_s=3.0),
        Case("rejects_negative", lambda g: {"start": 0, "steps": [1, -1, 2]}, Trace(Exact()),
             "a negative step raises ValueError and changes nothing", timeout_s=3.0),
    ),
)

LAB = Lab(name="fixture", preamble=PREAMBLE, exercises=(ADD, COUNTER), memory_mb=2048)
