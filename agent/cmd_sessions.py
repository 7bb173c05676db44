"""`ds4-agent sessions …`: manage named sessions."""

from __future__ import annotations

import argparse

from ds4_agent.agent.cmd_common import fail


def _todo(args: argparse.Namespace) -> int:
    return fail(f"`sessions {args.cmd}` is not available in this build yet")


def register(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="cmd", metavar="COMMAND")
    for name, help_ in [
        ("list", "list sessions of this repository"),
        ("show", "show one session"),
        ("rm", "remove a session"),
        ("rename", "rename a session"),
        ("fork", "fork a session"),
        ("export", "export a session transcript"),
    ]:
        s = sub.add_parser(name, help=help_)
        s.add_argument("--format", choices=["text", "json"], default="text")
        s.set_defaults(func=_todo)
