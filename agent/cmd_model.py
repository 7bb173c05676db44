"""`ds4-agent model …`: download, convert and inspect models."""

from __future__ import annotations

import argparse

from ds4_agent.agent.cmd_common import fail


def _todo(args: argparse.Namespace) -> int:
    return fail(f"`model {args.cmd}` is not available in this build yet")


def register(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="cmd", metavar="COMMAND")
    for name, help_ in [
        ("download", "download a model tier"),
        ("convert", "convert an official checkpoint or a ds4 GGUF into an MLX tier"),
        ("list", "list installed models"),
    ]:
        s = sub.add_parser(name, help=help_)
        s.set_defaults(func=_todo)
