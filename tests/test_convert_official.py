"""Official checkpoint → MLX tiers: lossless identity, q2 error, resume, safety checks, sizes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
import tiny_model
from ds4_agent.engine import convert as cv
from ds4_agent.engine import mlx_format
from ds4_agent.engine.convert_sizes import (
    FLASH_CONFIG,
    GIB,
    InsufficientMemoryError,
    check_memory_fit,
    fit,
    flash_entries,
    state_bytes_per_token,
)
from ds4_agent.engine.mlx_format import ConvertError
from ds4_agent.engine.qtensor import QuantizedTensor
from ds4_agent.engine.weights import load_official, load_weights

SHARD = 256 << 10  # many small shards so resume has something to resume


@pytest.fixture(scope="module")
def src() -> Path:
    return tiny_model.build_tiny_model("quant")


@pytest.fixture(scope="module")
def q2_dir(src: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("q2") / "model"
    cv.OfficialConverter(src, cv.ConvertOptions("q2", shard_bytes=SHARD)).run(out)
    return out


def _arrays(w) -> list[np.ndarray]:
    if isinstance(w, QuantizedTensor):
        parts = [w.weight, w.scales] + ([w.biases] if w.biases is not None else [])
        return [np.array(p) for p in parts]
    return [np.array(w.view(mx.uint16)) if w.dtype == mx.bfloat16 else np.array(w)]


def _convert(src: Path, out: Path, tier: str, **kw) -> cv.ConvertResult:
    kw.setdefault("shard_bytes", SHARD)
    return cv.OfficialConverter(src, cv.ConvertOptions(tier, **kw)).run(out)


def test_lossless_weights_identical_to_official_load(src: Path, tmp_path: Path) -> None:
    res = _convert(src, tmp_path / "m", "lossless")
    assert res.write.shards_total > 3
    official, converted = load_official(src), load_weights(tmp_path / "m")
    assert set(official) == set(converted)
    for name, w in official.items():
        c = converted[name]
        assert type(c) is type(w), name
        if isinstance(w, QuantizedTensor):
            assert (c.mode, c.bits, c.group_size) == (w.mode, w.bits, w.group_size), name
        else:
            assert c.dtype == w.dtype and c.shape == w.shape, name
        for a, b in zip(_arrays(w), _arrays(c), strict=True):
            assert a.dtype == b.dtype and np.array_equal(a, b), name
    assert all(e["exact"] for e in res.errors.values())
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    assert cfg["ds4_mlx"]["tier"] == "lossless"
    assert (
        cfg["compress_ratios"] == json.loads((src / "config.json").read_text())["compress_ratios"]
    )
    # q4 of an official checkpoint is the same plan (its experts already are 4-bit e2m1)
    tensors = cv.source_tensors(cv.Checkpoint(src).entries)
    assert cv.build_plan(tensors, "q4", 64) == cv.build_plan(tensors, "lossless", 64)


def test_tokenizer_files_are_copied(src: Path, tmp_path: Path) -> None:
    import shutil

    local = tmp_path / "src"
    shutil.copytree(src, local)
    (local / "tokenizer.json").write_text('{"model": {}}')
    (local / "tokenizer_config.json").write_text("{}")
    _convert(local, tmp_path / "m", "lossless")
    assert (tmp_path / "m" / "tokenizer.json").read_text() == '{"model": {}}'
    assert (tmp_path / "m" / "tokenizer_config.json").is_file()


def test_q2_formats_and_reported_error(src: Path, q2_dir: Path) -> None:
    w = load_weights(q2_dir)
    off = load_official(src)
    experts = w["layers.3.ffn.experts.w2.weight"]
    assert isinstance(experts, QuantizedTensor) and (experts.mode, experts.bits) == ("affine", 2)
    assert experts.shape == off["layers.3.ffn.experts.w2.weight"].shape
    head = w["head.weight"]
    assert isinstance(head, QuantizedTensor) and (head.mode, head.bits) == ("affine", 8)
    wq = w["layers.2.attn.wq_b.weight"]
    assert isinstance(wq, QuantizedTensor) and wq.mode == "mxfp8"  # FP8 stays exact
    report = json.loads((q2_dir / "config.json").read_text())["ds4_mlx"]["report"]
    errs = report["errors"]
    assert not errs["routed_experts"]["exact"] and errs["attention"]["exact"]
    # reported expert error is the measured one: recompute it from the stored weights
    sq_err = sq_ref = 0.0
    for name, q in w.items():
        if ".ffn.experts." in name:
            ref = np.array(off[name].dequantize(mx.float32), dtype=np.float64)
            got = np.array(q.dequantize(mx.float32), dtype=np.float64)
            sq_err += float(((got - ref) ** 2).sum())
            sq_ref += float((ref**2).sum())
    measured = (sq_err / sq_ref) ** 0.5
    assert abs(measured - errs["routed_experts"]["rel_err"]) < 1e-3 * measured
    assert 0.15 < measured < 0.4  # 2-bit affine on FP4 weights
    assert errs["head"]["rel_err"] < 0.01
    assert report["group_size"] in (32, 64, 128)
    print(f"q2 routed-expert rel. error {measured:.4f}, head {errs['head']['rel_err']:.5f}")


def test_importance_search_beats_round_to_nearest(src: Path, tmp_path: Path) -> None:
    rtn = _convert(src, tmp_path / "rtn", "q2", group_size=64, search=False)
    iw = _convert(src, tmp_path / "iw", "q2", group_size=64)
    a, b = rtn.errors["routed_experts"], iw.errors["routed_experts"]
    assert b["weighted_rel_err"] < 0.9 * a["weighted_rel_err"]
    print(
        f"q2 g64 weighted rel. error: round-to-nearest {a['weighted_rel_err']:.4f}, search {b['weighted_rel_err']:.4f}"
    )


def test_calibration_file_changes_the_weighting(src: Path, tmp_path: Path) -> None:
    cfg = json.loads((src / "config.json").read_text())
    h, e = cfg["hidden_size"], cfg["n_routed_experts"]
    rng = np.random.default_rng(0)
    energy = np.exp(rng.standard_normal((e, h)) * 2).astype(np.float32)
    calib = tmp_path / "calib.safetensors"
    mx.save_safetensors(str(calib), {"layers.3.ffn.experts.w1.weight": mx.array(energy)})
    plain = _convert(src, tmp_path / "a", "q2", group_size=64)
    cal = _convert(src, tmp_path / "b", "q2", group_size=64, calibration=calib)
    wa, wb = load_weights(tmp_path / "a"), load_weights(tmp_path / "b")
    name = "layers.3.ffn.experts.w1.weight"
    ref = np.array(load_official(src)[name].dequantize(mx.float32))
    err = {k: np.array(w[name].dequantize(mx.float32)) - ref for k, w in (("a", wa), ("b", wb))}
    weighted = {k: float((energy[:, None, :] * d**2).sum()) for k, d in err.items()}
    assert weighted["b"] < weighted["a"]  # optimised for the calibration's weighting
    assert plain.write.fingerprint != cal.write.fingerprint
    bad = tmp_path / "bad.safetensors"
    mx.save_safetensors(str(bad), {name: mx.zeros((3,))})
    with pytest.raises(ConvertError, match="expected"):
        _convert(src, tmp_path / "c", "q2", group_size=64, calibration=bad)


def _tree(d: Path) -> dict[str, object]:
    """Every file's bytes; the resume manifest compared as data (its key order records the
    order shards were finished in, which differs after a resume)."""
    out: dict[str, object] = {}
    for p in sorted(d.iterdir()):
        if p.is_file():
            out[p.name] = (
                json.loads(p.read_text()) if p.name == mlx_format.MANIFEST else p.read_bytes()
            )
    return out


def test_interrupted_conversion_resumes_to_identical_output(src: Path, tmp_path: Path) -> None:
    full = tmp_path / "full"
    _convert(src, full, "q2", group_size=64)
    out = tmp_path / "resumed"
    calls = {"n": 0}

    def stop_after(name: str, done: int, total: int) -> None:
        calls["n"] += 1
        if calls["n"] == 40:
            raise KeyboardInterrupt

    conv = cv.OfficialConverter(src, cv.ConvertOptions("q2", group_size=64, shard_bytes=SHARD))
    with pytest.raises(KeyboardInterrupt):
        conv.run(out, progress=stop_after)
    manifest = json.loads((out / mlx_format.MANIFEST).read_text())
    finished = len(manifest["shards"])
    assert finished >= 1 and not (out / "config.json").exists()
    # a shard torn by a crash: recorded but damaged → must be redone, not trusted
    first = sorted(manifest["shards"])[0]
    (out / first).write_bytes(b"garbage")
    (out / ".model-99999-of-99999.safetensors.tmp.safetensors").write_bytes(b"partial")
    res = _convert(src, out, "q2", group_size=64)
    assert res.write.shards_reused == finished - 1
    assert _tree(out) == _tree(full)
    # a rerun of a finished conversion reuses everything
    again = _convert(src, out, "q2", group_size=64)
    assert again.write.shards_reused == again.write.shards_total


@pytest.mark.slow
def test_killed_process_resumes(src: Path, tmp_path: Path) -> None:
    """SIGKILL the real CLI process once a shard is on disk, rerun, compare with a clean run."""
    script = (
        "import sys, argparse\n"
        "from ds4_agent.agent.model_convert import register_convert\n"
        "p = argparse.ArgumentParser(); s = p.add_subparsers(); register_convert(s)\n"
        "a = p.parse_args(sys.argv[1:]); sys.exit(a.func(a))\n"
    )
    args = [
        "convert",
        str(src),
        "--tier",
        "q2",
        "--group-size",
        "64",
        "--shard-size",
        str(64 / 1024**2),
    ]
    out = tmp_path / "killed"
    env = {**os.environ, "COLUMNS": "100"}
    proc = subprocess.Popen(
        [sys.executable, "-c", script, *args, "-o", str(out)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=env,
    )
    killed = False
    deadline = time.monotonic() + 120
    while proc.poll() is None and time.monotonic() < deadline:
        m = out / mlx_format.MANIFEST
        try:
            if m.is_file() and len(json.loads(m.read_text())["shards"]) >= 2:
                proc.send_signal(signal.SIGKILL)
                killed = True
                break
        except (json.JSONDecodeError, OSError):
            pass
        time.sleep(0.01)
    proc.wait()
    assert killed, "the conversion finished before it could be killed"
    assert not (out / "config.json").exists()
    rerun = subprocess.run(
        [sys.executable, "-c", script, *args, "-o", str(out)],
        capture_output=True,
        text=True,
        env=env,
    )
    assert rerun.returncode == 0, rerun.stderr
    assert "reused" in rerun.stderr
    clean = tmp_path / "clean"
    _convert(src, clean, "q2", group_size=64, shard_bytes=int(64 / 1024**2 * GIB))
    assert _tree(out) == _tree(clean)


def test_refuses_to_overwrite_a_different_model(src: Path, tmp_path: Path) -> None:
    out = tmp_path / "m"
    _convert(src, out, "lossless")
    with pytest.raises(ConvertError, match="different conversion"):
        _convert(src, out, "q2", group_size=64)
    _convert(src, out, "q2", group_size=64, overwrite=True)
    assert json.loads((out / "config.json").read_text())["ds4_mlx"]["tier"] == "q2"
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(ConvertError, match="not a ds4-agent conversion"):
        _convert(src, other, "lossless", overwrite=True)
    assert (other / "notes.txt").read_text() == "mine"


def test_checks_free_disk_first(src: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import shutil

    real = shutil.disk_usage
    monkeypatch.setattr(mlx_format.shutil, "disk_usage", lambda p: real(p)._replace(free=1 << 20))
    with pytest.raises(ConvertError, match="not enough free disk"):
        _convert(src, tmp_path / "m", "lossless")
    assert not list((tmp_path / "m").glob("*.safetensors"))


def test_bad_sources_are_clear_errors(tmp_path: Path, src: Path) -> None:
    with pytest.raises(Exception, match="no such model directory"):
        cv.OfficialConverter(tmp_path / "nope", cv.ConvertOptions("q2"))
    with pytest.raises(ConvertError, match="unknown tier"):
        cv.OfficialConverter(src, cv.ConvertOptions("q1"))
    _convert(src, tmp_path / "l", "lossless")
    with pytest.raises(ConvertError, match="already a converted MLX tier"):
        _convert(tmp_path / "l", tmp_path / "again", "q2")


# --------------------------------------------------------------------------------------------
# Real Flash shapes (no data)
# --------------------------------------------------------------------------------------------


def test_flash_dry_run_sizes_meet_targets() -> None:
    tensors = cv.source_tensors(flash_entries())
    params = sum(int(np.prod(t.shape)) for t in tensors)
    assert abs(params / 1e9 - (284.33 + 6.61)) < 0.05  # spec §4.1: model + MTP
    src_bytes = sum(e.nbytes for e in flash_entries().values())
    assert abs(src_bytes / GIB - 148.7) < 0.1
    g, table = cv.choose_group_size(tensors, "q2", {})
    assert g == 64 and table[32]["size_gib"] > 92
    q2 = cv.build_plan(tensors, "q2", g)
    lossless = cv.build_plan(tensors, "lossless", 32)
    assert cv.plan_bytes(q2) <= 92 * GIB and cv.plan_bytes(lossless) <= 150 * GIB
    for plan in (q2, lossless):
        assert cv.peak_ram_bound(plan) < 6 * GIB
    print(
        f"Flash: q2 {cv.plan_bytes(q2) / GIB:.2f} GiB, lossless {cv.plan_bytes(lossless) / GIB:.2f} GiB, "
        f"peak RAM ≤ {cv.peak_ram_bound(q2) / GIB:.2f} GiB"
    )


def test_cli_dry_run_prints_tiers(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import argparse

    monkeypatch.setenv("COLUMNS", "200")

    from ds4_agent.agent.model_convert import register_convert

    p = argparse.ArgumentParser()
    register_convert(p.add_subparsers())
    args = p.parse_args(["convert", "flash", "--tier", "q2", "--dry-run"])
    assert args.func(args) == 0
    err = capsys.readouterr().err
    assert "90.60 GiB" in err and "148.81 GiB" in err and "group size 64" in err
    assert "128 GB (context up to 1M tokens)" in err


def test_memory_fit(src: Path, tmp_path: Path) -> None:
    assert abs(state_bytes_per_token(FLASH_CONFIG) - 6880) < 1
    q2 = 90.6 * GIB
    assert fit(q2, FLASH_CONFIG, 128 * GIB).fits and not fit(q2, FLASH_CONFIG, 96 * GIB).fits
    assert fit(148.8 * GIB, FLASH_CONFIG, 192 * GIB).fits
    check_memory_fit(src, 4096, memory_bytes=64 * GIB)
    with pytest.raises(InsufficientMemoryError, match="smaller tier"):
        check_memory_fit(src, 4096, memory_bytes=256 << 20)


def test_resume_keeps_the_interrupted_runs_group_size(
    src: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A rerun whose measurement would pick another group size (e.g. on another machine)
    resumes the interrupted conversion instead of refusing it as a different model."""
    out = tmp_path / "m"
    conv = cv.OfficialConverter(src, cv.ConvertOptions("q2", shard_bytes=SHARD))

    def stop(name: str, done: int, total: int) -> None:
        if done > total // 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        conv.run(out, progress=stop)
    first = conv.group_size
    other = next(g for g in cv.GROUP_CANDIDATES if g != first)
    real_choose = cv.choose_group_size
    monkeypatch.setattr(cv, "choose_group_size", lambda *a: (other, real_choose(*a)[1]))
    logs: list[str] = []
    res = cv.OfficialConverter(src, cv.ConvertOptions("q2", shard_bytes=SHARD)).run(
        out, log=logs.append
    )
    assert res.group_size == first and res.write.shards_reused > 0
    assert any("resuming the earlier conversion's group size" in m for m in logs)
