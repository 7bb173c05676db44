"""The `ds4-agent` command line.

`ds4-agent [flags]` runs the agent itself; the first word may instead name a command group
(`sessions`, `model`, `debug`, `bench`, `doctor`, `serve`). Each group lives in its own
`cmd_*.py` module exposing `register(subparsers)`; handlers import heavy modules (MLX,
torch-free engine code) lazily so that `--help` stays instant.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from ds4_agent.agent import cmd_bench, cmd_debug, cmd_doctor, cmd_model, cmd_serve, cmd_sessions
from ds4_agent.agent.version import package_version

GROUPS = {
    "sessions": (cmd_sessions, "list, show, rename, fork, export and remove named sessions"),
    "model": (cmd_model, "download, convert and inspect models"),
    "debug": (cmd_debug, "engine and protocol diagnostics (tokenize, render, parse, logits)"),
    "bench": (cmd_bench, "measure prefill/decode speed and memory"),
    "doctor": (cmd_doctor, "check this machine: backend, memory, disk, installed models"),
    "serve": (cmd_serve, "OpenAI- and Anthropic-compatible HTTP API over the local model"),
}

# Exit codes (documented in the README; agent/headless.py defines the same set): 0 ok,
# 1 runtime failure, 2 usage error, 3 turn or limit reached (headless), 130 interrupted.
EXIT_OK, EXIT_FAILURE, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130


class UsageError(Exception):
    """Raised instead of argparse's print-usage-and-exit, so the CLI prints one line."""


class Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(f"{self.prog}: {message} (see `{self.prog} --help`)")


def _agent_parser() -> Parser:
    epilog_lines = ["command groups:"]
    epilog_lines += [f"  {name:<10} {help_}" for name, (_, help_) in GROUPS.items()]
    epilog_lines.append("\nRun `ds4-agent GROUP --help` for a group's commands.")
    p = Parser(
        prog="ds4-agent",
        description="A private, offline coding agent running DeepSeek V4 Flash in-process.",
        epilog="\n".join(epilog_lines),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--version", action="version", version=f"ds4-agent {package_version()}")
    p.add_argument("--model", metavar="DIR", help="model directory or registered model name")
    p.add_argument(
        "-p",
        "--print",
        dest="prompt",
        metavar="TASK",
        help="run headless on TASK ('-' reads stdin) and exit",
    )
    p.add_argument("-f", "--file", dest="task_file", metavar="FILE", help="read the task from FILE")
    p.add_argument("-n", "--name", help="name of a new session")
    p.add_argument(
        "-c",
        "--continue",
        dest="continue_",
        action="store_true",
        help="continue the latest session in this repository",
    )
    p.add_argument(
        "-r",
        "--resume",
        nargs="?",
        const="",
        metavar="NAME|ID",
        help="resume a session (picker when no name)",
    )
    p.add_argument("--fork-session", action="store_true", help="fork the resumed session")
    p.add_argument("--output-format", choices=["text", "json", "stream-json"], default="text")
    p.add_argument("--ctx", type=int, metavar="N", help="context size in tokens")
    p.add_argument(
        "--max-turns", type=int, metavar="N", help="at most N tool rounds for the task (exit 3)"
    )
    p.add_argument(
        "--permission-mode",
        metavar="MODE",
        help="read-only | ask | auto-edit | full-auto (Claude Code names accepted)",
    )
    p.add_argument(
        "--allow", action="append", metavar="RULE", help="allow rule, e.g. 'Bash(npm test)'"
    )
    p.add_argument(
        "--deny", action="append", metavar="RULE", help="deny rule, e.g. 'Bash(git push:*)'"
    )
    think = p.add_mutually_exclusive_group()
    think.add_argument(
        "--think",
        dest="thinking_mode",
        action="store_const",
        const="thinking",
        help="reason first (default)",
    )
    think.add_argument(
        "--nothink",
        dest="thinking_mode",
        action="store_const",
        const="chat",
        help="answer without reasoning",
    )
    think.add_argument(
        "--think-max",
        dest="thinking_mode",
        action="store_const",
        const="max",
        help="maximum reasoning effort",
    )
    return p


def build_group_parser(name: str) -> Parser:
    module, help_ = GROUPS[name]
    p = Parser(prog=f"ds4-agent {name}", description=help_)
    module.register(p)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if argv and argv[0] in GROUPS:
            args = build_group_parser(argv[0]).parse_args(argv[1:])
            if not hasattr(args, "func"):
                build_group_parser(argv[0]).print_help()
                return EXIT_USAGE
            return int(args.func(args) or 0)
        args = _agent_parser().parse_args(argv)
        from ds4_agent.agent import cmd_run

        return int(cmd_run.run(args) or 0)
    except UsageError as e:
        print(str(e), file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("ds4-agent: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
