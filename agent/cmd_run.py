"""The default command: run the agent (interactive, or headless with -p/-f)."""

from __future__ import annotations

import argparse

from ds4_agent.agent.cmd_common import fail


def run(args: argparse.Namespace) -> int:
    return fail("the interactive agent is not available in this build yet")
