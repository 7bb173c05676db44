"""FP8 e4m3 / FP4 e2m1 / e8m0 codecs, Hadamard, and the in-graph "official numerics" round-trips.

Independent references: torch.float8_e4m3fn (decode of all 256 codes, rounding of every
midpoint) and torch.float8_e8m0fnu; FP4 has no castable torch dtype, so e2m1 is checked against
its definition (value table + nearest-even on every midpoint); Hadamard against scipy-style
Sylvester matrices built here.
"""

from __future__ import annotations

import math

import mlx.core as mx
import numpy as np
import pytest
import torch
from ds4_agent.engine import quant as q

# ---------------------------------------------------------------------------------------------
# e4m3
# ---------------------------------------------------------------------------------------------


def test_e4m3_decode_all_256_codes_match_torch() -> None:
    codes = np.arange(256, dtype=np.uint8)
    ref = torch.from_numpy(codes).view(torch.float8_e4m3fn).float().numpy()
    ours = q.e4m3_decode(codes)
    nan = np.isnan(ref)
    assert nan.sum() == 2 and np.array_equal(np.isnan(ours), nan)
    assert np.array_equal(ours[~nan], ref[~nan])
    assert ours[0x7E] == 448.0 and ours[0x01] == 2.0**-9 and ours[0x08] == 2.0**-6


def test_e4m3_encode_roundtrips_every_finite_code() -> None:
    codes = np.array([c for c in range(256) if c & 0x7F != 0x7F and c != 0x80], dtype=np.uint8)
    assert np.array_equal(q.e4m3_encode(q.e4m3_decode(codes)), codes)
    assert q.e4m3_encode(np.array([-0.0]))[0] == 0
    assert q.e4m3_encode(np.array([np.nan]))[0] == 0x7F


def _midpoints(values: np.ndarray) -> np.ndarray:
    v = np.unique(values[np.isfinite(values)].astype(np.float64))
    return ((v[:-1] + v[1:]) / 2).astype(np.float32)


def test_e4m3_encode_every_midpoint_and_neighbourhood_matches_torch() -> None:
    mids = _midpoints(q.E4M3_VALUES)
    # the midpoints themselves (ties → even), and the floats just either side of them
    probe = np.concatenate(
        [mids, np.nextafter(mids, np.float32(np.inf)), np.nextafter(mids, np.float32(-np.inf))]
    ).astype(np.float32)
    ref = torch.from_numpy(probe).to(torch.float8_e4m3fn).view(torch.uint8).numpy()
    ours = q.e4m3_encode(probe)
    # torch encodes values that round to zero with their sign (0x80); we always emit +0.
    ref = np.where(ref == 0x80, 0, ref)
    assert np.array_equal(ours, ref)


def test_e4m3_encode_random_and_saturation_match_torch() -> None:
    rng = np.random.default_rng(0)
    x = np.concatenate(
        [
            rng.standard_normal(200_000).astype(np.float32)
            * np.exp2(rng.integers(-14, 10, 200_000)),
            np.array([448.0, 449.0, 463.9, 464.0, 480.0, 1e6, -1e6, 2.0**-10, -(2.0**-10)]),
        ]
    ).astype(np.float32)
    ref = torch.from_numpy(x.clip(-448, 448)).to(torch.float8_e4m3fn).view(torch.uint8).numpy()
    ref = np.where(ref == 0x80, 0, ref)
    assert np.array_equal(q.e4m3_encode(x), ref)


# ---------------------------------------------------------------------------------------------
# e2m1
# ---------------------------------------------------------------------------------------------


def test_e2m1_table_is_the_definition() -> None:
    # sign bit 3, exponent bits 2..1 with bias 1, mantissa bit 0; exponent 0 is subnormal
    for c in range(16):
        s = -1.0 if c & 8 else 1.0
        e, m = (c >> 1) & 3, c & 1
        mag = m * 0.5 if e == 0 else (1 + m / 2) * 2.0 ** (e - 1)
        assert q.E2M1_VALUES[c] == s * mag
    codes = np.arange(16, dtype=np.uint8)
    enc = q.e2m1_encode(q.e2m1_decode(codes))
    assert np.array_equal(enc[codes != 8], codes[codes != 8]) and enc[8] == 0


