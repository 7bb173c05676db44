"""One-launch CUDA kernels for the official numerics' rounding chains in the fast decode step.

`quant.fp8_e4m3_roundtrip` / `fp4_e2m1_roundtrip` are exact array expressions of ~15 MLX
primitives each (bit-level exponent extraction breaks `mx.compile`'s fusion at every
`mx.view`), run for every stored KV row and index key/query of every layer; on CUDA each
primitive is a launch. Here one thread rounds one block of 64 (FP8) or 32 (FP4) values with
the same operations in the same order (power-of-two scale from the exponent bits, clip, grid
quantum from the exponent bits, round half to even), so the result is bit-identical; the KV
variant also BF16-rounds the blocks past `nope` (the RoPE channels), which `Model._round_kv`
does with a concatenate.

Nothing is trusted blindly: `Rounders.build()` compares each kernel against the array
expression on edge-case inputs — also inside `mx.compile` — and keeps the array expression
if anything differs or fails. Off CUDA (the CPU tests, Metal) the array expression runs.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import mlx.core as mx
from ds4_agent.engine.fused import cuda_kernel, use_cuda
from ds4_agent.engine.quant import (
    FP4_AMAX_FLOOR,
    FP4_MAX,
    FP8_AMAX_FLOOR,
    FP8_MAX,
    fp4_e2m1_roundtrip,
    fp8_e4m3_roundtrip,
)

_SOURCE = """
    auto r = cooperative_groups::this_grid().thread_rank();
    const int block = ip[0], fe = ip[1], minexp = ip[3], manbits = ip[4];
    const int nope = ip[5], row = ip[6], nblocks = ip[7];
    const unsigned int fman = (unsigned int)ip[2];
    if (r >= (size_t)nblocks) return;
    const float fmax = fp[0], floor_ = fp[1];
    const size_t base = r * (size_t)block;
    if (nope < row && (int)(base % row) >= nope) {  // RoPE channels: BF16 round to nearest even
        for (int i = 0; i < block; ++i) {
            unsigned int u = __float_as_uint(x[base + i]);
            u = (u + 0x7FFFu + ((u >> 16) & 1u)) & 0xFFFF0000u;
            out[base + i] = __uint_as_float(u);
        }
        return;
    }
    float amax = 0.f;
    for (int i = 0; i < block; ++i) amax = fmaxf(amax, fabsf(x[base + i]));
    amax = fmaxf(amax, floor_);
    const unsigned int bits = __float_as_uint(amax);
    int e = (int)(bits >> 23) - 127;
    e = e - (fe - 1) + (((bits & 0x7FFFFFu) > fman) ? 1 : 0);
    const float inv = __uint_as_float((unsigned int)(127 - e) << 23);
    const float sc = __uint_as_float((unsigned int)(e + 127) << 23);
    for (int i = 0; i < block; ++i) {
        float y = x[base + i] * inv;
        y = fminf(fmaxf(y, -fmax), fmax);
        const float a = fmaxf(fabsf(y), 1.17549435e-38f);
        int ee = (int)(__float_as_uint(a) >> 23) - 127;
        ee = (ee > minexp ? ee : minexp) - manbits;
        const float quantum = __uint_as_float((unsigned int)(ee + 127) << 23);
        out[base + i] = (rintf(y / quantum) * quantum) * sc;
    }
