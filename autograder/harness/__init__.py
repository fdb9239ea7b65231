"""What runs beside learner code in the grading child: each lab's preamble, its drivers and its reference
implementations; never test cases, inputs, seeds or feedback.

One module per lab (lab0_1.py, ...), imported by the child by the lab's name, and fake_engine.py: the engine's
scheduler with a hash for a model, which lab 0.2's drivers run learner code against (tests/fakes.py reuses it).
A harness module imports only the stdlib, torch, numpy, `reference` and autograder.spec / compare / codec, never
the lab modules that hold the cases, so it works in a copy of the project from which the cases were removed. Each
reference implementation is a top-level `def` or `class`, so the grader can replace the one being graded by its
name.
"""
