"""`ds4-agent model download` against a local server in the Hub's HTTP layout (HF_ENDPOINT).

download → verify → convert → load, resume after a killed process, corrupted files, gated and
missing repositories, the free-disk check, and the registry that `ds4-agent` resolves.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from ds4_agent.agent.cli import main
from ds4_agent.engine import download as dl
from ds4_agent.engine import model_registry as mr
from gguf_fixture import write_tiny_gguf
from hub_server import HubServer, Repo

Q2 = dl.GGUF_FILES["q2"]


@pytest.fixture
def hub(monkeypatch, tmp_path):
    server = HubServer().start()
    monkeypatch.setenv("HF_ENDPOINT", server.url)
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))  # no token from the user's files
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("DS4_AGENT_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("DS4_AGENT_MODEL", raising=False)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def tiny_q2(tmp_path_factory) -> bytes:
    return write_tiny_gguf(tmp_path_factory.mktemp("g") / "t.gguf", "q2").read_bytes()


def _gguf_repo(data: bytes, **kw) -> Repo:
    return Repo({Q2: data, "README.md": b"# tiny\n", ".gitattributes": b"*.gguf lfs\n"}, **kw)


def _logits(model_dir: Path) -> np.ndarray:
    from ds4_agent.engine.generate import Engine

    engine = Engine.load(model_dir)
    return np.array(engine.prefill(engine.new_state(), [5, 17, 42, 99]), dtype=np.float64)


def test_gguf_download_verify_convert_load(hub, tiny_q2, tmp_path, capsys):
    hub.repos["antirez/deepseek-v4-gguf"] = _gguf_repo(tiny_q2)
    root = tmp_path / "install"
    assert main(["model", "download", "q2", "--dir", str(root), "-q"]) == 0
    out = capsys.readouterr()
    assert "installed flash-q2: q2 from gguf" in out.out and "(default)" in out.out
    assert "verified 1 file(s) (sha256)" in out.err
    assert "routed_experts       rel. error" in out.err and "attention            exact" in out.err
    # Only the selected file was fetched, and at the commit the metadata call returned.
    gets = hub.requests("GET", "/resolve/")
    assert [r["path"].rsplit("/", 1)[1] for r in gets] == [Q2]
    assert hub.repos["antirez/deepseek-v4-gguf"].sha in gets[0]["path"]
    model_dir = mr.resolve_model()  # what `ds4-agent` without --model runs
    assert model_dir == (root / "mlx").resolve()
    assert not (root / "download").exists()  # source removed after a good conversion
    cfg = json.loads((model_dir / "config.json").read_text())
    assert cfg["ds4_mlx"]["tier"] == "q2"
    assert np.isfinite(_logits(model_dir)).all()
    # A rerun finds the installed model and fetches nothing, though the source is gone.
    hub.log.clear()
    assert main(["model", "download", "q2", "--dir", str(root), "-q"]) == 0
    assert "already installed" in capsys.readouterr().out
    assert hub.log == []
    assert main(["model", "list"]) == 0
    assert "flash-q2" in capsys.readouterr().out


@pytest.mark.slow
def test_official_download_to_lossless_matches_the_checkpoint(hub, tmp_path, request):
    from tiny_model import build_tiny_model, cache_root

    ckpt = build_tiny_model("quant", cache_root=cache_root(request))
    files = {p.name: p.read_bytes() for p in ckpt.iterdir() if p.is_file()}
    files["README.md"] = b"official\n"
    files["inference/model.py"] = b"# not needed for conversion\n"
    hub.repos["deepseek-ai/DeepSeek-V4-Flash"] = Repo(files)
    root = tmp_path / "official"
    assert main(["model", "download", "lossless", "--dir", str(root), "-q"]) == 0
    fetched = {r["path"].rsplit("/", 1)[1] for r in hub.requests("GET", "/resolve/")}
    assert fetched == {n for n in files if n.endswith((".safetensors", ".json"))}
    model_dir = mr.resolve_model("flash-lossless")
    np.testing.assert_array_equal(_logits(model_dir), _logits(ckpt))


def test_interrupted_download_resumes_where_it_stopped(hub, tiny_q2, tmp_path):
    # huggingface_hub writes in 10 MiB pieces; pad the file so a throttled transfer is killed
    # after the first piece landed and well before the end.
    big = tiny_q2 + b"\0" * (40 << 20)
    hub.repos["antirez/deepseek-v4-gguf"] = _gguf_repo(big)
    hub.throttle[Q2] = 0.005  # ≈ 12 MiB/s
    dest = tmp_path / "install"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent)}
    cmd = [sys.executable, "-m", "ds4_agent.agent.cli", "model", "download", "q2"]
    cmd += ["--dir", str(dest), "--no-convert", "-q"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    part = dest / "download" / f"{Q2}.part"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not (part.is_file() and part.stat().st_size >= 10 << 20):
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    have = part.stat().st_size
    assert 0 < have < len(big), "the transfer was not interrupted mid-file"
    hub.throttle.clear()
    assert main(["model", "download", "q2", "--dir", str(dest), "--no-convert", "-q"]) == 0
    final = dest / "download" / Q2
    assert final.read_bytes() == big and not part.exists()
    ranges = [r["range"] for r in hub.requests("GET", "/resolve/")]
    assert ranges[-1] == f"bytes={have}-"  # continued, not restarted
    # Once verified, a rerun neither fetches nor re-hashes (size + mtime remembered).
    hub.log.clear()
    assert main(["model", "download", "q2", "--dir", str(dest), "--no-convert", "-q"]) == 0
    assert hub.requests("GET", "/resolve/") == []


def test_corrupted_files_are_detected_and_deleted(hub, tiny_q2, tmp_path, capsys):
    bad = bytearray(tiny_q2)
    bad[len(bad) // 2] ^= 0xFF
    hub.repos["antirez/deepseek-v4-gguf"] = _gguf_repo(tiny_q2, corrupt={Q2: bytes(bad)})
    dest = tmp_path / "install"
    assert main(["model", "download", "q2", "--dir", str(dest), "-q"]) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]  # progress lines come before
    assert err.startswith("ds4-agent: ")
    assert "sha256" in err and "does not match the published" in err and "deleted" in err
    assert not (dest / "download" / Q2).exists()
    assert not (dest / "download" / f"{Q2}.part").exists()
    assert mr.load_registry().models == {}


def test_small_files_are_checked_against_their_git_blob_id(hub, tmp_path):
    repo = Repo({Q2: b"x" * 10})  # below the LFS threshold: only the blob id is published
    repo.corrupt[Q2] = b"y" * 10
    hub.repos["antirez/deepseek-v4-gguf"] = repo
    plan = dl.plan_download("q2")
    assert plan.files[0].sha256 is None and plan.files[0].blob_id
    with pytest.raises(dl.DownloadError, match="git sha1 .* does not match"):
        dl.download(plan, tmp_path / "d", quiet=True)


def test_gated_and_missing_repositories_say_what_to_do(hub, tiny_q2, tmp_path, capsys):
    assert main(["model", "download", "q2", "--dir", str(tmp_path / "a"), "-q"]) == 1
    err = capsys.readouterr().err
    assert "antirez/deepseek-v4-gguf was not found" in err and "hf auth login" in err
    hub.repos["antirez/deepseek-v4-gguf"] = _gguf_repo(tiny_q2, gated=True)
    assert main(["model", "download", "q2", "--dir", str(tmp_path / "a"), "-q"]) == 1
    err = capsys.readouterr().err
    assert "is gated: accept its terms" in err and "HF_TOKEN" in err
    # With a token the same repository downloads, and the token is what was sent.
    args = ["model", "download", "q2", "--dir", str(tmp_path / "a"), "-q", "--no-convert"]
    hub.log.clear()
    assert main([*args, "--token", "hf_test_token"]) == 0
    assert {r["auth"] for r in hub.requests("GET")} == {"Bearer hf_test_token"}


def test_lossless_from_gguf_and_mtp_from_official_are_refused(hub, capsys):
    assert main(["model", "download", "lossless", "--from", "gguf", "-q"]) == 1
    assert "use --from official" in capsys.readouterr().err
    assert main(["model", "download", "mtp", "--from", "official", "-q"]) == 1
    assert "MTP block inside" in capsys.readouterr().err


def test_free_disk_is_checked_before_anything_is_fetched(
    hub, tiny_q2, tmp_path, monkeypatch, capsys
):
    hub.repos["antirez/deepseek-v4-gguf"] = _gguf_repo(tiny_q2)
    monkeypatch.setattr(dl, "free_bytes", lambda path: 1000)
    assert main(["model", "download", "q2", "--dir", str(tmp_path / "x"), "-q"]) == 1
    err = capsys.readouterr().err
    assert "GiB free in" in err and "--dir on a larger disk" in err
    assert hub.requests("GET", "/resolve/") == []


def test_mtp_is_registered_as_a_component_not_a_default_model(hub, tiny_q2, tmp_path):
    hub.repos["antirez/deepseek-v4-gguf"] = Repo({dl.GGUF_FILES["mtp"]: tiny_q2})
    assert main(["model", "download", "mtp", "--dir", str(tmp_path / "m"), "-q"]) == 0
    reg = mr.load_registry()
    assert reg.models["flash-mtp"].kind == "mtp" and reg.default is None
    assert main(["model", "remove", "flash-mtp", "--delete-files"]) == 0
    assert not (tmp_path / "m").exists()


def test_files_over_the_hub_clients_plain_http_limit_still_download(
    hub, tiny_q2, tmp_path, monkeypatch
):
    # huggingface_hub will not *start* plain-HTTP downloads over 50 GB (ds4's q2 file is 87 GB);
    # the transfer must still work, verified by size and sha256 afterwards.
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "MAX_HTTP_DOWNLOAD_SIZE", 1000)
    hub.repos["antirez/deepseek-v4-gguf"] = _gguf_repo(tiny_q2)
    plan = dl.plan_download("q2")
    res = dl.download(plan, tmp_path / "d", quiet=True)
    assert res.checks == {Q2: "sha256"}
    assert (tmp_path / "d" / Q2).read_bytes() == tiny_q2
