"""One weight matrix (or stack of expert matrices) in MLX's quantized form.

Every loader (official checkpoint, converted MLX tiers, GGUF) returns weights keyed by the
official checkpoint names (`layers.3.attn.wq_a.weight`, `embed.weight`, …) with each value either
a plain `mx.array` or a `QuantizedTensor`. Routed experts are returned stacked, one entry per
projection and layer, without the expert index in the name:
`layers.L.ffn.experts.w1.weight` → logical shape [n_experts, out, in] (likewise w2, w3).
The forward pass only ever sees this type, so it does not care where the bytes came from.
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx


@dataclass
class QuantizedTensor:
    weight: mx.array  # packed uint32 [..., out, in * bits / 32]
    scales: mx.array  # [..., out, in / group_size]; uint8 e8m0 for mx* modes
    biases: mx.array | None  # affine mode only
    mode: str  # "affine" | "mxfp4" | "mxfp8"
    bits: int
    group_size: int
    # dtype the activations are cast to before a matmul with this weight; None keeps them as
    # they come (float32). The `bf16` numerics mode sets bfloat16 here: the official reference
    # feeds its low-precision GEMMs low-precision activations, and on GPUs the quantized
    # kernels run 4-5x faster on bf16 inputs than on float32 ones.
    input_dtype: mx.Dtype | None = None

    @property
    def shape(self) -> tuple[int, ...]:
        """Logical (dequantized) shape."""
        *lead, packed = self.weight.shape
        return (*lead, packed * 32 // self.bits)

    def dequantize(self, dtype: mx.Dtype = mx.float32) -> mx.array:
        scales, biases = self.scales, self.biases
        if self.mode == "affine" and dtype == mx.float32:
            # mx.dequantize computes in the scales' dtype: fp16/bf16 scales would round the
            # weights, while quantized_matmul accumulates s·q + b in float32.
            scales = scales.astype(mx.float32)
            biases = None if biases is None else biases.astype(mx.float32)
        w = mx.dequantize(
            self.weight,
            scales,
            biases,
            group_size=self.group_size,
            bits=self.bits,
            mode=self.mode,
            dtype=dtype,
        )
        return w.astype(dtype)


Weight = mx.array | QuantizedTensor
