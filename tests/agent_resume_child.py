"""Run one headless turn on an existing session in a fresh process (resume test helper).

usage: python agent_resume_child.py TOKENIZER_JSON SESSION SCRIPT_JSON OUT_DIR
Prints the headless JSON result; writes the logits the sampler saw to OUT_DIR/logits.npy.
"""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path

import numpy as np
from agent_harness import engine, model_dir, tokenizer
from ds4_agent.agent.cli import _agent_parser
from ds4_agent.agent.cmd_run import Runtime, run
from ds4_agent.agent.kvstate import KVSnapshots
from ds4_agent.agent.wiring import open_snapshot_store
from ds4_agent.engine.sampling import ScriptedSampler


def _kv():
    store = open_snapshot_store()
    assert store is not None, "the snapshot store failed to import or open"
    return KVSnapshots(engine(), store)


def main() -> int:
    tok_path, session, script_path, out_dir = sys.argv[1:5]
    tok = tokenizer(Path(tok_path))
    sampler = ScriptedSampler(json.loads(Path(script_path).read_text()), keep_logits=True)
    rt = Runtime(engine(), tok, None, _kv(), model_dir())
    args = _agent_parser().parse_args(["-p", "second", "-r", session, "--output-format", "json"])
    out = io.StringIO()
    code = run(args, runtime=rt, sampler=sampler, out=out, stdin=io.StringIO(""))
    np.save(Path(out_dir) / "logits.npy", np.stack(sampler.seen_logits))
    sys.stdout.write(out.getvalue())
    return code


if __name__ == "__main__":
    sys.exit(main())
