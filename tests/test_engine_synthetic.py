"""Real-shape benchmark models in a converted tier (engine/synthetic.py) and the fused Sinkhorn's
portable path (engine/fused.py), on small shapes that run on a CI CPU."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
from ds4_agent.engine.config import ModelConfig
from ds4_agent.engine.fused import make_sinkhorn, sinkhorn_reference
from ds4_agent.engine.generate import Engine
from ds4_agent.engine.qtensor import QuantizedTensor
from ds4_agent.engine.synthetic import flash_config, synthetic_config, tier_weights


def _small(n_layers: int = 3) -> ModelConfig:
    data = synthetic_config("mid").model_dump()
    data["num_hidden_layers"] = n_layers  # ratios 0, 4, 128: one layer of each kind
    return ModelConfig.from_dict(data, source="test")


def test_flash_config_slices_keep_the_layer_pattern() -> None:
    full = flash_config()
    assert full.num_hidden_layers == 43 and full.hidden_size == 4096
    assert full.ratios.count(4) == 21 and full.ratios.count(128) == 20
    assert flash_config(4).ratios == [0, 0, 4, 128]
    for bad in (0, 44):
        with pytest.raises(ValueError, match="n_layers"):
            flash_config(bad)


@pytest.mark.parametrize("tier", ["q2", "q4"])
def test_tier_weights_use_the_tier_formats_and_decode(tier: str) -> None:
    cfg = _small()
    w = tier_weights(cfg, tier, seed=1)
    experts = w["layers.1.ffn.experts.w1.weight"]
    assert isinstance(experts, QuantizedTensor)
    assert experts.shape == (cfg.n_routed_experts, cfg.moe_intermediate_size, cfg.hidden_size)
    assert (experts.mode, experts.bits) == (("affine", 2) if tier == "q2" else ("mxfp4", 4))
    wq = w["layers.0.attn.wq_a.weight"]
    assert isinstance(wq, QuantizedTensor) and wq.mode == "mxfp8"
    head = w["head.weight"]
    if tier == "q2":
        assert isinstance(head, QuantizedTensor) and (head.mode, head.bits) == ("affine", 8)
    else:
        assert isinstance(head, mx.array) and head.dtype == mx.bfloat16
    assert w["layers.0.hc_attn_fn"].dtype == mx.float32
    assert w["layers.0.ffn.gate.tid2eid"].dtype == mx.int32

    engine = Engine(cfg, w, "official")
    st = engine.new_state()
    ids = [int(t) for t in np.random.default_rng(0).integers(2, cfg.vocab_size, size=9)]
    engine.prefill(st, ids, chunk_size=4)
    logits = np.asarray(engine.decode(st, 5))
    assert logits.shape == (cfg.vocab_size,) and np.isfinite(logits).all()
    assert st.n_tokens == 10


def test_tier_weights_rejects_unknown_tier() -> None:
    with pytest.raises(ValueError, match="tier"):
        tier_weights(_small(1), "q3")


def test_sinkhorn_portable_path_is_the_reference_and_doubly_stochastic() -> None:
    sk = make_sinkhorn(20, 1e-6, fused=False)
    for seed, s in ((0, 1), (1, 33)):
        c = mx.random.normal((s, 4, 4), key=mx.random.key(seed))
        out = sk(c)
        assert mx.array_equal(out, sinkhorn_reference(c, 20, 1e-6)).item()
        cols = np.asarray(out.sum(axis=-2))
        rows = np.asarray(out.sum(axis=-1))
        np.testing.assert_allclose(cols, 1.0, atol=1e-5)
        np.testing.assert_allclose(rows, 1.0, atol=1e-2)
