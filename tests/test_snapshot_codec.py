"""The snapshot codec: exact FP8/FP4 block codes, per-column fallbacks, run-length frontiers."""

from __future__ import annotations

import numpy as np
import pytest
from ds4_agent.engine import quant
from ds4_agent.sessions import codec
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp


def bits(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a, dtype=np.float32).view(np.uint32)


def test_tables_agree_with_the_engine_quantizer():
    ours = codec.E4M3.decode_table()
    theirs = quant.e4m3_decode(np.arange(256, dtype=np.uint8))
    finite = np.isfinite(ours)
    assert finite.sum() == 254  # 0x7F and 0xFF are NaN
    assert np.array_equal(bits(ours[finite]), bits(theirs[finite]))
    assert np.array_equal(
        bits(codec.E2M1.decode_table()), bits(quant.e2m1_decode(np.arange(16, dtype=np.uint8)))
    )
    assert codec.E4M3.max_value == 448.0 and codec.E2M1.max_value == 6.0


@pytest.mark.parametrize("fmt", [codec.E4M3, codec.E2M1])
def test_every_code_at_every_exponent_round_trips(fmt):
    table = fmt.decode_table()
    codes = np.flatnonzero(np.isfinite(table)).astype(np.uint8)
    # One block per (code, k): [max code, code] so the block exponent is exactly k.
    ks = np.arange(-126, 120)
    pair = np.stack([np.full_like(codes, fmt.max_code), codes], axis=1)  # [C, 2]
    vals = table[pair][None, :, :] * np.ldexp(np.float32(1), ks)[:, None, None]
    vals = vals.astype(np.float32)
    code, e8, ok = codec.quantize_blocks(vals, fmt)
    assert ok.all()
    assert np.array_equal(code[..., 1], np.broadcast_to(codes, code.shape[:-1]))
    assert np.array_equal(e8.astype(int) - 127, np.broadcast_to(ks[:, None], e8.shape))
    back = codec.dequantize_blocks(code, e8, fmt)
    assert np.array_equal(bits(back), bits(vals))


@pytest.mark.parametrize("fmt", [codec.E4M3, codec.E2M1])
def test_representability_is_decided_exactly(fmt):
    """Every float32 in [1, 2) next to the format's max: ok iff it is a code (k = 0)."""
    x = (np.arange(1 << 23, dtype=np.uint32) | np.uint32(127 << 23)).view(np.float32)
    blocks = np.stack([np.full_like(x, fmt.max_value), x], axis=1)
    _, _, ok = codec.quantize_blocks(blocks, fmt)
    low_bits = (x.view(np.uint32) & ((1 << (23 - fmt.mbits)) - 1)) == 0
    assert np.array_equal(ok, low_bits)
    assert ok.sum() == 1 << fmt.mbits


def test_engine_quantized_rows_encode_without_exceptions():
    rng = np.random.default_rng(0)
    kv = rng.standard_normal((200, 512)).astype(np.float32) * rng.uniform(
        1e-3, 50, (200, 1)
    ).astype(np.float32)
    kv[:, :448] = quant.fp8_roundtrip_np(kv[:, :448])
    kv[:, 448:] = (kv[:, 448:].view(np.uint32) & 0xFFFF0000).view(np.float32)
    enc = codec.encode_rows(kv, "e4m3")
    assert enc.modes == "q" * 7 + "b" and "x_idx" not in enc.parts
    assert enc.nbytes == 200 * 583  # engine-spec §3.4
    assert np.array_equal(bits(codec.decode_rows(enc)), bits(kv))
    # float32 RoPE channels (the MLX engine's official mode keeps them in float32).
    kv[:, 448:] = rng.standard_normal((200, 64)).astype(np.float32)
    enc = codec.encode_rows(kv, "e4m3")
    assert enc.modes == "q" * 7 + "f" and enc.nbytes == 200 * (7 * 65 + 256)
    assert np.array_equal(bits(codec.decode_rows(enc)), bits(kv))
    idx = quant.fp4_roundtrip_np(rng.standard_normal((200, 128)).astype(np.float32))
    enc = codec.encode_rows(idx, "e2m1")
    assert enc.modes == "qqqq" and enc.nbytes == 200 * 68
    assert np.array_equal(bits(codec.decode_rows(enc)), bits(idx))


