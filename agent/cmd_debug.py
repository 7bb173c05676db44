"""`ds4-agent debug …`: engine and protocol diagnostics.

The flags here are a stable contract (users and bug reports depend on them). Handlers live in
`debug_protocol.py` (tokenizer, chat encoding, DSML parsing) and `debug_engine.py` (logits),
imported only when the command runs.
"""

from __future__ import annotations

import argparse

from ds4_agent.agent.cmd_common import add_numerics_option


def _lazy(module: str, func: str):
    def handler(args: argparse.Namespace) -> int:
        import importlib

        return getattr(importlib.import_module(f"ds4_agent.agent.{module}"), func)(args)

    return handler


def register(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="cmd", metavar="COMMAND")

    s = sub.add_parser("tokenize", help="tokenize text to a JSON id list")
    s.add_argument(
        "--tokenizer",
        required=True,
        metavar="PATH",
        help="tokenizer.json, a model directory, or a .gguf file",
    )
    s.add_argument(
        "--trusted",
        action="store_true",
        help="parse special-token strings (prompt scaffolding); default: plain text",
    )
    src = s.add_mutually_exclusive_group(required=True)
    src.add_argument("--text", metavar="T")
    src.add_argument("--file", metavar="F")
    s.set_defaults(func=_lazy("debug_protocol", "cmd_tokenize"))

    s = sub.add_parser("render", help="render a chat request to the exact prompt text")
    s.add_argument("request", metavar="REQUEST.json")
    s.set_defaults(func=_lazy("debug_protocol", "cmd_render"))

    s = sub.add_parser("parse", help="parse a model completion into a JSON message")
    s.add_argument("--thinking-mode", choices=["chat", "thinking"], default="thinking")
    s.add_argument("file", metavar="FILE")
    s.set_defaults(func=_lazy("debug_protocol", "cmd_parse"))

    s = sub.add_parser("logits", help="write float32 logits [T, vocab] for a token file")
    s.add_argument("--model", required=True, metavar="DIR")
    s.add_argument("--tokens-file", required=True, metavar="F.json")
    add_numerics_option(s)
    s.add_argument("--chunk", type=int, default=None, metavar="N", help="prefill chunk size")
    s.add_argument("--save-state", metavar="FILE")
    s.add_argument("--load-state", metavar="FILE")
    s.add_argument("--out", required=True, metavar="OUT.npy")
    s.set_defaults(func=_lazy("debug_engine", "cmd_logits"))
