"""ggml block formats used by ds4's GGUF files, decoded with vectorized numpy, and their
mappings onto MLX's affine quantization.

Block layouts (ggml, little endian), per block of `block` values / `nbytes` bytes:

- Q8_0   (32 / 34):  fp16 d, 32 × int8 q                      → x = d·q
- Q4_K   (256 / 144): fp16 d, fp16 dmin, 12 B of packed 6-bit (scale, min) pairs for 8
  sub-blocks of 32, 128 B of nibbles                          → x = (d·sc)·q − dmin·m
- Q2_K   (256 / 84):  16 B (4-bit scale | 4-bit min << 4) for 16 sub-blocks of 16, 64 B of
  2-bit codes, fp16 d, fp16 dmin                              → x = (d·sc)·q − dmin·m
- IQ2_XXS (256 / 66): fp16 d, then per 32 values two uint32: four 8-bit indices into a
  256-entry E8-lattice codebook (8 magnitudes each), and 4 × 7-bit sign patterns plus a
  4-bit sub-scale                                            → x = d·(½+s)·¼ · grid · sign

Every decoder evaluates the same float32 expressions in the same order as
`gguf.quants.dequantize`, so results are equal bit for bit (the tests check this). The
IQ2_XXS codebook and sign table are data, taken from the `gguf` package rather than retyped.

Exact mappings onto MLX affine quantization (w = scale·q̂ + bias per group):

- Q8_0 → 8-bit, group 32: q̂ = q + 128, scale = d, bias = −128·d. Exact with fp16
  scale/bias (d is an fp16 number and −128·d only shifts its exponent).
- Q4_K → 4-bit, group 32: q̂ = q, scale = d·sc, bias = −dmin·m. d·sc needs up to 17
  mantissa bits, so this is exact with fp32 scale/bias and near-exact with fp16.
- Q2_K (16-value groups) and IQ2_XXS (lattice codebook) have no MLX form: they are
  dequantized and re-quantized, and the added error is measured and reported.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

QK_K = 256

# (values per block, bytes per block) for the types ds4's files use.
BLOCK_LAYOUT: dict[str, tuple[int, int]] = {
    "F32": (1, 4),
    "F16": (1, 2),
    "BF16": (1, 2),
    "I32": (1, 4),
    "Q8_0": (32, 34),
    "Q4_K": (256, 144),
    "Q2_K": (256, 84),
    "IQ2_XXS": (256, 66),
}


class GGUFFormatError(ValueError):
    """A tensor whose bytes do not match its declared ggml type."""


def _blocks(raw: np.ndarray, qtype: str) -> np.ndarray:
    block, nbytes = BLOCK_LAYOUT[qtype]
    raw = np.ascontiguousarray(raw).view(np.uint8).reshape(-1)
    if raw.size % nbytes:
        raise GGUFFormatError(
            f"{qtype}: {raw.size} bytes is not a whole number of {nbytes}-byte blocks"
        )
    return raw.reshape(-1, nbytes)


def _f16(b: np.ndarray) -> np.ndarray:
    """Two-byte columns → float32 column vector [n, 1]."""
    return np.ascontiguousarray(b).view(np.float16).astype(np.float32).reshape(-1, 1)


# --- Q8_0 ------------------------------------------------------------------------------


def q8_0_parts(raw: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(d float16 [n_blocks], q int8 [n_blocks, 32])."""
    b = _blocks(raw, "Q8_0")
    d = np.ascontiguousarray(b[:, :2]).view(np.float16).reshape(-1)
    q = np.ascontiguousarray(b[:, 2:]).view(np.int8)
    return d, q


def dequantize_q8_0(raw: np.ndarray) -> np.ndarray:
    d, q = q8_0_parts(raw)
    return (q.astype(np.float32) * d.astype(np.float32)[:, None]).reshape(-1)


# --- Q4_K ------------------------------------------------------------------------------