def test_stray_blocks_become_exceptions_and_special_values_survive():
    rng = np.random.default_rng(1)
    x = quant.fp8_roundtrip_np(rng.standard_normal((64, 256)).astype(np.float32))
    x[3, 5] = np.float32(1.0000001)  # not FP8
    x[7, 70] = np.nan
    x[9, 130] = -np.inf
    x[11, :64] = -0.0
    x[12, 64:128] = np.float32(1e-42)  # float32 subnormal
    enc = codec.encode_rows(x, "e4m3")
    assert enc.modes == "qqqq"
    assert len(enc.parts["x_idx"]) == 4  # the zero block is exact FP8
    assert np.array_equal(bits(codec.decode_rows(enc)), bits(x))


def test_non_multiple_width_and_empty_arrays():
    rng = np.random.default_rng(2)
    x = quant.fp8_roundtrip_np(rng.standard_normal((5, 128)).astype(np.float32))
    x = np.concatenate([x, rng.standard_normal((5, 20)).astype(np.float32)], axis=1)
    enc = codec.encode_rows(x, "e4m3")
    assert enc.modes == "qq" and enc.parts["tail"].shape == (5, 20)
    assert np.array_equal(bits(codec.decode_rows(enc)), bits(x))
    empty = np.zeros((0, 512), np.float32)
    assert codec.decode_rows(codec.encode_rows(empty, "e4m3")).shape == (0, 512)


@settings(max_examples=60, deadline=None)
@given(
    hnp.arrays(np.uint32, st.tuples(st.integers(0, 6), st.sampled_from([32, 64, 96, 130]))),
    st.sampled_from(["e4m3", "e2m1", "f32"]),
)
def test_any_float32_bits_round_trip(raw_bits, fmt):
    x = raw_bits.view(np.float32)
    out = codec.decode_rows(codec.encode_rows(x, fmt))
    assert np.array_equal(bits(out), raw_bits)


def test_nibble_packing():
    codes = np.arange(32, dtype=np.uint8).reshape(2, 16) % 16
    packed = codec.pack_nibbles(codes)
    assert packed.shape == (2, 8) and packed[0, 0] == 0x10
    assert np.array_equal(codec.unpack_nibbles(packed), codes)


def test_runs_codec():
    rng = np.random.default_rng(3)
    kv = np.zeros((128, 512), np.float32)
    gate = np.full((128, 512), -np.inf, np.float32)
    kv[:10] = rng.standard_normal((10, 512))
    gate[:10] = rng.standard_normal((10, 512))
    for a in (kv, gate):
        parts = codec.encode_runs(a)
        assert parts is not None
        assert parts["lit"].nbytes + parts["runs"].nbytes < a.nbytes / 10
        back = codec.decode_runs(parts, a.size).view(np.float32).reshape(a.shape)
        assert np.array_equal(bits(back), bits(a))
    assert codec.encode_runs(rng.standard_normal((128, 512)).astype(np.float32)) is None
    nz = np.zeros(1000, np.float32)
    nz[500:] = -0.0  # signed zeros are different bit patterns
    back = codec.decode_runs(codec.encode_runs(nz), nz.size).view(np.float32)
    assert np.array_equal(bits(back), bits(nz))


@pytest.mark.parametrize("fmt", [codec.E4M3, codec.E2M1])
def test_compiled_and_numpy_quantizers_agree(fmt):
    jit = pytest.importorskip("ds4_agent.sessions.codec_jit")
    rng = np.random.default_rng(5)
    n, w = 3000, fmt.block
    x = quant.fp8_roundtrip_np(rng.standard_normal((n, 2 * w)).astype(np.float32), block=w)
    if fmt is codec.E2M1:
        x = quant.fp4_roundtrip_np(x, block=w)
    x *= np.ldexp(np.float32(1), rng.integers(-60, 60, (n, 1))).astype(np.float32)
    x[::7, 3] = rng.standard_normal(len(x[::7]))  # not representable
    x[::11, :w] = 0.0
    x[::13, :w] = -0.0
    x[5::17, 1] = np.nan
    x[6::19, 2] = np.inf
    x[7::23, 4] = np.float32(1e-40)  # float32 subnormal
    x[8::29] = np.float32(2.0**-130)  # tiny blocks
    blocks = x.reshape(n, 2, w)
    codes_np, e8_np, ok_np = codec.quantize_blocks(blocks, fmt)
    codes = np.empty((n, 2, w), np.uint8)
    e8 = np.empty((n, 2), np.uint8)
    ok = np.empty((n, 2), np.bool_)
    bf = np.empty((n, 2), np.bool_)
    max_bits = int(np.float32(fmt.max_value).view(np.uint32))
    tables = codec.FORMATS[fmt.name].decode_table()
    jit.quantize_rows(
        x, x.view(np.uint32), w, fmt.ebits, fmt.mbits, fmt.bias, fmt.max_code, max_bits,
        tables, codec._POW2, codes, e8, ok, bf,
    )  # fmt: skip
    assert 0 < ok.sum() < ok.size
    # Blocks holding float32 subnormals (never produced by the engine: its scales floor amax
    # at 1e-4) are left to the raw fallback by the compiled path; everything else agrees.
    u = blocks.view(np.uint32)
    has_sub = np.any((((u >> 23) & 0xFF) == 0) & ((u & 0x7FFFFFFF) != 0), axis=-1)
    assert has_sub.any() and not (ok & ~ok_np).any()
    assert np.array_equal(ok[~has_sub], ok_np[~has_sub])
    assert np.array_equal(codes[ok], codes_np[ok]) and np.array_equal(e8[ok], e8_np[ok])
    assert np.array_equal(bf, np.all((blocks.view(np.uint32) & 0xFFFF) == 0, axis=-1))


