"""Converted tiers driven through the real engine: lossless logits are identical to loading the
official checkpoint; q2/q3 logits stay within a measured (and printed) distance."""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
import tiny_model
from ds4_agent.engine import convert as cv
from ds4_agent.engine.config import ModelConfig
from ds4_agent.engine.generate import Engine
from ds4_agent.engine.qtensor import QuantizedTensor
from ds4_agent.engine.weights import load_weights, materialize

T = 96


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    src = tiny_model.build_tiny_model("quant")
    root = tmp_path_factory.mktemp("tiers")
    dirs = {"official": src}
    for tier in ("lossless", "q3", "q2"):
        cv.OfficialConverter(src, cv.ConvertOptions(tier, group_size=64)).run(root / tier)
        dirs[tier] = root / tier
    return dirs


def _logits(path: Path, numerics: str, toks: list[int]) -> np.ndarray:
    eng = Engine.load(path, numerics=numerics)
    return np.array(eng.forward_all(eng.new_state(), toks))


def _dist(a: np.ndarray, ref: np.ndarray) -> tuple[float, float, float]:
    d = a - ref
    rel_rms = float(np.sqrt((d**2).mean() / (ref**2).mean()))
    rel_max = float(np.abs(d).max() / np.abs(ref).max())
    top1 = float((a.argmax(-1) == ref.argmax(-1)).mean())
    return rel_rms, rel_max, top1


@pytest.mark.parametrize("numerics", ["official", "exact"])
def test_lossless_logits_identical_to_official(setup, numerics: str) -> None:
    toks = tiny_model.random_tokens(T, 512, seed=5)
    ref = _logits(setup["official"], numerics, toks)
    got = _logits(setup["lossless"], numerics, toks)
    assert np.array_equal(got, ref)


@pytest.mark.slow
def test_q2_q3_logits_within_measured_error(setup) -> None:
    toks = tiny_model.random_tokens(T, 512, seed=5)
    ref = _logits(setup["official"], "official", toks)
    dist = {t: _dist(_logits(setup[t], "official", toks), ref) for t in ("q3", "q2")}
    for t, (rms, mx_, top1) in dist.items():
        print(
            f"{t} vs official logits (T={T}): rel. RMS {rms:.3f}, max|Δ|/max {mx_:.3f}, top-1 agree {top1:.2f}"
        )
        assert np.isfinite(rms)
    # fewer bits, larger distance; both stay well below "unrelated logits" (rel. RMS ≈ 1.4)
    assert dist["q3"][0] < dist["q2"][0] < 1.0


def test_q2_quantized_path_equals_its_dequantized_weights(setup) -> None:
    """The engine runs the stored affine tensors exactly as their dequantized values say
    (so the q2 distance above is the weights' error, not a kernel or layout bug)."""
    toks = tiny_model.random_tokens(48, 512, seed=6)
    cfg = ModelConfig.from_dir(setup["q2"])
    w = load_weights(setup["q2"])
    materialize(w)
    deq = {
        k: v.dequantize(mx.float32) if isinstance(v, QuantizedTensor) and v.mode == "affine" else v
        for k, v in w.items()
    }
    assert any(isinstance(v, QuantizedTensor) and v.mode == "affine" for v in w.values())
    a = Engine(cfg, w, "exact")
    b = Engine(cfg, deq, "exact")
    la = np.array(a.forward_all(a.new_state(), toks))
    lb = np.array(b.forward_all(b.new_state(), toks))
    assert np.abs(la - lb).max() <= 1e-4 * np.abs(lb).max()


def test_without_mtp_block_main_model_logits_unchanged(setup, tmp_path: Path) -> None:
    out = tmp_path / "no-mtp"
    cv.OfficialConverter(setup["official"], cv.ConvertOptions("lossless", include_mtp=False)).run(
        out
    )
    assert not any(k.startswith("mtp.") for k in load_weights(out))
    toks = tiny_model.random_tokens(24, 512, seed=7)
    assert np.array_equal(_logits(out, "exact", toks), _logits(setup["official"], "exact", toks))
