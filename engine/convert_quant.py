"""Importance-weighted MLX affine quantization (the q2/q3 re-quantizer), in MLX.

`affine_quantize(w, bits, group_size, importance)` returns MLX's affine layout (packed uint32
codes as a continuous little-endian bit stream, per-group scale and bias) minimising the
importance-weighted squared error Σ_j a_j (w_j − ŵ_j)² of each group instead of plain
min/max rounding:

1. candidate clipping ranges per group: [min·p, max·p] for p in `SHRINK` (1.0 = MLX's
   round-to-nearest); keep the candidate with the lowest weighted error;
2. refit scale and bias by weighted least squares for the chosen codes (2×2 normal
   equations), re-round, and keep the refit only where it lowers the error (twice);
3. round scale/bias to their storage dtype and re-derive the codes from the rounded values,
   so the stored tensor is exactly what the error was measured on.

Importance `a` is per input column (activation energy E[x_j²] from a calibration file when
available); the fallback is the weight's own column energy Σ_rows W[r, j]² (what ds4's
quantizer uses without an imatrix). Runs on the default MLX device (Metal on a Mac).
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
import numpy as np
from ds4_agent.engine.qtensor import QuantizedTensor

SHRINK = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7, 0.6)


def pack_bits(q: mx.array, bits: int) -> mx.array:
    """Codes [..., n] (< 2^bits) → uint32 [..., n·bits/32], MLX's layout: element i occupies
    bits [i·bits, (i+1)·bits) of a little-endian stream of 32-bit words."""
    *lead, n = q.shape
    if (n * bits) % 32:
        raise ValueError(f"row of {n} {bits}-bit codes does not fill whole 32-bit words")
    q = q.astype(mx.uint32)
    if 32 % bits == 0:
        per = 32 // bits
        g = q.reshape(*lead, n // per, per)
        shifts = mx.arange(per, dtype=mx.uint32) * bits
        return mx.sum(mx.left_shift(g, shifts), axis=-1).astype(mx.uint32)
    # Widths that straddle words (3, 5, 6): expand to bits, regroup by 32.
    bit_idx = mx.arange(bits, dtype=mx.uint32)
    stream = mx.bitwise_and(mx.right_shift(q[..., None], bit_idx), 1).reshape(
        *lead, n * bits // 32, 32
    )
    return mx.sum(mx.left_shift(stream, mx.arange(32, dtype=mx.uint32)), axis=-1).astype(mx.uint32)


@dataclass
class AffineResult:
    tensor: QuantizedTensor
    sq_err: float  # Σ (w − ŵ)²
    sq_ref: float  # Σ w²
    wsq_err: float  # Σ a (w − ŵ)² (importance-weighted)
    wsq_ref: float  # Σ a w²
    max_abs: float


def column_energy(w: mx.array) -> mx.array:
    """Fallback importance: Σ_rows W[r, j]² per input column j."""
    return mx.sum(mx.square(w.astype(mx.float32)), axis=0)


def _weighted_err(wg: mx.array, a: mx.array, s: mx.array, b: mx.array, qmax: int):
    q = mx.clip(mx.round((wg - b) / s), 0, qmax)
    d = wg - (q * s + b)
    return mx.sum(a * d * d, axis=-1, keepdims=True), q


def affine_quantize(
    w: mx.array,
    bits: int,
    group_size: int,
    importance: mx.array | None = None,
    *,
    scale_dtype: mx.Dtype = mx.float16,
    search: bool = True,
) -> AffineResult:
    """w [rows, cols] float → importance-weighted affine QuantizedTensor (see module doc)."""
    rows, cols = w.shape
    if cols % group_size:
        raise ValueError(f"{cols} columns are not a multiple of the group size {group_size}")
    qmax = (1 << bits) - 1
    w = w.astype(mx.float32)
    a = column_energy(w) if importance is None else importance.astype(mx.float32)
    a = a / mx.maximum(mx.mean(a), 1e-30) + 1e-6  # scale-free, strictly positive
    wg = w.reshape(rows, cols // group_size, group_size)
    ag = mx.broadcast_to(a.reshape(1, cols // group_size, group_size), wg.shape)
    wmin = mx.minimum(mx.min(wg, axis=-1, keepdims=True), 0.0)
    wmax = mx.maximum(mx.max(wg, axis=-1, keepdims=True), 0.0)

    def cand(p: float):
        lo, hi = wmin * p, wmax * p
        s = mx.maximum((hi - lo) / qmax, 1e-12)
        return s, lo

    s, b = cand(1.0)
    best, q = _weighted_err(wg, ag, s, b, qmax)
    if search:
        for p in SHRINK[1:]:
            s2, b2 = cand(p)
            e2, q2 = _weighted_err(wg, ag, s2, b2, qmax)
            better = e2 < best
            s, b, best = mx.where(better, s2, s), mx.where(better, b2, b), mx.minimum(e2, best)
            q = mx.where(better, q2, q)
        # Weighted least-squares refit of (scale, bias) for the current codes; Σa and Σa·w do
        # not depend on the codes, so they are computed once.
        sa = mx.sum(ag, -1, keepdims=True)
        sw = mx.sum(ag * wg, -1, keepdims=True)
        for _ in range(2):
            aq = ag * q
            sq = mx.sum(aq, -1, keepdims=True)
            sqq = mx.sum(aq * q, -1, keepdims=True)
            sqw = mx.sum(aq * wg, -1, keepdims=True)
            det = sqq * sa - sq * sq
            ok = mx.abs(det) > 1e-20
            det_safe = mx.where(ok, det, 1.0)
            s2 = mx.where(ok, (sqw * sa - sq * sw) / det_safe, s)
            b2 = mx.where(ok, (sqq * sw - sq * sqw) / det_safe, b)
            s2 = mx.where(s2 > 1e-12, s2, s)
            e2, q2 = _weighted_err(wg, ag, s2, b2, qmax)
            better = e2 < best
            s, b, best = mx.where(better, s2, s), mx.where(better, b2, b), mx.minimum(e2, best)
            q = mx.where(better, q2, q)
    # Store what we measure: round scale/bias to the storage dtype, then re-derive the codes.
    s = s.astype(scale_dtype).astype(mx.float32)
    b = b.astype(scale_dtype).astype(mx.float32)
    s = mx.where(s > 0, s, mx.array(2.0**-14, dtype=mx.float32))
    _, q = _weighted_err(wg, ag, s, b, qmax)
    deq = q * s + b
    d = wg - deq
    tensor = QuantizedTensor(
        weight=pack_bits(q.reshape(rows, cols).astype(mx.uint32), bits),
        scales=s.reshape(rows, cols // group_size).astype(scale_dtype),
        biases=b.reshape(rows, cols // group_size).astype(scale_dtype),
        mode="affine",
        bits=bits,
        group_size=group_size,
    )
    stats = mx.stack(
        [
            mx.sum(d * d),
            mx.sum(wg * wg),
            mx.sum(ag * d * d),
            mx.sum(ag * wg * wg),
            mx.max(mx.abs(d)),
        ]
    )
    mx.eval(tensor.weight, tensor.scales, tensor.biases, stats)
    st = np.array(stats, dtype=np.float64)
    return AffineResult(tensor, *(float(x) for x in st))


def stack_quantized(parts: list[QuantizedTensor]) -> QuantizedTensor:
    """Per-expert tensors → one [n_experts, …] stack (what gather_qmm consumes)."""
    first = parts[0]
    return QuantizedTensor(
        weight=mx.stack([p.weight for p in parts]),
        scales=mx.stack([p.scales for p in parts]),
        biases=None if first.biases is None else mx.stack([p.biases for p in parts]),  # type: ignore[misc]
        mode=first.mode,
        bits=first.bits,
        group_size=first.group_size,
    )
