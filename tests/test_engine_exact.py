"""Exact numerics against transformers' DeepseekV4ForCausalLM, and official numerics' distance.

Three tiny random checkpoints in the official format (see tiny_model.py): the Flash layer
pattern with hash layers, a small sliding window, and FP8/FP4 quantized weights. T = 300 puts
75 compressed rows in every CSA layer (index_topk 8 / 4: the indexer really selects) and two
ratio-128 rows in every HCA layer.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tiny_model as tm
from ds4_agent.engine.generate import Engine

T = 300
TOL = 1e-4


@pytest.fixture(scope="module")
def dirs(request) -> dict[str, Path]:
    root = tm.cache_root(request)
    return {name: tm.build_tiny_model(name, cache_root=root) for name in tm.PRESETS}


@pytest.mark.parametrize("preset", ["flash", "window", "quant"])
def test_exact_logits_match_transformers(dirs, preset):
    d = dirs[preset]
    toks = tm.random_tokens(T, 512, seed=1)
    ref = tm.cached_reference_logits(d, toks)
    eng = tm.cached_engine(d, "exact")
    state = eng.new_state()
    out = eng.forward_all(state, toks)
    err = tm.rel_err(out, ref)
    print(f"{preset}: exact vs transformers max|Δ|/max|logit| = {err:.3g} (T={T})")
    assert out.shape == ref.shape == (T, 512)
    assert err <= TOL
    # The comparison exercises what it claims to: the indexer selects among more rows than
    # top-k, and ratio-128 rows exist.
    cfg = eng.config
    for ratio, ls in zip(cfg.ratios, state.layers, strict=True):
        if ratio == 4:
            assert ls.comp.n == T // 4 > cfg.index_topk
        if ratio == 128:
            assert ls.comp.n == T // 128 == 2
    assert T % cfg.sliding_window != 0 and cfg.sliding_window < T


def test_quantized_weights_are_mlx_quantized(dirs):
    from ds4_agent.engine.qtensor import QuantizedTensor

    w = tm.cached_engine(dirs["quant"], "exact").model.w
    assert isinstance(w["layers.2.attn.wq_b.weight"], QuantizedTensor)
    assert w["layers.2.attn.wq_b.weight"].mode == "mxfp8"
    assert w["layers.3.ffn.experts.w1.weight"].mode == "mxfp4"


def test_indexer_selection_changes_logits(dirs):
    """If the engine ignored the indexer (attending to all visible rows), the comparison above
    would fail: the selection is observable at far more than the tolerance."""
    d = dirs["flash"]
    base = tm.cached_engine(d, "exact")
    wide = Engine(base.config.model_copy(update={"index_topk": 10_000}), base.model.w, "exact")
    toks = tm.random_tokens(T, 512, seed=1)
    ref = tm.cached_reference_logits(d, toks)
    err = tm.rel_err(wide.forward_all(wide.new_state(), toks), ref)
    assert err > 100 * TOL


def _assert_bounded_drift(a: np.ndarray, b: np.ndarray, label: str) -> None:
    """b differs from a (really: above float noise), by a bounded amount."""
    err = tm.rel_err(b, a)
    per_pos = np.abs(a - b).max(-1) / np.abs(a).max()
    agree = float(np.mean(a.argmax(-1) == b.argmax(-1)))
    print(
        f"{label}: max|Δ|/max|logit| = {err:.3g}, median over positions "
        f"{np.median(per_pos):.3g}, argmax agreement {agree:.3f}"
    )
    assert 1e-6 < err < 0.6
    assert np.median(per_pos) < 0.05
    assert agree > 0.85


@pytest.mark.parametrize("preset", ["flash", "quant"])
def test_official_numerics_close_to_exact(dirs, preset):
    d = dirs[preset]
    toks = tm.random_tokens(T, 512, seed=1)
    exact = tm.cached_engine(d, "exact")
    official = tm.cached_engine(d, "official")
    # The modes really differ, by the order of FP8's 3-bit mantissa (a random tiny network has
    # no margin in its MoE routing, so single positions can move further).
    _assert_bounded_drift(
        tm.one_shot_logits(d, toks, "exact"),
        tm.one_shot_logits(d, toks, "official"),
        f"{preset}: official vs exact",
    )
    assert official.fingerprint != exact.fingerprint


def test_official_state_rows_are_fp8_and_fp4_representable(dirs):
    """In official numerics every stored KV row is on the FP8 grid (non-RoPE channels) and every
    index key on the FP4 grid, i.e. the round-trips are idempotent on the exported state."""
    from ds4_agent.engine.quant import fp4_roundtrip_np, fp8_roundtrip_np

    eng = tm.cached_engine(dirs["flash"], "official")
    st = eng.new_state()
    eng.prefill(st, tm.random_tokens(T, 512, seed=2), chunk_size=64)
    ex = st.export()
    nd = eng.config.nope_dim
    for le in ex.layers:
        for rows in (le.raw, le.comp):
            if rows is not None and len(rows):
                assert np.array_equal(fp8_roundtrip_np(rows[:, :nd], 64), rows[:, :nd])
        if le.index is not None:
            assert np.array_equal(fp4_roundtrip_np(le.index, 32), le.index)
    exact = tm.cached_engine(dirs["flash"], "exact")
    st2 = exact.new_state()
    exact.prefill(st2, tm.random_tokens(T, 512, seed=2), chunk_size=64)
    raw = st2.export().layers[0].raw[:, :nd]
    assert not np.array_equal(fp8_roundtrip_np(raw, 64), raw)


def test_bf16_numerics_only_changes_quantized_matmul_inputs(dirs):
    """`bf16` numerics = `official` + bf16 inputs to quantized matmuls: identical to `official`
    on a float checkpoint, a bounded drift on an FP8/FP4 one, and its own fingerprint."""
    toks = tm.random_tokens(T, 512, seed=1)
    d = dirs["flash"]
    np.testing.assert_array_equal(
        tm.one_shot_logits(d, toks, "bf16"), tm.one_shot_logits(d, toks, "official")
    )
    d = dirs["quant"]
    _assert_bounded_drift(
        tm.one_shot_logits(d, toks, "official"),
        tm.one_shot_logits(d, toks, "bf16"),
        "bf16 vs official",
    )
    assert tm.cached_engine(d, "bf16").fingerprint != tm.cached_engine(d, "official").fingerprint
