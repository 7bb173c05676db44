"""`ds4-agent doctor`: what this machine can run."""

from __future__ import annotations

import argparse
import platform
import sys


def _doctor(args: argparse.Namespace) -> int:
    print(f"python   {sys.version.split()[0]} on {platform.system()} {platform.machine()}")
    try:
        import mlx.core as mx

        print(f"mlx      {mx.__version__}, default device {mx.default_device()}")
    except Exception as e:  # noqa: BLE001 - report any import failure verbatim
        print(f"mlx      not importable: {e}")
    return 0


def register(p: argparse.ArgumentParser) -> None:
    p.set_defaults(func=_doctor)
