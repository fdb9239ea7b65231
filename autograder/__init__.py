"""The nano-vLLM Labs autograder (self-check for learners, batch grading for instructors).

Being built: see the project's issue "Autograder". This package exists now so the project installs both
packages from the start.
"""
