"""Hand-fused kernels for small ops that MLX would otherwise run as dozens of launches.

On the GPU backends the decode step is launch-bound (each MLX primitive costs tens of µs on
CUDA whatever its size), so a 4×4 Sinkhorn normalisation written with array ops — 2 reductions
and 2 divisions per iteration, 20 iterations, twice per layer — costs ~80 launches per mHC site,
about 40 % of all launches of a decoded token. `sinkhorn` runs it as one launch (one thread per
matrix, the reference's operation order in float32) where a custom-kernel backend is available,
and as the compiled array expression elsewhere (CPU, where the tests run).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import mlx.core as mx

_CUDA_SOURCE = """
    auto r = cooperative_groups::this_grid().thread_rank();
    if (r >= (size_t)n_in[0]) return;
    const float eps = eps_in[0];
    float c[HC * HC];
    for (int k = 0; k < HC * HC; ++k) c[k] = (float)comb[r * HC * HC + k];
    for (int i = 0; i < HC; ++i) {  // softmax over each row, then + eps
        float m = c[i * HC];
        for (int j = 1; j < HC; ++j) m = fmaxf(m, c[i * HC + j]);
        float s = 0.f;
        for (int j = 0; j < HC; ++j) { c[i * HC + j] = expf(c[i * HC + j] - m); s += c[i * HC + j]; }
        for (int j = 0; j < HC; ++j) c[i * HC + j] = c[i * HC + j] / s + eps;
    }
    for (int it = 0; it < ITERS; ++it) {
        if (it > 0) {  // rows
            for (int i = 0; i < HC; ++i) {
                float s = 0.f;
                for (int j = 0; j < HC; ++j) s += c[i * HC + j];
                s += eps;
                for (int j = 0; j < HC; ++j) c[i * HC + j] = c[i * HC + j] / s;
            }
        }
        for (int j = 0; j < HC; ++j) {  // columns
            float s = 0.f;
            for (int i = 0; i < HC; ++i) s += c[i * HC + j];
            s += eps;
            for (int i = 0; i < HC; ++i) c[i * HC + j] = c[i * HC + j] / s;
        }
    }
    for (int k = 0; k < HC * HC; ++k) out[r * HC * HC + k] = c[k];
"""


@functools.cache
def cuda_kernel(name: str, inputs: tuple[str, ...], outputs: tuple[str, ...], source: str):
    """The `mx.fast.cuda_kernel` of this source, built once per process and reused by every
    call (the kernels of engine/fused.py and engine/decode_kernels.py)."""
    return mx.fast.cuda_kernel(
        name=name, input_names=list(inputs), output_names=list(outputs), source=source
    )


def _cuda_kernel():
    return cuda_kernel("ds4_sinkhorn", ("comb", "eps_in", "n_in"), ("out",), _CUDA_SOURCE)


def use_cuda() -> bool:
    try:
        return mx.default_device() == mx.gpu and mx.cuda.is_available()
    except AttributeError:  # builds without the CUDA module
        return False


def sinkhorn_reference(comb: mx.array, iters: int, eps: float) -> mx.array:
    """Softmax rows, then alternate column/row normalisation, ending on columns (spec §2.2)."""
    comb = mx.softmax(comb, axis=-1, precise=True) + eps
    comb = comb / (comb.sum(axis=-2, keepdims=True) + eps)
    for _ in range(iters - 1):
        comb = comb / (comb.sum(axis=-1, keepdims=True) + eps)
        comb = comb / (comb.sum(axis=-2, keepdims=True) + eps)
    return comb


def make_sinkhorn(
    iters: int, eps: float, fused: bool | None = None
) -> Callable[[mx.array], mx.array]:
    """comb [..., hc, hc] float32 → doubly-normalised [..., hc, hc] float32.

    `fused=None` picks the one-launch kernel on CUDA and the compiled expression elsewhere."""
    ref = mx.compile(lambda c: sinkhorn_reference(c, iters, eps))
    if fused is None:
        fused = use_cuda()
    if not fused:
        return ref
    eps_arr = mx.array([eps], dtype=mx.float32)

    def run(comb: mx.array) -> mx.array:
        hc = comb.shape[-1]
        n = comb.size // (hc * hc)
        out = _cuda_kernel()(
            inputs=[comb.astype(mx.float32), eps_arr, mx.array([n], dtype=mx.int32)],
            template=[("HC", hc), ("ITERS", iters)],
            grid=(max(n, 1), 1, 1),
            threadgroup=(min(max(n, 1), 128), 1, 1),
            output_shapes=[comb.shape],
            output_dtypes=[mx.float32],
        )
        return out[0]

    return run
