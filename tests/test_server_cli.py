"""`ds4-agent serve` as a user runs it: a separate process, SIGINT, snapshot on shutdown."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from tiny_model import REAL_VOCAB, build_tiny_model


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_serve_refuses_public_bind_without_key() -> None:
    r = subprocess.run(
        [sys.executable, "-m", "ds4_agent.agent.cli", "serve", "--host", "0.0.0.0", "--model", "x"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 2
    assert "without --api-key" in r.stderr and len(r.stderr.strip().splitlines()) == 1


@pytest.mark.slow
def test_serve_process_answers_and_snapshots_on_sigint(
    tokenizer_json: Path, tmp_path: Path
) -> None:
    model = build_tiny_model("window", vocab=REAL_VOCAB)
    port = _free_port()
    kv = tmp_path / "kv"
    cmd = [
        sys.executable, "-m", "ds4_agent.agent.cli", "serve",
        "--model", str(model), "--tokenizer", str(tokenizer_json),
        "--port", str(port), "--ctx", "2048", "--kv-disk-dir", str(kv), "--name", "tiny",
    ]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            assert proc.poll() is None, proc.stdout.read()
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "server did not come up"
            time.sleep(0.3)
        assert httpx.get(url + "/v1/models").json()["data"][0]["id"] == "tiny"
        words = " ".join(f"w{i}" for i in range(400))  # long enough to be worth a snapshot
        r = httpx.post(
            url + "/v1/chat/completions",
            json={
                "model": "tiny",
                "messages": [{"role": "user", "content": words}],
                "max_tokens": 3,
                "thinking": {"type": "disabled"},
            },
            timeout=300,
        )
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["prompt_tokens"] > 512
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            out, _ = proc.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
    assert proc.returncode in (0, -signal.SIGINT, 130), out
    assert "snapshot (shutdown)" in out
    assert any((kv / "snapshots").rglob("*.snap")), os.listdir(kv)
