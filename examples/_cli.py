"""Command-line helpers shared by the example scripts (each runs as `python examples/<name>.py`,
which puts this folder on sys.path)."""

from __future__ import annotations

import sys


def command_args(argv: list[str] | None) -> list[str]:
    """The command-line arguments, without --out and its value (for the results file)."""
    args = list(sys.argv[1:] if argv is None else argv)
    out = []
    skip = False
    for a in args:
        if skip:
            skip = False
        elif a == "--out":
            skip = True
        elif not a.startswith("--out="):
            out.append(a)
    return out
