"""A progress bar of finished requests that shows the output throughput so far (LLM.generate, bench)."""

from __future__ import annotations

import sys
import time

from .outputs import RequestOutput


class ProgressBar:
    """tqdm over `total` requests; enabled=False makes every call a no-op. Use as a context manager."""

    def __init__(self, total: int, desc: str, enabled: bool = True) -> None:
        self.bar = None
        if enabled:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, desc=desc, unit="req", dynamic_ncols=True, file=sys.stderr)
        self.start = time.monotonic()
        self.output_tokens = 0

    def finished(self, output: RequestOutput) -> None:
        """One request finished: count it and its output tokens."""
        self.output_tokens += sum(len(c.token_ids) for c in output.outputs)
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix_str(f"{self.output_tokens / (time.monotonic() - self.start):.1f} out tok/s")

    def advance(self, count: int) -> None:
        if self.bar is not None:
            self.bar.update(count)

    def __enter__(self) -> "ProgressBar":
        return self

    def __exit__(self, *exc) -> None:
        if self.bar is not None:
            self.bar.close()
