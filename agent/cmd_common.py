"""Small helpers shared by the command modules."""

from __future__ import annotations

import sys


class CommandError(Exception):
    """A failure the user can fix: printed as one line, exit status 1."""


def fail(message: str, code: int = 1) -> int:
    print(f"ds4-agent: {message}", file=sys.stderr)
    return code
