"""`ds4-agent bench`: prefill/decode speed, memory and achieved bandwidth."""

from __future__ import annotations

import argparse

from ds4_agent.agent.cmd_common import fail


def _todo(args: argparse.Namespace) -> int:
    return fail("`bench` is not available in this build yet")


def register(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", metavar="DIR")
    p.set_defaults(func=_todo)
