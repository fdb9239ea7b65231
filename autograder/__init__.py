"""The nano-vLLM Labs autograder: self-check for learners, sandboxed batch grading for instructors.

Commands (`python -m autograder`, see __main__.py): check, release, grade, gradescope.

What is where (see each module's docstring):
- spec.py: the test format (Lab, Exercise, Case); labs/: one module per lab with its exercises and cases.
- codec.py: the safe, non-pickle wire format for inputs and results; compare.py: comparisons with written
  tolerances; runner.py: running and judging cases (parent side and learner side).
- selfcheck.py: `check` and `pick` for notebooks; notebook.py: finding exercise cells in a notebook file.
- isolate.py + child.py: running exercise cells in a child process; sandbox.py + warden.py: the child's
  limits, scratch directory, namespaces and clean-up; hiding.py: hiding reference symbols from learner code.
- grade.py: batch grading; gradebook.py: grades.csv, results.json, feedback.md; gradescope.py: the
  Gradescope zip; release.py: learner notebooks from the solution notebooks.
"""

__all__ = ["check", "pick"]


def __getattr__(name: str):
    """`check` and `pick` load the labs when first used, so the grading child (which sees no autograder/labs)
    can import this package."""
    if name in __all__:
        from . import selfcheck

        return getattr(selfcheck, name)
    raise AttributeError(f"module 'autograder' has no attribute {name!r}")
