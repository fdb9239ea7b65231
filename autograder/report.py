"""Plain-text tables of results, the same in a notebook cell and in a terminal."""

from __future__ import annotations

import textwrap

from .runner import ExerciseResult

FEEDBACK_WIDTH = 100


def points(value: float) -> str:
    return f"{value:g}"


def format_results(results: list[ExerciseResult], title: str = "") -> str:
    """A table: exercise, test, points, result, then the feedback of each failed test on the lines below it."""
    rows = [("exercise", "test", "points", "result")]
    feedback: dict[int, str] = {}
    for result in results:
        shown = set()  # the same message for several tests of one exercise is printed once
        for case in result.cases:
            rows.append((result.exercise, case.case, f"{points(case.points)}/{points(case.max_points)}", case.status))
            if case.feedback and not case.passed and case.feedback not in shown:
                feedback[len(rows) - 1] = case.feedback
                shown.add(case.feedback)
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    lines = [title] if title else []
    for index, row in enumerate(rows):
        lines.append("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())
        if index == 0:
            lines.append("  ".join("-" * width for width in widths))
        if index in feedback:
            lines.extend(textwrap.wrap(feedback[index], FEEDBACK_WIDTH, initial_indent="    ",
                                       subsequent_indent="    ", break_long_words=True))
    for result in results:
        if result.note:
            lines.append(f"note: {result.exercise}: {result.note}")
    score = sum(result.score for result in results)
    maximum = sum(result.max_score for result in results)
    lines.append(f"total: {points(score)}/{points(maximum)}" + ("  -- full marks" if score == maximum else ""))
    return "\n".join(lines)
