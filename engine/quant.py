"""Low-precision number formats used by DeepSeek V4: FP8 e4m3, FP4 e2m1, e8m0 scales, Hadamard.

Two halves:

* numpy codecs (host side, used by the weight loader, the converter and the tests):
  `e4m3_decode` / `e4m3_encode`, `e2m1_decode` / `e2m1_encode`, `fp4_pack` / `fp4_unpack`,
  `e8m0_decode` / `e8m0_encode`, block quantizers for the official checkpoint layouts
  (`fp8_block_quantize` 128×128, `fp4_row_quantize` 1×32) and their inverses, `hadamard_np`.
* MLX functions that run inside the forward graph without any host synchronisation:
  `fp8_e4m3_roundtrip`, `fp4_e2m1_roundtrip`, `hadamard`. They reproduce the "official numerics"
  of the reference implementation (engine-spec §2.8): stored KV rows are FP8-simulated in blocks
  of 64 and indexer keys/queries are Hadamard-rotated and FP4-simulated in blocks of 32.

Conventions (all checked exhaustively by the tests):

* e4m3 ("fn" variant): sign, 4 exponent bits with bias 7, 3 mantissa bits; exponent 0 is
  subnormal (`m · 2^-9`); `0x7F`/`0xFF` are NaN; no infinities; largest finite value 448.
  Encoding rounds to nearest, ties to even, and saturates to ±448 (as the reference clamps
  before casting).
* e2m1: sign (bit 3), 2 exponent bits with bias 1, 1 mantissa bit; magnitudes
  {0, .5, 1, 1.5, 2, 3, 4, 6}. Two codes per byte, **low nibble = even column** (the official
  checkpoint and MLX's mxfp4 packing agree on this).
* e8m0: an unsigned byte `b` meaning `2^(b-127)`; 255 is NaN.
* Block scale of the round-trips: the smallest power of two `s` with `s · FMAX ≥ amax`, i.e.
  `2^ceil(log2(amax / FMAX))` evaluated exactly (from the float's exponent and mantissa bits,
  not through a rounded `log2`), with `amax` floored at 1e-4 for FP8 and at `6 · 2^-126` for FP4
  like the reference. Because the scale is a power of two, `x / s` and `q · s` are exact.
"""

from __future__ import annotations

import math

import mlx.core as mx
import numpy as np

FP8_MAX = 448.0
FP4_MAX = 6.0
FP8_AMAX_FLOOR = 1e-4
FP4_AMAX_FLOOR = 6.0 * 2.0**-126

# --------------------------------------------------------------------------------------------
# Code tables
# --------------------------------------------------------------------------------------------


def _e4m3_table() -> np.ndarray:
    codes = np.arange(256, dtype=np.int64)
    sign = np.where(codes & 0x80, -1.0, 1.0)
    exp = (codes >> 3) & 0xF
    man = codes & 0x7
    mag = np.where(exp == 0, man * 2.0**-9, (1.0 + man / 8.0) * np.exp2(exp - 7.0))
    out = (sign * mag).astype(np.float32)
    out[(codes & 0x7F) == 0x7F] = np.nan
    return out


def _e2m1_table() -> np.ndarray:
    mags = np.array([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0], dtype=np.float32)
    return np.concatenate([mags, -mags]).astype(np.float32)


E4M3_VALUES: np.ndarray = _e4m3_table()  # float32[256], NaN at 0x7F and 0xFF
E2M1_VALUES: np.ndarray = _e2m1_table()  # float32[16]

# --------------------------------------------------------------------------------------------
# numpy codecs
# --------------------------------------------------------------------------------------------


def e4m3_decode(codes: np.ndarray) -> np.ndarray:
    """uint8 e4m3 codes → float32 values."""
    return E4M3_VALUES[np.asarray(codes, dtype=np.uint8)]


def e2m1_decode(codes: np.ndarray) -> np.ndarray:
    """e2m1 codes (0..15, any integer dtype) → float32 values."""
    return E2M1_VALUES[np.asarray(codes, dtype=np.uint8) & 0xF]


def _exponent_np(a: np.ndarray) -> np.ndarray:
    """floor(log2(a)) for positive normal float32 `a`, exactly (from the exponent bits)."""
    return ((a.view(np.uint32) >> 23) & 0xFF).astype(np.int32) - 127


def _pow2_np(e: np.ndarray) -> np.ndarray:
    """2^e as float32 for integer e in the normal range [-126, 127], built from bits."""
    return ((np.asarray(e, dtype=np.int32) + 127).astype(np.uint32) << 23).view(np.float32)


