"""The routed-expert prefill layout (engine/model.py `routed_experts`, S > 1).

Pairs are regrouped into fixed-size per-expert blocks on the device; every output row must be
the same expert computation as the one-token path (S = 1) gives for that token alone, for
quantized and float expert stacks, skewed routings (one expert taking most pairs, experts with
no pairs) and bf16 matmul inputs.
"""

from __future__ import annotations

from dataclasses import replace

import mlx.core as mx
import numpy as np
import pytest
from ds4_agent.engine.model import _expert_block, routed_experts
from ds4_agent.engine.qtensor import QuantizedTensor

E, D, INTER, K = 16, 64, 32, 6
LIMIT = 7.0


def _stack(out: int, inp: int, kind: str, seed: int):
    w = mx.random.normal((E, out, inp), key=mx.random.key(seed)) * 0.2
    if kind == "float":
        return w
    mode, bits, gs = {"affine2": ("affine", 2, 32), "mxfp4": ("mxfp4", 4, 32)}[kind]
    q = mx.quantize(w, group_size=gs, bits=bits, mode=mode)
    return QuantizedTensor(q[0], q[1], q[2] if mode == "affine" else None, mode, bits, gs)


def _routing(s: int, skew: str, seed: int) -> mx.array:
    rng = np.random.default_rng(seed)
    if skew == "uniform":
        rows = [rng.choice(E, K, replace=False) for _ in range(s)]
    else:  # experts 0..5 take almost every pair, 6..9 none, the rest a few
        allowed = [e for e in range(E) if e not in (6, 7, 8, 9)]
        rows = [
            rng.choice(allowed, K, replace=False) if t % 9 == 0 else np.arange(K) for t in range(s)
        ]
        counts = np.bincount(np.concatenate(rows), minlength=E)
        assert counts[6:10].sum() == 0 and counts.max() >= 0.8 * s
    return mx.array(np.stack(rows).astype(np.int32))


@pytest.mark.parametrize("kind", ["float", "affine2", "mxfp4"])
@pytest.mark.parametrize("skew", ["uniform", "skewed"])
@pytest.mark.parametrize("s", [2, 37, 300])
def test_block_layout_equals_one_token_path(kind, skew, s):
    w1, w3 = _stack(INTER, D, kind, 1), _stack(INTER, D, kind, 3)
    w2 = _stack(D, INTER, kind, 2)
    x = mx.random.normal((s, D), key=mx.random.key(7))
    idx = _routing(s, skew, seed=s)
    got = np.array(routed_experts(x, idx, w1, w2, w3, LIMIT))
    want = np.concatenate(
        [
            np.array(routed_experts(x[t : t + 1], idx[t : t + 1], w1, w2, w3, LIMIT))
            for t in range(s)
        ]
    )
    assert got.shape == (s, K, D)
    scale = np.abs(want).max()
    assert scale > 0.1
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6 * scale)


def test_block_layout_with_bf16_inputs():
    """With bf16 matmul inputs the layout still computes each pair as the one-token path."""
    w1, w3 = _stack(INTER, D, "affine2", 1), _stack(INTER, D, "affine2", 3)
    w2 = _stack(D, INTER, "affine2", 2)
    w1, w2, w3 = (replace(w, input_dtype=mx.bfloat16) for w in (w1, w2, w3))
    x = mx.random.normal((50, D), key=mx.random.key(5))
    idx = _routing(50, "uniform", seed=3)
    got = np.array(routed_experts(x, idx, w1, w2, w3, LIMIT))
    want = np.concatenate(
        [
            np.array(routed_experts(x[t : t + 1], idx[t : t + 1], w1, w2, w3, LIMIT))
            for t in range(50)
        ]
    )
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * np.abs(want).max())
    # …and bf16 inputs really change the result against float32 inputs.
    f32 = np.array(
        routed_experts(x, idx, *(replace(w, input_dtype=None) for w in (w1, w2, w3)), LIMIT)
    )
    assert np.abs(f32 - got).max() > 1e-6 * np.abs(f32).max()


def test_block_size_follows_rows_per_expert():
    assert _expert_block(2048 * 6, 256, mx.float32) == 32
    assert _expert_block(2048 * 6, 256, mx.bfloat16) == 64
    assert _expert_block(12, 256, mx.float32) == 4
    assert _expert_block(300 * 6, 16, mx.float32) == 32


def test_cli_numerics_choices_are_the_engines():
    from ds4_agent.agent.cmd_common import NUMERICS_CHOICES
    from ds4_agent.engine.model import NUMERICS

    assert tuple(NUMERICS_CHOICES) == tuple(NUMERICS)