def test_e2m1_midpoints_round_to_even_mantissa() -> None:
    grid = np.unique(q.E2M1_VALUES[:8])  # 0, .5, …, 6
    for lo, hi in zip(grid[:-1], grid[1:], strict=True):
        mid = np.float32((lo + hi) / 2)
        lo_code = int(q.e2m1_encode(np.array([lo]))[0])
        expected = lo if lo_code % 2 == 0 else hi  # code bit 0 is the mantissa bit
        for sign in (1.0, -1.0):
            got = q.e2m1_decode(q.e2m1_encode(np.array([sign * mid])))[0]
            assert got == sign * expected or (expected == 0 and got == 0), (mid, got)
    # saturation and brute-force nearest check on a dense grid
    x = np.linspace(-8, 8, 100_001, dtype=np.float32)
    got = q.e2m1_decode(q.e2m1_encode(x))
    dist = np.abs(x[:, None] - q.E2M1_VALUES[None, :])
    best = dist.min(1)
    assert np.all(np.abs(x - got) <= best + 1e-7)


def test_fp4_pack_low_nibble_is_even_column() -> None:
    codes = np.array([[1, 2, 3, 4, 15, 0]], dtype=np.uint8)
    packed = q.fp4_pack(codes)
    assert packed.tolist() == [[0x21, 0x43, 0x0F]]
    assert np.array_equal(q.fp4_unpack(packed), codes)


def test_fp4_packing_agrees_with_mlx_mxfp4() -> None:
    rng = np.random.default_rng(1)
    codes = rng.integers(0, 16, size=(4, 64)).astype(np.uint8)
    packed = q.fp4_pack(codes)  # [4, 32] bytes
    scales = np.full((4, 2), 127, dtype=np.uint8)  # 2^0
    w = mx.array(packed.view(np.uint32))
    deq = mx.dequantize(w, mx.array(scales), group_size=32, bits=4, mode="mxfp4")
    assert np.array_equal(np.array(deq.astype(mx.float32)), q.e2m1_decode(codes))


# ---------------------------------------------------------------------------------------------
# e8m0
# ---------------------------------------------------------------------------------------------


def test_e8m0_all_bytes_match_torch() -> None:
    b = np.arange(256, dtype=np.uint8)
    ref = torch.from_numpy(b).view(torch.float8_e8m0fnu).float().numpy()
    ours = q.e8m0_decode(b)
    assert np.isnan(ours[255]) and np.isnan(ref[255])
    assert np.array_equal(ours[:255], ref[:255])
    assert np.array_equal(q.e8m0_encode(ours[:255]), b[:255])
    with pytest.raises(ValueError, match="powers of two"):
        q.e8m0_encode(np.array([3.0]))


def test_scale_exponent_is_exact_ceil_log2() -> None:
    rng = np.random.default_rng(2)
    a = np.concatenate(
        [
            rng.uniform(1e-4, 1e4, 50_000).astype(np.float32),
            (448.0 * np.exp2(np.arange(-20, 20))).astype(np.float32),
            np.nextafter(
                (448.0 * np.exp2(np.arange(-20, 20))).astype(np.float32), np.float32(np.inf)
            ),
        ]
    )
    e = q.pow2_scale_exponent_np(a, 448.0)
    # smallest e with 448·2^e ≥ a, checked in float64
    a64 = a.astype(np.float64)
    assert np.all(448.0 * np.exp2(e.astype(np.float64)) >= a64)
    assert np.all(448.0 * np.exp2(e.astype(np.float64) - 1) < a64)
    e4 = q.pow2_scale_exponent_np(a, 6.0)
    assert np.all(6.0 * np.exp2(e4.astype(np.float64)) >= a64)
    assert np.all(6.0 * np.exp2(e4.astype(np.float64) - 1) < a64)


