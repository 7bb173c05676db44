"""Small helpers shared by the command modules."""

from __future__ import annotations

import sys


class CommandError(Exception):
    """A failure the user can fix: printed as one line, exit status 1."""


def fail(message: str, code: int = 1) -> int:
    print(f"ds4-agent: {message}", file=sys.stderr)
    return code


# The engine's numerics modes (engine/model.py NUMERICS; a test keeps the two equal). Spelled
# out here so that building the CLI parser does not import MLX.
NUMERICS_CHOICES = ("official", "exact", "bf16")
NUMERICS_HELP = (
    "official (default: the reference's FP8/FP4 KV rounding), exact (float32 everywhere), "
    "bf16 (official + bf16 inputs to quantized matmuls: the fast mode on GPUs)"
)


def add_numerics_option(p) -> None:
    p.add_argument("--numerics", choices=NUMERICS_CHOICES, default="official", help=NUMERICS_HELP)
