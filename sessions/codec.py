"""Lossless compact encodings for snapshot rows (engine-spec §3.4), in plain numpy.

In `official` numerics every KV row is, on its non-RoPE channels, an FP8 e4m3 code times a
power of two per 64-channel block, and every index key is an FP4 e2m1 code times a power of
two per 32-channel block. Storing the codes plus one e8m0 exponent byte per block is exact,
and 3.5x smaller than float32. Nothing here trusts that claim: each block is encoded, decoded
again and compared bit for bit with the input; a block that does not survive (exact numerics,
NaN, an unexpected engine change) is stored in bfloat16 when that is exact, else in float32.
Correctness always wins over size.

Rows are encoded per *column block*: for an array [N, D] the channels are cut into blocks of
`width` (64 for e4m3, 32 for e2m1; a last partial block is kept as is) and each column block
gets one mode for all N rows: quantized ("q", with a short list of raw exception blocks),
bfloat16 ("b") or float32 ("f"). The RoPE channels of a KV row are simply the column block that
is not FP8 — no layout knowledge is needed, so tiny test models work the same way.

Also here: a run-length codec for float arrays such as compressor frontiers, whose unused
slots hold long runs of one value (zeros, -inf gates).
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass, field

import numpy as np

try:  # compiled inner loops; the numpy code below is the reference and the fallback
    if os.environ.get("DS4_AGENT_CODEC") == "numpy":
        raise ImportError("numpy codec requested")
    from ds4_agent.sessions import codec_jit as _jit
except ImportError:
    _jit = None


@dataclass(frozen=True)
class MiniFloat:
    """A sign-magnitude mini float without infinities (the OCP "fn" flavour)."""

    name: str
    ebits: int
    mbits: int
    bias: int
    block: int  # channels sharing one e8m0 exponent

    @property
    def nbits(self) -> int:
        return 1 + self.ebits + self.mbits

    @property
    def max_code(self) -> int:
        """The largest finite magnitude code (e4m3's all-ones code is NaN)."""
        top = (1 << (self.ebits + self.mbits)) - 1
        return top - 1 if self.name == "e4m3" else top

    def decode_table(self) -> np.ndarray:
        """float32 value of every code; NaN codes decode to NaN (and never verify)."""
        n = 1 << self.nbits
        codes = np.arange(n, dtype=np.int64)
        sign = np.where(codes >> (self.ebits + self.mbits) & 1, -1.0, 1.0)
        e = (codes >> self.mbits) & ((1 << self.ebits) - 1)
        m = codes & ((1 << self.mbits) - 1)
        sub = np.ldexp(m.astype(np.float64), 1 - self.bias - self.mbits)
        nrm = np.ldexp(1.0 + m / (1 << self.mbits), e - self.bias)
        mag = np.where(e == 0, sub, nrm)
        mag = np.where(
            (codes & ((1 << (self.ebits + self.mbits)) - 1)) > self.max_code, np.nan, mag
        )
        return (sign * mag).astype(np.float32)

    @property
    def max_value(self) -> float:
        return float(self.decode_table()[self.max_code])


E4M3 = MiniFloat("e4m3", ebits=4, mbits=3, bias=7, block=64)
E2M1 = MiniFloat("e2m1", ebits=2, mbits=1, bias=1, block=32)
FORMATS = {f.name: f for f in (E4M3, E2M1)}

_TABLES = {f.name: f.decode_table() for f in FORMATS.values()}
# 2^(e-127) for every e8m0 byte 0..254 (255 is NaN in e8m0 and never written).
_POW2 = np.full(256, np.nan, dtype=np.float32)
_POW2[:255] = np.ldexp(np.float32(1.0), np.arange(255, dtype=np.int32) - 127)


def _block_exponents(amax: np.ndarray, fmt: MiniFloat) -> np.ndarray:
    """Smallest k with amax <= max_value * 2^k, computed exactly from frexp (int32)."""
    fm, em = np.frexp(np.float64(fmt.max_value))
    f, e = np.frexp(amax.astype(np.float64))
    k = np.where(f <= fm, e - em, e - em + 1)
    k = np.where(amax == 0, 0, k)
    return np.clip(k, -127, 127).astype(np.int32)


def quantize_blocks(x: np.ndarray, fmt: MiniFloat) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Encode float32 blocks [..., block] exactly where possible.

    Returns (codes uint8 [..., block], e8m0 uint8 [...], ok bool [...]); `ok` is True only where
    decoding gives back the input bit for bit (signed zeros included).
    """
    x = np.ascontiguousarray(x, dtype=np.float32)
    with np.errstate(invalid="ignore", over="ignore"):
        amax = np.max(np.abs(x), axis=-1)
    finite = np.isfinite(amax)
    k = _block_exponents(np.where(finite, amax, 0), fmt)
    scaled = np.ldexp(x, -k[..., None]).astype(np.float32)
    bits = scaled.view(np.uint32)
    sign = (bits >> 31).astype(np.uint8)
    mag = np.abs(scaled)
    exp = ((bits >> 23) & 0xFF).astype(np.int32) - 127 + fmt.bias
    mant = ((bits & 0x7FFFFF) >> (23 - fmt.mbits)).astype(np.int32)
    normal = (exp << fmt.mbits) | mant
    with np.errstate(invalid="ignore", over="ignore"):
        sub = np.rint(mag * np.float32(2.0 ** (fmt.bias - 1 + fmt.mbits)))
        sub = np.nan_to_num(sub, nan=0.0, posinf=0.0).astype(np.int32)
    code = np.where(exp >= 1, normal, sub)
    code = np.clip(code, 0, fmt.max_code).astype(np.uint8)
    code |= sign << (fmt.ebits + fmt.mbits)
    e8 = (k + 127).astype(np.uint8)
    back = dequantize_blocks(code, e8, fmt)
    ok = np.all(back.view(np.uint32) == x.view(np.uint32), axis=-1) & finite
    return code, e8, ok


def dequantize_blocks(codes: np.ndarray, e8: np.ndarray, fmt: MiniFloat, out=None) -> np.ndarray:
    """codes [..., block] (unpacked), e8 [...] -> float32 [..., block]."""
    vals = np.take(_TABLES[fmt.name], codes, out=out, mode="wrap")
    vals *= _POW2[e8][..., None]
    return vals


def pack_nibbles(codes: np.ndarray) -> np.ndarray:
    """[..., 2n] 4-bit codes -> [..., n] bytes; element 2i in the low nibble."""
    return (codes[..., 0::2] & 0xF) | (codes[..., 1::2] << 4)


def unpack_nibbles(packed: np.ndarray) -> np.ndarray:
    out = np.empty((*packed.shape[:-1], packed.shape[-1] * 2), dtype=np.uint8)
    out[..., 0::2] = packed & 0xF
    out[..., 1::2] = packed >> 4
    return out


def _bf16_exact(x: np.ndarray) -> np.ndarray:
    """Per row: True where every value is a bfloat16 (low 16 bits zero)."""
    return np.all((x.view(np.uint32) & 0xFFFF) == 0, axis=-1)


# --------------------------------------------------------------------------------------------
# Row arrays


@dataclass
class EncodedRows:
    """One [N, D] float32 array in column-block form. `parts` are the bytes to store."""

    n: int
    d: int
    fmt: str  # "e4m3" | "e2m1" | "f32" (no quantization tried)
    modes: str  # one char per full column block: q | b | f
    parts: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def nbytes(self) -> int:
        return sum(int(p.nbytes) for p in self.parts.values())

    def meta(self) -> dict:
        return {"n": self.n, "d": self.d, "fmt": self.fmt, "modes": self.modes}


def encode_rows(x: np.ndarray, fmt_name: str) -> EncodedRows:
    """Encode float32 rows [N, D] losslessly, choosing the smallest exact mode per column block."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim != 2:
        raise ValueError(f"rows must be 2-D, got shape {x.shape}")
    n, d = x.shape
    if fmt_name == "f32" or n == 0:
        return EncodedRows(n, d, "f32", "", {"tail": x})
    fmt = FORMATS[fmt_name]
    w = fmt.block
    nb = d // w
    blocks = x[:, : nb * w].reshape(n, nb, w)
    if _jit is not None:
        codes = np.empty((n, nb, w), np.uint8)
        e8 = np.empty((n, nb), np.uint8)
        ok = np.empty((n, nb), np.bool_)
        bf_ok = np.empty((n, nb), np.bool_)
        max_bits = int(np.float32(fmt.max_value).view(np.uint32))
        _jit.quantize_rows(
            x, x.view(np.uint32), w, fmt.ebits, fmt.mbits, fmt.bias, fmt.max_code,
            max_bits, _TABLES[fmt.name], _POW2, codes, e8, ok, bf_ok,
        )  # fmt: skip
    else:
        codes, e8, ok = quantize_blocks(blocks, fmt)
        bf_ok = _bf16_exact(blocks)  # [n, nb]
    modes = []
    for j in range(nb):
        n_bad = int(n - ok[:, j].sum())
        cost_q = n * (w * fmt.nbits // 8 + 1) + n_bad * (4 * w + 8)
        cost_b = 2 * w * n if bool(bf_ok[:, j].all()) else None
        cost_f = 4 * w * n
        best = min(
            (c, m) for c, m in [(cost_q, "q"), (cost_b, "b"), (cost_f, "f")] if c is not None
        )
        modes.append(best[1])
    modes_s = "".join(modes)
    q = [j for j, m in enumerate(modes) if m == "q"]
    b = [j for j, m in enumerate(modes) if m == "b"]
    f = [j for j, m in enumerate(modes) if m == "f"]
    parts: dict[str, np.ndarray] = {}
    if q:
        qc = codes[:, q, :]
        parts["q_codes"] = pack_nibbles(qc) if fmt.nbits == 4 else np.ascontiguousarray(qc)
        parts["q_e8"] = np.ascontiguousarray(e8[:, q])
        bad = np.argwhere(~ok[:, q])  # [E, 2] (row, position within q)
        if len(bad):
            parts["x_idx"] = bad.astype(np.int32)
            parts["x_val"] = np.ascontiguousarray(blocks[:, q, :][bad[:, 0], bad[:, 1]])
    if b:
        parts["b"] = np.ascontiguousarray((blocks[:, b, :].view(np.uint32) >> 16).astype(np.uint16))
    if f:
        parts["f"] = np.ascontiguousarray(blocks[:, f, :])
    if nb * w < d:
        parts["tail"] = np.ascontiguousarray(x[:, nb * w :])
    return EncodedRows(n, d, fmt_name, modes_s, parts)


def backend() -> str:
    return "numpy" if _jit is None else "numba"


def decode_rows(enc: EncodedRows, out: np.ndarray | None = None) -> np.ndarray:
    """Inverse of encode_rows, writing into `out`.

    `out` is [N, D] float32 (may be a row slice), or [L, M, D] with L·M = N: then encoded row
    r lands in out[r // M, r % M], so one encoding can fill the same rows of L layers.
    """
    n, d = enc.n, enc.d
    if out is None:
        out = np.empty((n, d), dtype=np.float32)
    out3 = out if out.ndim == 3 else out[None]
    nl, m = out3.shape[0], out3.shape[1]
    if out3.ndim != 3 or nl * m != n or out3.shape[2] != d or out.dtype != np.float32:
        raise ValueError(f"decode target has shape {out.shape}, expected {(n, d)} float32")
    if enc.fmt == "f32":
        out3[...] = enc.parts["tail"].reshape(nl, m, d)
        return out
    fmt = FORMATS[enc.fmt]
    w = fmt.block
    nb = len(enc.modes)
    groups: dict[str, list[int]] = {"q": [], "b": [], "f": []}
    for j, mode in enumerate(enc.modes):
        groups[mode].append(j)
    for mode, cols in groups.items():
        if not cols:
            continue
        if mode == "q" and _jit is not None:
            col_arr = np.asarray(cols, np.int64)
            _jit.dequantize_rows(
                enc.parts["q_codes"], enc.parts["q_e8"], col_arr, w,
                fmt.nbits == 4, _TABLES[fmt.name], _POW2, out3,
            )  # fmt: skip
            if "x_idx" in enc.parts:  # raw exception blocks overwrite their places
                idx = enc.parts["x_idx"].astype(np.int64)
                chan = (col_arr[idx[:, 1]] * w)[:, None] + np.arange(w)
                out3[(idx[:, 0] // m)[:, None], (idx[:, 0] % m)[:, None], chan] = enc.parts["x_val"]
            continue
        if mode == "q":
            codes = enc.parts["q_codes"]
            if fmt.nbits == 4:
                codes = unpack_nibbles(codes)
            vals = dequantize_blocks(codes.reshape(n, len(cols), w), enc.parts["q_e8"], fmt)
            if "x_idx" in enc.parts:
                idx = enc.parts["x_idx"]
                vals[idx[:, 0], idx[:, 1]] = enc.parts["x_val"]
        elif mode == "b":
            vals = (enc.parts["b"].astype(np.uint32) << 16).view(np.float32)
        else:
            vals = enc.parts["f"]
        vals = vals.reshape(nl, m, len(cols), w)
        for i, j in enumerate(cols):
            out3[:, :, j * w : (j + 1) * w] = vals[:, :, i, :]
    if nb * w < d:
        out3[:, :, nb * w :] = enc.parts["tail"].reshape(nl, m, d - nb * w)
    return out


_EMPTY = {
    "q_codes": np.empty((0, 0, 0), np.uint8),
    "q_e8": np.empty((0, 0), np.uint8),
    "b": np.empty((0, 0, 0), np.uint16),
    "f": np.empty((0, 0, 0), np.float32),
    "tail": np.empty((0, 0), np.float32),
}
_NO_COLS = np.empty(0, np.int64)


def _e2m1_pairs() -> np.ndarray:
    """Per byte of two packed e2m1 codes: the float32 bits of both codes' values (low nibble
    in the low 32 bits: it is the earlier channel). Every e2m1 value is a normal float32 (or
    zero), so the compiled decoder's one product value · 2^(e8 − 127) never takes a subnormal
    operand (those cost the CPU a slow micro-coded path: about 1.5x the decode time)."""
    bits = E2M1.decode_table().astype(np.float32).view(np.uint32).astype(np.uint64)
    b = np.arange(256)
    return bits[b & 15] | (bits[b >> 4] << np.uint64(32))


_E2M1_PAIRS = _e2m1_pairs()


@functools.cache
def _e4m3_kernel():
    """The float16-conversion e4m3 decoder where it compiles and agrees bit for bit with the
    shifted-code one on every code at every exponent (it needs the compiler to lower a
    float16 conversion, in hardware on x86 with F16C and on arm64); else the latter."""
    try:
        codes = np.tile(np.arange(256, dtype=np.uint8).reshape(4, 1, 64), (255, 1, 1))
        codes[(codes & 0x7F) == 0x7F] = 0  # the NaN code is never stored
        e8 = np.repeat(np.arange(255, dtype=np.uint8), 4)[:, None]
        qcols = np.zeros(1, np.int64)
        args = (codes, e8, qcols, _EMPTY["b"], _NO_COLS, _EMPTY["f"], _NO_COLS, _EMPTY["tail"])
        want = np.zeros((1, len(codes), 64), np.float32)
        got = np.ones_like(want)
        _jit.decode_e4m3(*args, _POW2, want, 0)
        _jit.decode_e4m3_f16(*args, _POW2, got, 0)
        if np.array_equal(want.view(np.uint32), got.view(np.uint32)):
            return _jit.decode_e4m3_f16
    except Exception:  # noqa: BLE001 - any failure to build or run it: the other kernel
        pass
    return _jit.decode_e4m3


@functools.lru_cache(maxsize=256)
def _mode_columns(modes: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Column-block indices of the q, b and f blocks of `modes` (read-only; cached: a restore
    asks for the same few layouts hundreds of times)."""
    out = []
    for mode in "qbf":
        a = np.asarray([j for j, m in enumerate(modes) if m == mode], np.int64)
        a.flags.writeable = False
        out.append(a)
    return out[0], out[1], out[2]


def decode_rows_into(enc: EncodedRows, big: np.ndarray, r0: int) -> None:
    """Decode into rows [r0, r0 + m) of every layer of `big` (C-contiguous float32 [L, R, D],
    m = N / L): encoded row r lands in big[r // m, r0 + r % m].

    The snapshot store's restore path: the rows go straight to their final place in the arrays
    the StateExport hands out, with no intermediate copy. Same result as `decode_rows` on the
    view big[:, r0 : r0 + m], which is also the numpy fallback.
    """
    nl = big.shape[0]
    if big.ndim != 3 or big.dtype != np.float32 or not big.flags.c_contiguous or nl == 0:
        raise ValueError(f"decode target must be C-contiguous float32 [L, R, D], got {big.shape}")
    m = enc.n // nl
    if m * nl != enc.n or big.shape[2] != enc.d or r0 < 0 or r0 + m > big.shape[1]:
        raise ValueError(f"{enc.n}×{enc.d} rows do not fit rows {r0}+ of shape {big.shape}")
    if _jit is None:
        decode_rows(enc, big[:, r0 : r0 + m])
        return
    if enc.n == 0:
        return
    parts = enc.parts
    qcols, bcols, fcols = _mode_columns(enc.modes)
    fmt = FORMATS.get(enc.fmt, E4M3)  # "f32": no q blocks, the format is not used
    w = fmt.block
    args = (
        parts.get("q_codes", _EMPTY["q_codes"]), parts.get("q_e8", _EMPTY["q_e8"]), qcols,
        parts.get("b", _EMPTY["b"]), bcols,
        parts.get("f", _EMPTY["f"]), fcols,
        parts.get("tail", _EMPTY["tail"]),
    )  # fmt: skip
    # The two real formats have kernels of their own (constant widths and masks).
    if enc.fmt == "e4m3" and (fmt.block, fmt.nbits, fmt.mbits, fmt.bias) == (64, 8, 3, 7):
        _e4m3_kernel()(*args, _POW2, big, r0)
    elif enc.fmt == "e2m1" and (fmt.block, fmt.nbits, fmt.mbits, fmt.bias) == (32, 4, 1, 1):
        all_q = len(qcols) == enc.d // 32 and enc.d % 32 == 0
        if all_q and parts["q_codes"].flags.c_contiguous and parts["q_e8"].flags.c_contiguous:
            _jit.decode_e2m1_all_q(parts["q_codes"], parts["q_e8"], _E2M1_PAIRS, _POW2, big, r0)
        else:
            _jit.decode_e2m1(*args, _E2M1_PAIRS, _POW2, big, r0)
    else:
        _jit.decode_any(*args, w, fmt.nbits, fmt.mbits, fmt.bias, _POW2, big, r0)
    if "x_idx" in parts:  # raw exception blocks overwrite their places
        idx = parts["x_idx"].astype(np.int64)
        chan = (qcols[idx[:, 1]] * w)[:, None] + np.arange(w)
        rows = r0 + idx[:, 0] % m
        big[(idx[:, 0] // m)[:, None], rows[:, None], chan] = parts["x_val"]


def fill_rows(fill: np.ndarray, table: np.ndarray, out_bits: np.ndarray) -> int:
    """Set row i of `out_bits` (uint32 [N, D]) to table[fill[i]] in every channel; return the
    number of rows with code 0 (rows stored elsewhere, left for the caller to decode), or -1
    when a code is outside the table (nothing is then promised about `out_bits`)."""
    if out_bits.ndim != 2 or fill.shape != (out_bits.shape[0],) or out_bits.dtype != np.uint32:
        raise ValueError(f"fill {fill.shape} does not match rows {out_bits.shape}")
    if _jit is not None:
        return int(_jit.fill_rows(fill, table, out_bits))
    if fill.size and int(fill.max()) >= table.size:
        return -1
    out_bits[...] = table[fill][:, None]
    return int(np.count_nonzero(fill == 0))


def expected_part_shapes(meta: dict) -> dict[str, tuple[tuple[int, ...], str]]:
    """Shapes and dtypes the parts of an EncodedRows with this meta must have (x_* excluded)."""
    shapes = part_shapes(int(meta["n"]), int(meta["d"]), meta["fmt"], meta["modes"])
    return {part: (shape, dt.name) for part, shape, dt in shapes}


@functools.lru_cache(maxsize=1024)
def part_shapes(n: int, d: int, fmt_name: str, modes: str) -> tuple:
    """expected_part_shapes as a cached tuple of (part, shape, dtype); raises ValueError or
    KeyError for a layout that cannot be (a restore checks ~180 stacks of a few layouts)."""
    if fmt_name == "f32":
        return (("tail", (n, d), np.dtype(np.float32)),)
    fmt = FORMATS[fmt_name]
    w = fmt.block
    nq, nbf, nf = modes.count("q"), modes.count("b"), modes.count("f")
    if len(modes) != d // w or nq + nbf + nf != len(modes):
        raise ValueError(f"column modes {modes!r} do not fit {d} channels")
    shapes = []
    if nq:
        shapes.append(("q_codes", (n, nq, w * fmt.nbits // 8), np.dtype(np.uint8)))
        shapes.append(("q_e8", (n, nq), np.dtype(np.uint8)))
    if nbf:
        shapes.append(("b", (n, nbf, w), np.dtype(np.uint16)))
    if nf:
        shapes.append(("f", (n, nf, w), np.dtype(np.float32)))
    if d % w:
        shapes.append(("tail", (n, d % w), np.dtype(np.float32)))
    return tuple(shapes)


# --------------------------------------------------------------------------------------------
# Run-length codec for frontier-like arrays

_MIN_RUN = 32  # shorter runs stay literal: the run table must stay small


def encode_runs(a: np.ndarray) -> dict[str, np.ndarray] | None:
    """Split a 4-byte-element array into literals and long runs; None when it would not pay.

    Result parts: "lit" (uint32 literals, concatenated) and "runs" (uint32 [R, 3]: literal
    length before the run, run length, run value bits). Bit patterns are compared, so NaN
    payloads and signed zeros survive.
    """
    if a.dtype.itemsize != 4 or a.size < 4 * _MIN_RUN:
        return None
    u = np.ascontiguousarray(a).reshape(-1).view(np.uint32)
    change = np.flatnonzero(u[1:] != u[:-1]) + 1
    starts = np.concatenate(([0], change))
    ends = np.concatenate((change, [u.size]))
    long = (ends - starts) >= _MIN_RUN
    if not long.any():
        return None
    rs, re_ = starts[long], ends[long]
    prev_end = np.concatenate(([0], re_[:-1]))
    lit_len = rs - prev_end
    runs = np.stack([lit_len, re_ - rs, u[rs]], axis=1).astype(np.uint32)
    keep = np.ones(u.size, dtype=bool)
    for s, e in zip(rs, re_, strict=True):
        keep[s:e] = False
    lit = u[keep]
    if lit.nbytes + runs.nbytes > 0.75 * u.nbytes or len(runs) > 65536:
        return None
    return {"lit": lit, "runs": runs}


def decode_runs(parts: dict[str, np.ndarray], size: int) -> np.ndarray:
    """Inverse of encode_runs: a flat uint32 array of `size` elements."""
    out = np.empty(size, dtype=np.uint32)
    lit, runs = parts["lit"], parts["runs"]
    pos = lpos = 0
    for lit_len, run_len, value in runs.tolist():
        out[pos : pos + lit_len] = lit[lpos : lpos + lit_len]
        pos += lit_len
        lpos += lit_len
        out[pos : pos + run_len] = value
        pos += run_len
    rest = size - pos
    if rest < 0 or lpos + rest != lit.size:
        raise ValueError("run table does not add up to the array size")
    out[pos:] = lit[lpos:]
    return out