# ---------------------------------------------------------------------------------------------
# block round-trips: numpy definition vs torch float8 vs the MLX graph version
# ---------------------------------------------------------------------------------------------


def _torch_fp8_roundtrip(x: np.ndarray, block: int) -> np.ndarray:
    """Straight from the definition, using torch's e4m3 cast and float64 log2."""
    t = torch.from_numpy(x.astype(np.float32)).unflatten(-1, (-1, block))
    amax = t.abs().amax(-1, keepdim=True).clamp_min(1e-4).double()
    scale = torch.pow(2.0, torch.ceil(torch.log2(amax / 448.0))).float()
    y = (t / scale).clamp(-448, 448).to(torch.float8_e4m3fn).float() * scale
    return y.flatten(-2).numpy()


def _fp4_def(x: np.ndarray, block: int) -> np.ndarray:
    xb = x.astype(np.float64).reshape(*x.shape[:-1], -1, block)
    amax = np.maximum(np.abs(xb).max(-1, keepdims=True), 6 * 2.0**-126)
    scale = np.exp2(np.ceil(np.log2(amax / 6.0)))
    y = np.clip(xb / scale, -6, 6)
    grid = np.unique(q.E2M1_VALUES.astype(np.float64))
    idx = np.abs(y[..., None] - grid).argmin(-1)
    d = np.abs(y[..., None] - grid)
    # ties → the value whose code has an even mantissa bit
    nearest = grid[idx]
    for k in range(len(grid)):
        tie = (np.abs(d[..., k] - d.min(-1)) == 0) & (grid[k] != nearest)
        if tie.any():
            even_k = (int(q.e2m1_encode(np.array([grid[k]]))[0]) & 1) == 0
            nearest = np.where(tie & even_k, grid[k], nearest)
    return (nearest * scale).reshape(x.shape).astype(np.float32)


@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16])
def test_fp8_roundtrip_mlx_matches_definition(dtype: mx.Dtype) -> None:
    rng = np.random.default_rng(3)
    x = rng.standard_normal((37, 448)).astype(np.float32)
    x *= np.exp2(rng.integers(-16, 12, size=(37, 1))).astype(np.float32)
    x[0] = 0.0  # amax floor
    x[1, :64] = 448.0 * 4  # exact power-of-two boundary
    x[2, :64] = 1e-6  # below the amax floor
    xm = mx.array(x).astype(dtype)
    xin = np.array(xm.astype(mx.float32))
    got = fp8_out = q.fp8_e4m3_roundtrip(xm, block=64)
    assert fp8_out.dtype == dtype
    got = np.array(got.astype(mx.float32))
    assert np.array_equal(got, _torch_fp8_roundtrip(xin, 64))
    assert np.array_equal(got, q.fp8_roundtrip_np(xin, 64))
    # idempotent: values already on the grid stay put
    assert np.array_equal(np.array(q.fp8_e4m3_roundtrip(mx.array(got))), got)


def test_fp8_roundtrip_agrees_with_mlx_to_fp8() -> None:
    """With a unit scale, the round-trip equals MLX's own e4m3 cast (an independent codec)."""
    rng = np.random.default_rng(4)
    x = (rng.standard_normal((64, 64)) * 50).astype(np.float32)
    x[:, 0] = 448.0  # amax 448 → scale 2^0
    ref = mx.from_fp8(mx.to_fp8(mx.array(x)), mx.float32)
    assert np.array_equal(np.array(q.fp8_e4m3_roundtrip(mx.array(x))), np.array(ref))