def _assert_compiled_decode_equals_numpy(enc, x, n_layers: int, m: int, monkeypatch) -> None:
    """Decoded into [n_layers, m + 9, d] at row offset 5 (NaN elsewhere): the compiled kernels
    and the numpy fallback write the same bits, and those bits are x's."""
    compiled = np.full((n_layers, m + 9, x.shape[1]), np.nan, np.float32)
    codec.decode_rows_into(enc, compiled, 5)
    monkeypatch.setattr(codec, "_jit", None)
    plain = np.full_like(compiled, np.nan)
    codec.decode_rows_into(enc, plain, 5)
    assert np.array_equal(bits(compiled), bits(plain))
    assert np.array_equal(bits(compiled[:, 5 : 5 + m].reshape(x.shape)), bits(x))


@pytest.mark.parametrize("fmt_name", ["e4m3", "e2m1", "f32"])
def test_decode_into_place_compiled_and_numpy_agree(fmt_name, monkeypatch):
    """The restore path (decode_rows_into) gives the same bits with and without numba, for
    every column mode: q blocks with exceptions, bfloat16, float32, a partial last block."""
    pytest.importorskip("ds4_agent.sessions.codec_jit")
    fmt = codec.FORMATS.get(fmt_name, codec.E4M3)
    w, n_layers, m = fmt.block, 3, 40
    rng = np.random.default_rng(9)
    x = rng.standard_normal((n_layers * m, 5 * w + 7)).astype(np.float32)
    x *= np.ldexp(np.float32(1), rng.integers(-40, 40, (len(x), 1))).astype(np.float32)
    x[:, : 3 * w] = quant.fp8_roundtrip_np(x[:, : 3 * w], block=w)
    if fmt is codec.E2M1:
        x[:, : 3 * w] = quant.fp4_roundtrip_np(x[:, : 3 * w], block=w)
    x[:, w : 2 * w] *= -1
    x[::9, 5] = rng.standard_normal(len(x[::9]))  # exceptions in a q block
    x[::13, 2 * w : 3 * w] = 0.0
    x[1::13, 2 * w : 3 * w] = -0.0
    x[:, 3 * w : 4 * w] = (x[:, 3 * w : 4 * w].view(np.uint32) & 0xFFFF0000).view(np.float32)
    enc = codec.encode_rows(x, fmt_name)
    if fmt_name != "f32":
        assert enc.modes == "qqqbf" and "x_idx" in enc.parts and "tail" in enc.parts
    _assert_compiled_decode_equals_numpy(enc, x, n_layers, m, monkeypatch)