"""


def _cuda_kernel():
    return cuda_kernel("ds4_block_round", ("x", "ip", "fp"), ("out",), _SOURCE)


def _fmt_ints(fmax: float) -> tuple[int, int]:
    fm, fe = math.frexp(fmax)
    return fe, int(round((fm * 2 - 1) * 2**23))


def kernel_round(
    x: mx.array, block: int, fmax: float, floor: float, min_exp: int, man_bits: int, nope: int
) -> mx.array:
    """Block round-trip of float32 x [..., row] in one launch; blocks at channel ≥ `nope` are
    BF16-rounded instead (nope = row: none)."""
    row = x.shape[-1]
    nblocks = x.size // block
    fe, fman = _fmt_ints(fmax)
    ip = mx.array([block, fe, fman, min_exp, man_bits, nope, row, nblocks], dtype=mx.int32)
    fp = mx.array([fmax, floor], dtype=mx.float32)
    return _cuda_kernel()(
        inputs=[x.astype(mx.float32), ip, fp],
        grid=(max(nblocks, 1), 1, 1),
        threadgroup=(min(max(nblocks, 1), 128), 1, 1),
        output_shapes=[x.shape],
        output_dtypes=[mx.float32],
    )[0]


def kv_round_reference(kv: mx.array, nope_mask: mx.array) -> mx.array:
    """`Model._round_kv` (official) without its concatenate: FP8 blocks are independent, so
    round the whole row both ways and pick per channel (mask: channel < nope)."""
    fp8 = fp8_e4m3_roundtrip(kv, 64)
    bf = kv.astype(mx.bfloat16).astype(kv.dtype)
    return mx.where(nope_mask, fp8, bf)


@dataclass
class Rounders:
    """The two rounding chains of the decode step: `kv(x)` (FP8 non-RoPE + BF16 RoPE channels)
    and `fp4(x)` (FP4 e2m1 blocks of 32), as kernels where verified, else array expressions."""

    kv: Callable[[mx.array, mx.array], mx.array]  # (rows, nope-channel mask)
    fp4: Callable[[mx.array], mx.array]
    how: str  # what runs, for benchmarks and logs

    @classmethod
    def build(cls, head_dim: int, nope: int, index_dim: int, use_kernels: bool | None = None):
        def kv_ref(x, mask):
            return kv_round_reference(x, mask)

        def fp4_ref(x):
            return fp4_e2m1_roundtrip(x, 32)

        if use_kernels is None:
            use_kernels = use_cuda()
        if not use_kernels:
            return cls(kv_ref, fp4_ref, "array expressions")
        if nope % 64 or head_dim % 64 or index_dim % 32:
            return cls(kv_ref, fp4_ref, "array expressions (row sizes not whole blocks)")

        def kv_k(x, mask):
            return kernel_round(x, 64, FP8_MAX, FP8_AMAX_FLOOR, -6, 3, nope)

        def fp4_k(x):
            return kernel_round(x, 32, FP4_MAX, FP4_AMAX_FLOOR, 0, 1, x.shape[-1])

        mask = mx.arange(head_dim) < nope
        problems = []
        for name, k, ref, width in (
            ("kv", lambda v: kv_k(v, mask), lambda v: kv_ref(v, mask), head_dim),
            ("fp4", fp4_k, fp4_ref, index_dim),
        ):
            why = verify(k, ref, width)
            if why:
                problems.append(f"{name}: {why}")
        if problems:
            why = "; ".join(problems)
            return cls(kv_ref, fp4_ref, f"array expressions (kernel check failed: {why})")
        return cls(kv_k, fp4_k, "CUDA kernels (verified bit-identical at load)")


def verify(kernel, ref, width: int) -> str | None:
    """Bit-compare a kernel with the array expression on edge cases, eagerly and inside
    mx.compile → None when identical, else what went wrong."""
    try:
        parts = [
            mx.random.normal((6, width), key=mx.random.key(1)) * 3.0,
            mx.random.normal((2, width), key=mx.random.key(2)) * 1e-6,  # amax below the floor
            mx.random.normal((2, width), key=mx.random.key(3)) * 1e4,
            mx.zeros((1, width)),
            mx.full((1, width), 0.75),
            mx.random.uniform(-8, 8, (4, width), key=mx.random.key(4)).round() / 4,  # grid ties
        ]
        x = mx.concatenate(parts).astype(mx.float32)
        want = ref(x)
        got = kernel(x)
        got_c = mx.compile(lambda v: kernel(v * 1.0))(x)
        mx.eval(want, got, got_c)
        for g in (got, got_c):
            if not mx.array_equal(g, want).item():
                bad = float(mx.abs(g - want).max())
                return f"differs from the array expression (max |Δ| {bad:.3g})"
    except Exception as e:  # a kernel that cannot build or run is not used
        return f"{type(e).__name__}: {str(e)[:200]}"
    return None