@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16])
def test_fp4_roundtrip_mlx_matches_definition(dtype: mx.Dtype) -> None:
    rng = np.random.default_rng(5)
    x = rng.standard_normal((41, 128)).astype(np.float32)
    x *= np.exp2(rng.integers(-20, 20, size=(41, 1))).astype(np.float32)
    x[0] = 0.0
    x[1, :32] = np.array(q.E2M1_VALUES[:16].tolist() * 2) * 8  # on-grid, amax = 48
    x[2, :32] = np.linspace(-6, 6, 32) * 0.25  # many ties after scaling
    xm = mx.array(x).astype(dtype)
    xin = np.array(xm.astype(mx.float32))
    out = q.fp4_e2m1_roundtrip(xm, block=32)
    assert out.dtype == dtype
    got = np.array(out.astype(mx.float32))
    assert np.array_equal(got, _fp4_def(xin, 32))
    assert np.array_equal(got, q.fp4_roundtrip_np(xin, 32))
    assert np.array_equal(got[1, :32], x[1, :32])


def test_roundtrips_reject_bad_block() -> None:
    with pytest.raises(ValueError, match="multiple of the block"):
        q.fp8_e4m3_roundtrip(mx.zeros((2, 100)))


# ---------------------------------------------------------------------------------------------
# Hadamard
# ---------------------------------------------------------------------------------------------


def _sylvester(n: int) -> np.ndarray:
    h = np.array([[1.0]])
    while h.shape[0] < n:
        h = np.block([[h, h], [h, -h]])
    return h


@pytest.mark.parametrize("n", [2, 32, 128])
def test_hadamard_matches_sylvester_matrix(n: int) -> None:
    rng = np.random.default_rng(n)
    x = rng.standard_normal((5, 3, n)).astype(np.float32)
    ref = (x.astype(np.float64) @ _sylvester(n).T) / math.sqrt(n)
    np.testing.assert_allclose(np.array(q.hadamard(mx.array(x))), ref, rtol=0, atol=1e-5)
    np.testing.assert_allclose(q.hadamard_np(x), ref, rtol=0, atol=1e-6)
    back = q.hadamard(q.hadamard(mx.array(x)))
    np.testing.assert_allclose(np.array(back), x, atol=1e-5)


def test_hadamard_preserves_dot_products() -> None:
    rng = np.random.default_rng(9)
    a, b = rng.standard_normal((2, 128)).astype(np.float32)
    ha, hb = np.array(q.hadamard(mx.array(a))), np.array(q.hadamard(mx.array(b)))
    assert abs(float(ha @ hb) - float(a @ b)) < 1e-3


# ---------------------------------------------------------------------------------------------
# checkpoint block layouts
# ---------------------------------------------------------------------------------------------


def test_fp8_block_quantize_roundtrip_and_layout() -> None:
    rng = np.random.default_rng(6)
    w = rng.standard_normal((300, 260)).astype(np.float32) * 0.02  # partial edge blocks
    codes, scales = q.fp8_block_quantize(w)
    assert codes.shape == (300, 260) and scales.shape == (3, 3)
    deq = q.fp8_block_dequantize(codes, scales)
    # re-quantizing values already on the grid keeps them (codes may move to a smaller scale
    # when a block's amax rounded down onto a power-of-two boundary)
    assert np.array_equal(q.fp8_block_dequantize(*q.fp8_block_quantize(deq)), deq)
    assert np.array_equal(
        deq,
        q.e4m3_decode(codes)
        * np.repeat(np.repeat(q.e8m0_decode(scales), 128, 0), 128, 1)[:300, :260],
    )
    rel = np.abs(deq - w).max() / np.abs(w).max()
    assert rel < 2**-4


def test_fp4_row_quantize_roundtrip_and_layout() -> None:
    rng = np.random.default_rng(7)
    w = rng.standard_normal((3, 16, 64)).astype(np.float32)
    packed, scales = q.fp4_row_quantize(w)
    assert packed.shape == (3, 16, 32) and scales.shape == (3, 16, 2)
    deq = q.fp4_row_dequantize(packed, scales)
    assert np.array_equal(deq, q.fp4_roundtrip_np(w, 32))
    assert np.array_equal(q.fp4_row_dequantize(*q.fp4_row_quantize(deq)), deq)
