"""Resume in a new process: the history is restored from the KV snapshot with zero prefill,
and the model's next logits are exactly those of the run that never stopped."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from agent_harness import engine, script, system_tokens, tokenizer
from ds4_agent.agent.cmd_sessions import store_for
from ds4_agent.agent.headless import ResultMessage
from ds4_agent.agent.kvstate import KVSnapshots
from ds4_agent.agent.loop import Agent, LoopConfig
from ds4_agent.agent.runtime import autosave, start
from ds4_agent.agent.wiring import open_snapshot_store
from ds4_agent.engine.sampling import ScriptedSampler

pytestmark = pytest.mark.slow
HERE = Path(__file__).parent


def test_resume_in_a_new_process_matches_the_uninterrupted_run(
    tmp_path, monkeypatch, tokenizer_json
):
    monkeypatch.setenv("DS4_AGENT_HOME", str(tmp_path / "home"))
    root = tmp_path / "repo"
    root.mkdir()
    subprocess.run(["git", "init", "-q", str(root)], check=True)
    monkeypatch.chdir(root)
    tok = tokenizer(tokenizer_json)
    kv = KVSnapshots(engine(), open_snapshot_store())

    first = script(tok, "Think a bit.</think>First answer.")
    second = script(tok, "More.</think>Second answer.")
    store = store_for()
    s = store.create("main")
    sampler = ScriptedSampler(first + second, keep_logits=True)
    a = Agent(engine(), tok, None, s, sampler=sampler, config=LoopConfig(ctx_limit=4096))
    start(a, kv, system_tokens(tok))
    assert a.run_turn("first").answer == "First answer."
    autosave(a, kv)
    history = len(a.tokens)
    store.fork("main", "copy")  # the new process continues the copy; this one goes on

    # The run that never stopped: the next user turn in this very process.
    assert a.run_turn("second").answer == "Second answer."
    live = np.stack(sampler.seen_logits[len(first) :])

    script_file = tmp_path / "script.json"
    script_file.write_text(json.dumps(second))
    out = tmp_path / "child"
    out.mkdir()
    env = {**os.environ, "PYTHONPATH": str(HERE) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    r = subprocess.run(
        [
            sys.executable,
            str(HERE / "agent_resume_child.py"),
            str(tokenizer_json),
            "copy",
            str(script_file),
            str(out),
        ],
        capture_output=True,
        text=True,
        env=env,
        cwd=root,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr
    res = ResultMessage.model_validate_json(r.stdout.strip().splitlines()[-1])
    assert res.result == "Second answer."
    assert res.kv_restored and res.restored_tokens == history
    user_turn = store_for().resolve("copy").transcript.entries[-2]
    assert res.prefill_tokens == len(user_turn.tokens)  # nothing of the history was prefilled
    resumed = np.load(out / "logits.npy")
    assert resumed.shape == live.shape
    np.testing.assert_array_equal(resumed, live)
    # The original session is untouched by the copy's new turn.
    assert store_for().resolve("main").transcript.tokens() == a.tokens