def _round_to_grid_np(y: np.ndarray, min_exp: int, man_bits: int, fmax: float) -> np.ndarray:
    """Round float32 `y` to the nearest value of a small float grid (ties to even), saturating.

    The grid has `man_bits` mantissa bits and smallest normal exponent `min_exp` (below it the
    spacing stays constant: subnormals). Division by the power-of-two quantum is exact, and
    `np.rint` rounds half to even, which on these grids is "even mantissa".
    """
    y = np.clip(y.astype(np.float32, copy=False), -fmax, fmax)
    a = np.abs(y)
    e = np.maximum(_exponent_np(np.maximum(a, np.float32(2.0**-126))), min_exp)
    quantum = _pow2_np(e - man_bits)
    return (np.rint(y / quantum) * quantum).astype(np.float32)


def _encode_by_table(r: np.ndarray, table_pos: np.ndarray, sign_bit: int) -> np.ndarray:
    """Map grid values `r` (already exactly on the grid) to codes via the positive half-table."""
    idx = np.searchsorted(table_pos, np.abs(r))
    codes = idx.astype(np.uint8)
    return np.where(np.signbit(r) & (r != 0), codes | sign_bit, codes).astype(np.uint8)


_E4M3_POS = E4M3_VALUES[:127]  # codes 0..126: 0 … 448, strictly increasing
_E2M1_POS = E2M1_VALUES[:8]


def e4m3_encode(x: np.ndarray) -> np.ndarray:
    """float → uint8 e4m3 codes: round to nearest even, saturate to ±448, NaN → 0x7F.

    Negative zero and values that round to zero encode as +0 (code 0).
    """
    x = np.asarray(x, dtype=np.float32)
    nan = np.isnan(x)
    r = _round_to_grid_np(np.where(nan, 0.0, x), min_exp=-6, man_bits=3, fmax=FP8_MAX)
    codes = _encode_by_table(r, _E4M3_POS, 0x80)
    return np.where(nan, np.uint8(0x7F), codes).astype(np.uint8)


def e2m1_encode(x: np.ndarray) -> np.ndarray:
    """float → e2m1 codes (uint8 0..15): round to nearest even, saturate to ±6."""
    x = np.asarray(x, dtype=np.float32)
    if np.isnan(x).any():
        raise ValueError("e2m1 has no NaN encoding; got NaN input")
    r = _round_to_grid_np(x, min_exp=0, man_bits=1, fmax=FP4_MAX)
    return _encode_by_table(r, _E2M1_POS, 0x8)


def fp4_pack(codes: np.ndarray) -> np.ndarray:
    """e2m1 codes [..., n] (n even) → bytes [..., n/2], low nibble = even column."""
    codes = np.asarray(codes, dtype=np.uint8)
    if codes.shape[-1] % 2:
        raise ValueError(f"fp4_pack needs an even last dimension, got {codes.shape}")
    return ((codes[..., 0::2] & 0xF) | ((codes[..., 1::2] & 0xF) << 4)).astype(np.uint8)


def fp4_unpack(packed: np.ndarray) -> np.ndarray:
    """bytes [..., m] → e2m1 codes [..., 2m] (inverse of `fp4_pack`)."""
    packed = np.asarray(packed).view(np.uint8)
    out = np.empty((*packed.shape[:-1], packed.shape[-1] * 2), dtype=np.uint8)
    out[..., 0::2] = packed & 0xF
    out[..., 1::2] = packed >> 4
    return out


def e8m0_decode(b: np.ndarray) -> np.ndarray:
    """e8m0 bytes → float32 2^(b-127) (255 → NaN; byte 0 is the subnormal 2^-127)."""
    b = np.asarray(b, dtype=np.uint8).astype(np.int32)
    out = np.ldexp(np.float32(1.0), np.minimum(b, 254) - 127).astype(np.float32)
    return np.where(b == 255, np.float32(np.nan), out).astype(np.float32)


def e8m0_encode(s: np.ndarray) -> np.ndarray:
    """Exact powers of two (float) → e8m0 bytes. Anything else is an error, not a rounding."""
    s = np.asarray(s, dtype=np.float32)
    m, e = np.frexp(s)
    if not (np.all(m == 0.5) and np.all((e - 1) >= -127) and np.all((e - 1) <= 127)):
        raise ValueError("e8m0_encode needs positive powers of two in [2^-127, 2^127]")
    return (e - 1 + 127).astype(np.uint8)


def pow2_scale_exponent_np(amax: np.ndarray, fmax: float) -> np.ndarray:
    """Exact ceil(log2(amax / fmax)) for positive normal float32 `amax` (fmax ∈ {448, 6})."""
    a = np.asarray(amax, dtype=np.float32)
    bits = a.view(np.uint32)
    e = ((bits >> 23) & 0xFF).astype(np.int32) - 127
    man = bits & 0x7FFFFF
    fm, fe = math.frexp(fmax)  # fmax = fm·2^fe, fm ∈ [0.5, 1)
    f_man = int(round((fm * 2 - 1) * 2**23))  # fmax = (1 + f_man/2^23)·2^(fe-1)
    return (e - (fe - 1) + (man > f_man)).astype(np.int32)