@pytest.mark.parametrize("fmt", [codec.E4M3, codec.E2M1])
def test_compiled_decoder_matches_the_table_for_every_code_and_scale(fmt):
    """The compiled decoder builds floats from code bits instead of a table lookup; it must
    agree with the table for every finite code at every block exponent (subnormals included)."""
    pytest.importorskip("ds4_agent.sessions.codec_jit")
    table = fmt.decode_table()
    codes = np.flatnonzero(np.isfinite(table)).astype(np.uint8)
    reps = -(-len(codes) // fmt.block) * fmt.block
    row = np.resize(codes, reps).reshape(-1, fmt.block)  # [B, w] code blocks
    e8 = np.arange(256, dtype=np.uint8)
    blocks = np.broadcast_to(row[None], (256, *row.shape)).reshape(-1, fmt.block)
    scales = np.repeat(e8, len(row))
    packed = codec.pack_nibbles(blocks) if fmt.nbits == 4 else blocks
    enc = codec.EncodedRows(
        len(blocks), fmt.block, fmt.name, "q", {"q_codes": packed[:, None], "q_e8": scales[:, None]}
    )
    out = np.empty((1, len(blocks), fmt.block), np.float32)
    codec.decode_rows_into(enc, out, 0)
    with np.errstate(over="ignore"):
        want = codec.dequantize_blocks(blocks, scales, fmt)
    assert np.array_equal(bits(out[0]), bits(want))


@pytest.mark.parametrize("kernel", ["decode_e4m3", "decode_e4m3_f16"])
def test_each_e4m3_kernel_matches_the_table_for_every_code_and_scale(kernel):
    """Both e4m3 kernels (the float16-conversion one and its fallback) give table[code] · scale
    bit for bit for every finite code at every block exponent, next to a bfloat16 block."""
    jit = pytest.importorskip("ds4_agent.sessions.codec_jit")
    table = codec.E4M3.decode_table()
    codes = np.flatnonzero(np.isfinite(table)).astype(np.uint8)
    row = np.resize(codes, 256).reshape(-1, 64)  # [4, 64] code blocks
    e8 = np.arange(256, dtype=np.uint8)
    blocks = np.broadcast_to(row[None], (256, *row.shape)).reshape(-1, 64)
    scales = np.repeat(e8, len(row))
    rng = np.random.default_rng(1)
    bf = rng.integers(0, 1 << 16, (len(blocks), 1, 64), dtype=np.uint16)
    out = np.full((1, len(blocks), 128), np.nan, np.float32)
    getattr(jit, kernel)(
        blocks[:, None], scales[:, None], np.array([1]), bf, np.array([0]),
        np.empty((0, 0, 0), np.float32), np.empty(0, np.int64), np.empty((0, 0), np.float32),
        codec._POW2, out, 0,
    )  # fmt: skip
    with np.errstate(over="ignore"):
        want = codec.dequantize_blocks(blocks, scales, codec.E4M3)
    assert np.array_equal(bits(out[0, :, 64:]), bits(want))
    assert np.array_equal(bits(out[0, :, :64]), bf[:, 0].astype(np.uint32) << 16)


def test_the_float16_e4m3_kernel_is_used_where_the_cpu_converts_float16():
    jit = pytest.importorskip("ds4_agent.sessions.codec_jit")
    from llvmlite import binding

    if not binding.get_host_cpu_features().get("f16c", False):
        pytest.skip("no F16C on this CPU")
    assert codec._e4m3_kernel() is jit.decode_e4m3_f16


def test_decode_into_place_all_q_layout_compiled_and_numpy_agree(monkeypatch):
    """Index keys usually have every column block q (the compiled decoder's flat loop): with
    exceptions, several layers and a row offset it gives the bits numpy gives."""
    pytest.importorskip("ds4_agent.sessions.codec_jit")
    n_layers, m, d = 3, 40, 4 * 32
    rng = np.random.default_rng(11)
    x = rng.standard_normal((n_layers * m, d)).astype(np.float32)
    x *= np.ldexp(np.float32(1), rng.integers(-40, 40, (len(x), 1))).astype(np.float32)
    x = quant.fp4_roundtrip_np(x, block=32)
    x[::9, 5] = rng.standard_normal(len(x[::9]))  # exceptions
    enc = codec.encode_rows(x, "e2m1")
    assert enc.modes == "qqqq" and "x_idx" in enc.parts
    _assert_compiled_decode_equals_numpy(enc, x, n_layers, m, monkeypatch)


def test_fill_rows_compiled_and_numpy_agree(monkeypatch):
    """Frontier rows: canonical fill per code, stored rows counted, a code outside the
    table reported as -1 by both paths."""
    pytest.importorskip("ds4_agent.sessions.codec_jit")
    table = np.array([0, 0, 0xFF800000], np.uint32)
    fill = np.array([0, 0, 1, 2, 2, 1, 0], np.uint8)
    results = []
    for jit in (True, False):
        if not jit:
            monkeypatch.setattr(codec, "_jit", None)
        out = np.full((len(fill), 6), 7, np.uint32)
        n0 = codec.fill_rows(fill, table, out)
        results.append((n0, out))
        assert codec.fill_rows(np.array([0, 3], np.uint8), table, out[:2]) == -1
    (n_a, a), (n_b, b) = results
    assert n_a == n_b == 3
    assert np.array_equal(a[fill != 0], b[fill != 0])
    assert np.array_equal(a[fill != 0], np.repeat(table[fill[fill != 0]][:, None], 6, axis=1))
