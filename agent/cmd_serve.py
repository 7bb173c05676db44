"""`ds4-agent serve`: an OpenAI- and Anthropic-compatible HTTP API over the local model."""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

from ds4_agent.agent.cmd_common import add_numerics_option, fail


def register(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model", metavar="NAME|DIR", help="installed model name or directory (default model)"
    )
    p.add_argument(
        "--tokenizer", metavar="PATH", help="tokenizer.json (default: in the model directory)"
    )
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument("--ctx", type=int, default=100_000, metavar="N", help="context size in tokens")
    p.add_argument(
        "--kv-disk-dir",
        metavar="DIR",
        help="keep prefix KV snapshots and the tool-call replay map here",
    )
    p.add_argument(
        "--kv-disk-space-mb", type=int, default=4096, metavar="N", help="disk budget for snapshots"
    )
    p.add_argument(
        "--api-key",
        metavar="KEY",
        default=os.environ.get("DS4_API_KEY"),
        help="require this key (Bearer or x-api-key); mandatory off loopback (env DS4_API_KEY)",
    )
    p.add_argument("--name", default="deepseek-v4-flash", help="model id reported to clients")
    p.add_argument("--alias", action="append", default=[], help="extra model id to accept")
    add_numerics_option(p)
    p.add_argument("--nothink", action="store_true", help="OpenAI requests default to no thinking")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ds4_agent.agent.server_runtime import check_bind

    try:
        check_bind(args.host, args.api_key)
    except ValueError as e:
        return fail(str(e), 2)
    if args.ctx < 256:
        return fail("--ctx must be at least 256 tokens", 2)
    from ds4_agent.engine.model_registry import RegistryError, resolve_model

    try:
        model_dir = resolve_model(args.model)  # a name, a directory, or the default model
    except RegistryError as e:
        return fail(str(e))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")

    from ds4_agent.agent.server_runtime import build_server, load_tokenizer, run_server
    from ds4_agent.engine.generate import Engine

    try:
        tokenizer = load_tokenizer(model_dir, Path(args.tokenizer) if args.tokenizer else None)
        engine = Engine.load(model_dir, numerics=args.numerics)
    except (OSError, ValueError) as e:
        return fail(f"cannot load the model from {model_dir}: {e}")
    server = build_server(
        engine,
        tokenizer,
        model_name=args.name,
        ctx=args.ctx,
        kv_disk_dir=Path(args.kv_disk_dir).expanduser() if args.kv_disk_dir else None,
        kv_disk_space_mb=args.kv_disk_space_mb,
        api_key=args.api_key,
        default_thinking=not args.nothink,
        aliases=args.alias,
    )
    run_server(server, args.host, args.port)
    return 0