def _blocks_last(x: np.ndarray, block: int) -> np.ndarray:
    if x.shape[-1] % block:
        raise ValueError(f"last dimension {x.shape[-1]} is not a multiple of the block {block}")
    return x.reshape(*x.shape[:-1], x.shape[-1] // block, block)


def fp8_roundtrip_np(x: np.ndarray, block: int = 64) -> np.ndarray:
    """numpy twin of `fp8_e4m3_roundtrip` (float32 result)."""
    xb = _blocks_last(np.asarray(x, dtype=np.float32), block)
    amax = np.maximum(np.abs(xb).max(-1, keepdims=True), np.float32(FP8_AMAX_FLOOR))
    e = pow2_scale_exponent_np(amax, FP8_MAX)
    q = _round_to_grid_np(xb * _pow2_np(-e), -6, 3, FP8_MAX)
    return (q * _pow2_np(e)).reshape(np.shape(x))


def fp4_roundtrip_np(x: np.ndarray, block: int = 32) -> np.ndarray:
    """numpy twin of `fp4_e2m1_roundtrip` (float32 result)."""
    xb = _blocks_last(np.asarray(x, dtype=np.float32), block)
    amax = np.maximum(np.abs(xb).max(-1, keepdims=True), np.float32(FP4_AMAX_FLOOR))
    e = pow2_scale_exponent_np(amax, FP4_MAX)
    q = _round_to_grid_np(xb * _pow2_np(-e), 0, 1, FP4_MAX)
    return (q * _pow2_np(e)).reshape(np.shape(x))


def hadamard_np(x: np.ndarray) -> np.ndarray:
    """Normalised Walsh–Hadamard transform (Sylvester order) over the last axis, float64 math."""
    x = np.asarray(x, dtype=np.float64)
    n = x.shape[-1]
    if n & (n - 1):
        raise ValueError(f"hadamard needs a power-of-two size, got {n}")
    y = x.reshape(-1, n).copy()
    h = 1
    while h < n:  # in-place butterflies
        y = y.reshape(-1, n // (2 * h), 2, h)
        a, b = y[:, :, 0, :].copy(), y[:, :, 1, :].copy()
        y[:, :, 0, :], y[:, :, 1, :] = a + b, a - b
        h *= 2
    return (y.reshape(x.shape) / math.sqrt(n)).astype(np.float32)


# --------------------------------------------------------------------------------------------
# Block quantizers in the official checkpoint layouts (numpy; used by tests and tiny-model
# exporters, and by the converter to dequantize).
# --------------------------------------------------------------------------------------------


def fp8_block_quantize(w: np.ndarray, block: int = 128) -> tuple[np.ndarray, np.ndarray]:
    """float [out, in] → (e4m3 codes uint8 [out, in], e8m0 scales uint8 [⌈out/b⌉, ⌈in/b⌉]).

    Per 128×128 block: scale = 2^ceil(log2(amax/448)) (amax floored at 1e-4), codes =
    e4m3(w / scale). Partial edge blocks are allowed (the official layout uses ceil).
    """
    w = np.asarray(w, dtype=np.float32)
    out_f, in_f = w.shape
    nr, nc = -(-out_f // block), -(-in_f // block)
    pad = np.zeros((nr * block, nc * block), dtype=np.float32)
    pad[:out_f, :in_f] = w
    blocks = pad.reshape(nr, block, nc, block)
    amax = np.maximum(np.abs(blocks).max(axis=(1, 3)), np.float32(FP8_AMAX_FLOOR))
    e = pow2_scale_exponent_np(amax, FP8_MAX)
    inv = np.repeat(np.repeat(_pow2_np(-e), block, 0), block, 1)[:out_f, :in_f]
    return e4m3_encode(w * inv), (e + 127).astype(np.uint8)


def fp8_block_dequantize(codes: np.ndarray, scales: np.ndarray, block: int = 128) -> np.ndarray:
    """Inverse of `fp8_block_quantize` (exact): float32 [out, in]."""
    codes = np.asarray(codes).view(np.uint8)
    out_f, in_f = codes.shape
    s = e8m0_decode(scales)
    s = np.repeat(np.repeat(s, block, 0), block, 1)[:out_f, :in_f]
    return e4m3_decode(codes) * s


def fp4_row_quantize(w: np.ndarray, group: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """float [..., out, in] → (packed uint8 [..., out, in/2], e8m0 scales uint8 [..., out, in/32]).

    Per row and 32 inputs: scale = 2^ceil(log2(amax/6)) (amax floored at 6·2^-126),
    codes = e2m1(w / scale), two per byte, low nibble first.
    """
    wb = _blocks_last(np.asarray(w, dtype=np.float32), group)
    amax = np.maximum(np.abs(wb).max(-1, keepdims=True), np.float32(FP4_AMAX_FLOOR))
    e = pow2_scale_exponent_np(amax, FP4_MAX)
    codes = e2m1_encode(wb * _pow2_np(-e)).reshape(np.shape(w))
    return fp4_pack(codes), (e[..., 0] + 127).astype(np.uint8)


def fp4_row_dequantize(packed: np.ndarray, scales: np.ndarray, group: int = 32) -> np.ndarray:
    """Inverse of `fp4_row_quantize` (exact): float32 [..., out, in]."""
    vals = e2m1_decode(fp4_unpack(packed))
    s = np.repeat(e8m0_decode(scales), group, axis=-1)
    return vals * s


# --------------------------------------------------------------------------------------------
# MLX in-graph round-trips ("official" numerics)
# --------------------------------------------------------------------------------------------


def _pow2_mx(e: mx.array) -> mx.array:
    """2^e (int32 e in [-126, 127]) as float32, built from the exponent bits: exact."""
    return mx.view(mx.left_shift((e + 127).astype(mx.uint32), 23), mx.float32)


def _scale_exponent_mx(amax: mx.array, fmax: float) -> mx.array:
    """Exact ceil(log2(amax / fmax)) for positive normal float32 amax (see module docstring)."""
    bits = mx.view(amax, mx.uint32)
    e = mx.right_shift(bits, 23).astype(mx.int32) - 127
    man = mx.bitwise_and(bits, 0x7FFFFF)
    fm, fe = math.frexp(fmax)
    f_man = int(round((fm * 2 - 1) * 2**23))
    return e - (fe - 1) + (man > f_man).astype(mx.int32)


def _round_to_grid_mx(y: mx.array, min_exp: int, man_bits: int, fmax: float) -> mx.array:
    y = mx.clip(y, -fmax, fmax)
    a = mx.maximum(mx.abs(y), 2.0**-126)
    e = mx.right_shift(mx.view(a, mx.uint32), 23).astype(mx.int32) - 127
    quantum = _pow2_mx(mx.maximum(e, min_exp) - man_bits)
    return mx.round(y / quantum) * quantum  # mx.round: half to even


def _block_roundtrip(
    x: mx.array, block: int, fmax: float, floor: float, min_exp: int, man_bits: int
) -> mx.array:
    n = x.shape[-1]
    if n % block:
        raise ValueError(f"last dimension {n} is not a multiple of the block {block}")
    xb = x.astype(mx.float32).reshape(*x.shape[:-1], n // block, block)
    amax = mx.maximum(mx.max(mx.abs(xb), axis=-1, keepdims=True), floor)
    e = _scale_exponent_mx(amax, fmax)
    q = _round_to_grid_mx(xb * _pow2_mx(-e), min_exp, man_bits, fmax)
    return (q * _pow2_mx(e)).reshape(x.shape).astype(x.dtype)


def fp8_e4m3_roundtrip(x: mx.array, block: int = 64) -> mx.array:
    """Simulate FP8 storage: per `block` values along the last axis, scale by a power of two
    (2^ceil(log2(amax/448)), amax ≥ 1e-4), round to e4m3 (nearest even, saturating), scale back.

    Math in float32; returns `x.dtype` (exact for bf16/f16/f32: e4m3·2^k fits all three).
    The caller applies it to the non-RoPE channels (0..447 of a 512-wide KV row).
    """
    return _block_roundtrip(x, block, FP8_MAX, FP8_AMAX_FLOOR, -6, 3)


def fp4_e2m1_roundtrip(x: mx.array, block: int = 32) -> mx.array:
    """Simulate FP4 storage: per `block` values, scale 2^ceil(log2(amax/6)) (amax ≥ 6·2^-126),
    round to e2m1 (nearest even, saturating at ±6), scale back. Returns `x.dtype`."""
    return _block_roundtrip(x, block, FP4_MAX, FP4_AMAX_FLOOR, 0, 1)


def hadamard(x: mx.array) -> mx.array:
    """Normalised Walsh–Hadamard transform (Sylvester order, × n^-½) over the last axis.

    Orthogonal, so `hadamard(hadamard(x)) == x` up to rounding. Computed in float32 and
    returned as `x.dtype`.
    """
    n = x.shape[-1]
    if n & (n - 1):
        raise ValueError(f"hadamard needs a power-of-two size, got {n}")
    y = mx.hadamard_transform(x.astype(mx.float32), scale=1.0 / math.sqrt(n))
    return y.astype(x.dtype)