def _k4_scale_min(s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Unpack the 12-byte 6-bit (scale, min) pairs of 8 sub-blocks → two uint8 [n, 8]."""
    lo, mid, hi = s[:, 0:4], s[:, 4:8], s[:, 8:12]
    sc = np.concatenate([lo & 0x3F, (hi & 0x0F) | ((lo >> 2) & 0x30)], axis=1)
    mn = np.concatenate([mid & 0x3F, (hi >> 4) | ((mid >> 2) & 0x30)], axis=1)
    return sc, mn


@dataclass
class Q4KParts:
    d: np.ndarray  # float32 [n, 1] (fp16 values)
    dmin: np.ndarray  # float32 [n, 1]
    sc: np.ndarray  # uint8 [n, 8] 6-bit sub-block scales
    m: np.ndarray  # uint8 [n, 8] 6-bit sub-block mins
    q: np.ndarray  # uint8 [n, 8, 32] 4-bit codes in value order


def q4_k_parts(raw: np.ndarray) -> Q4KParts:
    b = _blocks(raw, "Q4_K")
    n = b.shape[0]
    sc, mn = _k4_scale_min(b[:, 4:16])
    qs = b[:, 16:].reshape(n, 4, 1, 32) >> np.array([0, 4], dtype=np.uint8).reshape(1, 1, 2, 1)
    q = (qs & 0x0F).reshape(n, 8, 32)
    return Q4KParts(_f16(b[:, 0:2]), _f16(b[:, 2:4]), sc, mn, q)


def dequantize_q4_k(raw: np.ndarray) -> np.ndarray:
    p = q4_k_parts(raw)
    scale = (p.d * p.sc.astype(np.float32))[:, :, None]
    minus = (p.dmin * p.m.astype(np.float32))[:, :, None]
    return (scale * p.q.astype(np.float32) - minus).reshape(-1)


# --- Q2_K ------------------------------------------------------------------------------


def dequantize_q2_k(raw: np.ndarray) -> np.ndarray:
    b = _blocks(raw, "Q2_K")
    n = b.shape[0]
    scales, qs = b[:, :16], b[:, 16:80]
    d, dmin = _f16(b[:, 80:82]), _f16(b[:, 82:84])
    scale = (d * (scales & 0x0F).astype(np.float32))[:, :, None]
    minus = (dmin * (scales >> 4).astype(np.float32))[:, :, None]
    # Two halves of 128 values; each half's 32 bytes are read four times (shifts 0,2,4,6),
    # giving 4 × 32 = 8 sub-blocks of 16 values in value order.
    shifts = np.array([0, 2, 4, 6], dtype=np.uint8).reshape(1, 1, 4, 1)
    q = ((qs.reshape(n, 2, 1, 32) >> shifts) & 0x03).reshape(n, 16, 16).astype(np.float32)
    return (scale * q - minus).reshape(-1)


# --- IQ2_XXS ---------------------------------------------------------------------------


def _iq2xxs_table() -> np.ndarray:
    """Signed codebook float32 [256 · 128, 8]: entry (g, s) = grid[g] · signs[s].

    The codebook and sign table come from the gguf package. Folding the sign into the table
    is exact (a sign flip), and (d·grid)·sign = d·(grid·sign) bit for bit, so one gather
    replaces two.
    """
    from gguf.quants import IQ2_XXS

    IQ2_XXS.init_grid()
    assert IQ2_XXS.grid is not None
    grid = np.asarray(IQ2_XXS.grid, dtype=np.float32).reshape(256, 8)
    ksigns = np.frombuffer(IQ2_XXS.ksigns, dtype=np.uint8)
    bits = (ksigns[:, None] >> np.arange(8, dtype=np.uint8)[None, :]) & 1
    signs = np.where(bits == 0, np.float32(1), np.float32(-1)).astype(np.float32)
    return (grid[:, None, :] * signs[None, :, :]).reshape(256 * 128, 8)


_IQ2XXS: np.ndarray | None = None


def dequantize_iq2_xxs(raw: np.ndarray) -> np.ndarray:
    global _IQ2XXS
    if _IQ2XXS is None:
        _IQ2XXS = _iq2xxs_table()
    table = _IQ2XXS
    b = _blocks(raw, "IQ2_XXS")
    n = b.shape[0]
    d = _f16(b[:, :2])
    words = np.ascontiguousarray(b[:, 2:]).view(np.uint32).reshape(n, 8, 2)
    aux_idx, aux_sign = words[..., 0], words[..., 1]
    db = (d * (np.float32(0.5) + (aux_sign >> 28).astype(np.float32)) * np.float32(0.25)).reshape(
        n, 8, 1, 1
    )
    idx = np.ascontiguousarray(aux_idx).view(np.uint8).reshape(n, 8, 4).astype(np.int32)
    sign_idx = (aux_sign[..., None] >> np.array([0, 7, 14, 21], dtype=np.uint32)) & 0x7F
    values = db * table[idx * 128 + sign_idx.astype(np.int32)]
    return values.reshape(-1)


# --- dispatch --------------------------------------------------------------------------

DEQUANTIZERS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "Q8_0": dequantize_q8_0,
    "Q4_K": dequantize_q4_k,
    "Q2_K": dequantize_q2_k,
    "IQ2_XXS": dequantize_iq2_xxs,
}


def dequantize(raw: np.ndarray, qtype: str, shape: tuple[int, ...]) -> np.ndarray:
    """Bytes (or typed array) of one tensor or a slice of whole rows → float32 `shape`."""
    if qtype == "F32":
        out = np.ascontiguousarray(raw).view(np.float32)
    elif qtype == "F16":
        out = np.ascontiguousarray(raw).view(np.float16).astype(np.float32)
    elif qtype == "BF16":
        u16 = np.ascontiguousarray(raw).view(np.uint16).astype(np.uint32)
        out = (u16 << 16).view(np.float32)
    elif qtype in DEQUANTIZERS:
        out = DEQUANTIZERS[qtype](raw)
    else:
        raise GGUFFormatError(f"ggml type {qtype} is not used by ds4's files and is not supported")
    return out.reshape(shape)


# --- MLX affine packing and exact mappings ---------------------------------------------


def pack_affine(q: np.ndarray, bits: int) -> np.ndarray:
    """Unsigned codes [..., n] (values < 2**bits) → MLX's packed uint32 [..., n·bits/32].

    MLX stores element i of a word in bits [i·bits, (i+1)·bits), lowest first. For the
    power-of-two widths that is the same as packing codes into bytes lowest-first and reading
    the bytes as little-endian uint32, which is what this does (no per-element shifts).
    """
    if bits not in (2, 4, 8):
        raise ValueError(f"pack_affine supports 2, 4 and 8 bits, not {bits}")
    if sys.byteorder != "little":
        raise RuntimeError("MLX's packed layout is little-endian")
    per_byte = 8 // bits
    *lead, n = q.shape
    if n % (32 // bits):
        raise ValueError(f"row length {n} is not a multiple of {32 // bits}")
    codes = np.ascontiguousarray(q, dtype=np.uint8).reshape(*lead, n // per_byte, per_byte)
    packed = codes[..., 0].copy()
    for i in range(1, per_byte):
        packed |= codes[..., i] << np.uint8(i * bits)
    return packed.view(np.uint32)


@dataclass
class AffineArrays:
    """One matrix (or a stack of expert matrices) in MLX affine form, as numpy arrays."""

    weight: np.ndarray  # uint32 [..., out, in·bits/32]
    scales: np.ndarray  # [..., out, in/group]
    biases: np.ndarray  # [..., out, in/group]
    bits: int
    group_size: int


def q8_0_to_affine(raw: np.ndarray, shape: tuple[int, ...]) -> AffineArrays:
    """Exact: 8-bit affine, group 32, fp16 scale and bias."""
    *lead, cols = shape
    d, q = q8_0_parts(raw)
    qhat = (q.astype(np.int16) + 128).astype(np.uint8).reshape(*lead, cols)
    scale = d.reshape(*lead, cols // 32)
    bias = (d.astype(np.float32) * np.float32(-128.0)).astype(np.float16).reshape(*lead, cols // 32)
    return AffineArrays(pack_affine(qhat, 8), scale, bias, bits=8, group_size=32)


def q4_k_to_affine(
    raw: np.ndarray, shape: tuple[int, ...], scale_dtype: type = np.float32
) -> AffineArrays:
    """4-bit affine, group 32: exact with float32 scale/bias, near-exact with float16."""
    *lead, cols = shape
    p = q4_k_parts(raw)
    scale = (p.d * p.sc.astype(np.float32)).astype(scale_dtype).reshape(*lead, cols // 32)
    bias = (-(p.dmin * p.m.astype(np.float32))).astype(scale_dtype).reshape(*lead, cols // 32)
    return AffineArrays(
        pack_affine(p.q.reshape(*lead, cols), 4), scale, bias, bits=4, group_size=32
    )


def affine_dequantize(a: AffineArrays) -> np.ndarray:
    """Dequantize through MLX itself (float32 scale/bias), for error reports and tests."""
    import mlx.core as mx

    w = mx.dequantize(
        mx.array(a.weight),
        mx.array(a.scales.astype(np.float32)),
        mx.array(a.biases.astype(np.float32)),
        group_size=a.group_size,
        bits=a.bits,
    )
    return np.array(w, dtype=np.float32)


# A quantizer takes float32 [rows, cols] and returns MLX affine arrays for it; the
# converter may pass its importance-weighted one, the default is MLX's round-to-nearest.
Quantizer = Callable[[np.ndarray, int, int], AffineArrays]


def rtn_quantize(w: np.ndarray, bits: int, group_size: int) -> AffineArrays:
    """MLX's own min/max affine quantizer, scales and biases stored as float16."""
    import mlx.core as mx

    wq, s, b = mx.quantize(mx.array(w.astype(np.float32)), group_size=group_size, bits=bits)
    return AffineArrays(
        np.array(wq),
        np.array(s.astype(mx.float16)),
        np.array(b.astype(mx.float16)),
        bits,
        group_size,
    )


@dataclass
class ErrorStats:
    """Squared-error sums for a relative Frobenius error ‖Ŵ − W‖ / ‖W‖ and the max abs error."""

    sq_err: float = 0.0
    sq_ref: float = 0.0
    max_abs: float = 0.0

    def add(self, ref: np.ndarray, approx: np.ndarray) -> None:
        diff = approx.astype(np.float64) - ref.astype(np.float64)
        self.sq_err += float(np.sum(diff * diff))
        self.sq_ref += float(np.sum(ref.astype(np.float64) ** 2))
        self.max_abs = max(self.max_abs, float(np.max(np.abs(diff))) if diff.size else 0.0)

    def merge(self, other: ErrorStats) -> None:
        self.sq_err += other.sq_err
        self.sq_ref += other.sq_ref
        self.max_abs = max(self.max_abs, other.max_abs)

    @property
    def rel(self) -> float:
        return (self.sq_err / self.sq_ref) ** 0.5 if self.sq_ref > 0 else 0.0
