"""`ds4-agent ARGS…` in a fresh process, on the tiny model with the test tokenizer.

usage: python agent_cli_child.py TOKENIZER_JSON [ARGS…]
The engine, tools, snapshot store and UI are the real ones; DS4_AGENT_SCRIPT (a JSON list of
token ids) forces the sampled tokens.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from agent_harness import engine, model_dir, tokenizer
from ds4_agent.agent.cli import _agent_parser
from ds4_agent.agent.cmd_run import Runtime, run
from ds4_agent.agent.kvstate import KVSnapshots
from ds4_agent.agent.wiring import build_tools, open_snapshot_store


def _kv():
    store = open_snapshot_store()
    assert store is not None, "the snapshot store failed to import or open"
    return KVSnapshots(engine(), store)


def main() -> int:
    tok = tokenizer(Path(sys.argv[1]))
    args = _agent_parser().parse_args(sys.argv[2:])
    rt = Runtime(
        engine(),
        tok,
        build_tools(Path(os.getcwd()), mode=args.permission_mode),
        _kv(),
        model_dir(),
    )
    return run(args, runtime=rt)


if __name__ == "__main__":
    sys.exit(main())
