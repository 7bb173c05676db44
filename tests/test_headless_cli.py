"""The installed command itself: `ds4-agent -p … --output-format json` in a subprocess loads
the model directory (weights + tokenizer.json), the snapshot store and the sessions, then
resumes with `-c` from the snapshot. Only the sampler is scripted (DS4_AGENT_SCRIPT)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from agent_harness import model_dir, script, tokenizer
from ds4_agent.agent.headless import ResultMessage

pytestmark = pytest.mark.slow


def test_cli_headless_run_and_continue(tmp_path, tokenizer_json):
    model = tmp_path / "model"
    model.mkdir()
    for f in model_dir().iterdir():
        (model / f.name).symlink_to(f)
    (model / "tokenizer.json").symlink_to(tokenizer_json)
    repo = tmp_path / "repo"
    repo.mkdir()
    subprocess.run(["git", "init", "-q", str(repo)], check=True)
    tok = tokenizer(tokenizer_json)
    env = {
        **os.environ,
        "DS4_AGENT_HOME": str(tmp_path / "home"),
        "DS4_AGENT_MODEL": str(model),
        "DS4_AGENT_TOOLS": "none",
    }

    def cli(*args: str, answer: str) -> tuple[int, ResultMessage]:
        (tmp_path / "script.json").write_text(json.dumps(script(tok, "</think>" + answer)))
        env["DS4_AGENT_SCRIPT"] = str(tmp_path / "script.json")
        r = subprocess.run(
            [sys.executable, "-m", "ds4_agent.agent.cli", *args, "--output-format", "json"],
            cwd=repo,
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert r.stdout.strip(), r.stderr
        return r.returncode, ResultMessage.model_validate_json(r.stdout.strip().splitlines()[-1])

    code, first = cli("-p", "hello", "-n", "cli", answer="Hi.")
    assert code == 0 and first.result == "Hi." and first.session_name == "cli"
    code, second = cli("-p", "more", "-c", answer="More.")
    assert code == 0 and second.result == "More." and second.session_id == first.session_id
    assert second.kv_restored and second.restored_tokens > first.prefill_tokens
    assert second.prefill_tokens < 10  # only the new user turn

    r = subprocess.run(
        [sys.executable, "-m", "ds4_agent.agent.cli", "sessions", "list", "--format", "json"],
        cwd=repo,
        env=env,
        capture_output=True,
        text=True,
    )
    [row] = json.loads(r.stdout)
    assert row["name"] == "cli" and row["n_turns"] == 2 and row["has_snapshot"]
