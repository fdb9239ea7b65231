"""`python -m reference.server ...`: the same as `python -m reference serve ...`."""

from __future__ import annotations

import argparse
import sys

from .cli import add_serve_arguments, run_serve


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m reference.server",
                                     description="An OpenAI-compatible server for the nano-vLLM Labs engine.")
    add_serve_arguments(parser)
    args = parser.parse_args(argv)
    try:
        run_serve(args)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
