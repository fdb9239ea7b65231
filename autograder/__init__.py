"""The nano-vLLM Labs autograder (self-check for learners, batch grading for instructors).

Being built: see the project's issue "Autograder". This package exists now so the project installs both
packages from the start.

What is here (see each module's docstring):
- spec.py: the test format (Lab, Exercise, Case); labs/lab0_1.py: lab 0.1's exercises and their cases.
- codec.py: the safe, non-pickle wire format for inputs and results; compare.py: comparisons with written
  tolerances; runner.py: running cases (parent side and learner side).
- selfcheck.py: `check` and `pick` for notebooks; isolate.py + child.py: checking a notebook file in a child
  process (`python -m autograder check LAB [NOTEBOOK]`); release.py: `python -m autograder release`.
"""

from .selfcheck import check, pick

__all__ = ["check", "pick"]
