"""Random DeepSeek V4 weights generated in memory, for benchmarks and smoke tests.

`weight_shapes(cfg)` lists every tensor the forward pass reads, by official name, with its
logical shape (routed experts stacked: [n_experts, out, in]). `synthetic_weights` fills them
with seeded random values and, with `quantized=True`, stores the official FP8 matrices as MLX
`mxfp8` and the routed experts as `mxfp4` (the lossless target formats of the real
checkpoint), so the quantized kernels are exercised.
"""

from __future__ import annotations

import math

import mlx.core as mx
from ds4_agent.engine.config import ModelConfig, v4_rope_config
from ds4_agent.engine.qtensor import QuantizedTensor, Weight

_FP8_NAMES = ("wq_a", "wq_b", "wkv", "wo_a", "wo_b", "indexer.wq_b", "shared_experts")


def synthetic_config(size: str = "mid") -> ModelConfig:
    """ "mid": a few-hundred-MB Flash-shaped model that runs on a CI CPU in seconds."""
    if size != "mid":
        raise ValueError(f"unknown synthetic size {size!r} (known: mid)")
    return ModelConfig.from_dict(
        {
            "model_type": "deepseek_v4",
            "vocab_size": 8192,
            "hidden_size": 512,
            "moe_intermediate_size": 256,
            "num_hidden_layers": 4,
            "num_attention_heads": 8,
            "head_dim": 256,
            "qk_rope_head_dim": 64,
            "q_lora_rank": 256,
            "o_groups": 4,
            "o_lora_rank": 256,
            "n_routed_experts": 32,
            "num_experts_per_tok": 4,
            "routed_scaling_factor": 1.5,
            "num_hash_layers": 1,
            "sliding_window": 128,
            "compress_ratios": [0, 4, 128, 4, 0],
            **v4_rope_config(),
            "index_n_heads": 8,
            "index_head_dim": 128,
            "index_topk": 64,
            "hc_mult": 4,
            "hc_sinkhorn_iters": 20,
            "hc_eps": 1e-6,
            "swiglu_limit": 10.0,
            "rms_norm_eps": 1e-6,
        },
        source="synthetic config",
    )


def weight_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    d, hc = cfg.hidden_size, cfg.hc_mult
    h, hd = cfg.num_attention_heads, cfg.head_dim
    e, inter = cfg.n_routed_experts, cfg.moe_intermediate_size
    di, hi = cfg.index_head_dim, cfg.index_n_heads
    mix = (2 + hc) * hc
    out: dict[str, tuple[int, ...]] = {
        "embed.weight": (cfg.vocab_size, d),
        "head.weight": (cfg.vocab_size, d),
        "norm.weight": (d,),
        "hc_head_fn": (hc, hc * d),
        "hc_head_base": (hc,),
        "hc_head_scale": (1,),
    }
    for i, r in enumerate(cfg.ratios):
        p = f"layers.{i}."
        out |= {
            p + "attn_norm.weight": (d,),
            p + "ffn_norm.weight": (d,),
            p + "hc_attn_fn": (mix, hc * d),
            p + "hc_attn_base": (mix,),
            p + "hc_attn_scale": (3,),
            p + "hc_ffn_fn": (mix, hc * d),
            p + "hc_ffn_base": (mix,),
            p + "hc_ffn_scale": (3,),
            p + "attn.wq_a.weight": (cfg.q_lora_rank, d),
            p + "attn.q_norm.weight": (cfg.q_lora_rank,),
            p + "attn.wq_b.weight": (h * hd, cfg.q_lora_rank),
            p + "attn.wkv.weight": (hd, d),
            p + "attn.kv_norm.weight": (hd,),
            p + "attn.wo_a.weight": (cfg.o_groups * cfg.o_lora_rank, h * hd // cfg.o_groups),
            p + "attn.wo_b.weight": (d, cfg.o_groups * cfg.o_lora_rank),
            p + "attn.attn_sink": (h,),
            p + "ffn.gate.weight": (e, d),
            p + "ffn.experts.w1.weight": (e, inter, d),
            p + "ffn.experts.w3.weight": (e, inter, d),
            p + "ffn.experts.w2.weight": (e, d, inter),
            p + "ffn.shared_experts.w1.weight": (inter, d),
            p + "ffn.shared_experts.w3.weight": (inter, d),
            p + "ffn.shared_experts.w2.weight": (d, inter),
        }
        if cfg.is_hash_layer(i):
            out[p + "ffn.gate.tid2eid"] = (cfg.vocab_size, cfg.num_experts_per_tok)
        else:
            out[p + "ffn.gate.bias"] = (e,)
        if r:
            cw = 2 * hd if r == 4 else hd
            out |= {
                p + "attn.compressor.wkv.weight": (cw, d),
                p + "attn.compressor.wgate.weight": (cw, d),
                p + "attn.compressor.ape": (r, cw),
                p + "attn.compressor.norm.weight": (hd,),
            }
        if r == 4:
            out |= {
                p + "attn.indexer.wq_b.weight": (hi * di, cfg.q_lora_rank),
                p + "attn.indexer.weights_proj.weight": (hi, d),
                p + "attn.indexer.compressor.wkv.weight": (2 * di, d),
                p + "attn.indexer.compressor.wgate.weight": (2 * di, d),
                p + "attn.indexer.compressor.ape": (4, 2 * di),
                p + "attn.indexer.compressor.norm.weight": (di,),
            }
    return out


def _quantize(w: mx.array, mode: str) -> QuantizedTensor:
    bits = 4 if mode == "mxfp4" else 8
    q, s = mx.quantize(w, group_size=32, bits=bits, mode=mode)[:2]
    return QuantizedTensor(q, s, None, mode, bits, 32)


def synthetic_weights(cfg: ModelConfig, seed: int = 0, quantized: bool = True) -> dict[str, Weight]:
    key = mx.random.key(seed)
    out: dict[str, Weight] = {}
    for i, (name, shape) in enumerate(sorted(weight_shapes(cfg).items())):
        k = mx.random.fold_in(key, i) if hasattr(mx.random, "fold_in") else mx.random.key(seed + i)
        if name.endswith("tid2eid"):
            out[name] = mx.random.randint(0, cfg.n_routed_experts, shape, key=k).astype(mx.int32)
            continue
        if len(shape) == 1 or name.endswith(("_base", "_scale", "attn_sink", "ape", "gate.bias")):
            base = 1.0 if name.endswith(("norm.weight", "_scale")) else 0.0
            out[name] = base + 0.1 * mx.random.normal(shape, key=k)
            continue
        w = mx.random.normal(shape, key=k) / math.sqrt(shape[-1])
        if quantized and ".experts." in name:
            out[name] = _quantize(w, "mxfp4")
        elif quantized and any(f".{n}" in name for n in _FP8_NAMES):
            out[name] = _quantize(w, "mxfp8")
        elif name in ("embed.weight", "head.weight") or "compressor" in name:
            out[name] = w.astype(mx.bfloat16)
        else:
            out[name] = w
    mx.eval(*[a for w in out.values() for a in _arrays(w)])
    return out


def _arrays(w: Weight) -> list[mx.array]:
    if isinstance(w, QuantizedTensor):
        return [a for a in (w.weight, w.scales, w.biases) if a is not None]
    return [w]


def active_weight_bytes(cfg: ModelConfig, weights: dict[str, Weight]) -> int:
    """Bytes of weights one decoded token reads: everything except the embedding table (one
    row) and the routed experts (k of n per layer)."""
    frac = cfg.num_experts_per_tok / cfg.n_routed_experts
    total = 0
    for name, w in weights.items():
        n = sum(a.nbytes for a in _arrays(w))
        if name == "embed.weight":
            n //= cfg.vocab_size
        elif name.endswith("tid2eid"):
            n = 0
        elif ".ffn.experts." in name:
            n = int(n * frac)
        total += n
    return total


# --------------------------------------------------------------------------------------------
# Real-shape models in a converted tier (benchmarks on a GPU)
# --------------------------------------------------------------------------------------------

# What each tensor class becomes in a converted tier (mirrors `engine/convert.py`'s table):
# routed experts affine 2-bit g64 (q2) or mxfp4 (q4); the official FP8 matrices mxfp8; the head
# affine 8-bit g64 in q2, bf16 in q4; everything else kept (bf16 here; hc mixers float32).
TIER_EXPERTS = {"q2": ("affine", 2, 64), "q4": ("mxfp4", 4, 32)}
_HEAD_Q2 = ("affine", 8, 64)
_MXFP8 = ("mxfp8", 8, 32)
# Experts quantized per block of this many: one mx.quantize over a whole 256-expert stack
# (2^31+ elements) fails on CUDA.
_EXPERT_BLOCK = 16


def flash_config(n_layers: int | None = None) -> ModelConfig:
    """The real DeepSeek V4 Flash config, optionally cut to its first `n_layers` layers (a
    contiguous slice keeps the SWA/SWA/CSA/HCA… pattern)."""
    from ds4_agent.engine.convert_sizes import FLASH_CONFIG

    data = dict(FLASH_CONFIG)
    if n_layers is not None:
        if not 1 <= n_layers <= FLASH_CONFIG["num_hidden_layers"]:
            raise ValueError(f"n_layers must be in 1..43, got {n_layers}")
        data["num_hidden_layers"] = n_layers
        data["compress_ratios"] = list(FLASH_CONFIG["compress_ratios"][:n_layers]) + [0]
    return ModelConfig.from_dict(data, source="flash config")


def _tier_format(name: str, tier: str) -> tuple[str, int, int] | None:
    if ".experts." in name:
        return TIER_EXPERTS[tier]
    if any(f".{n}" in name for n in _FP8_NAMES):
        return _MXFP8
    if name == "head.weight" and tier == "q2":
        return _HEAD_Q2
    return None


def _qt(w: mx.array, fmt: tuple[str, int, int]) -> QuantizedTensor:
    mode, bits, g = fmt
    res = mx.quantize(w, group_size=g, bits=bits, mode=mode)
    return QuantizedTensor(res[0], res[1], res[2] if mode == "affine" else None, mode, bits, g)


def _random_matrix(shape: tuple[int, ...], key: mx.array) -> mx.array:
    return (mx.random.normal(shape, key=key) * (1.0 / math.sqrt(shape[-1]))).astype(mx.bfloat16)


def tier_weights(cfg: ModelConfig, tier: str, seed: int = 0) -> dict[str, Weight]:
    """Random weights with `cfg`'s shapes, stored as the converted `tier` stores them, generated
    and quantized on the default device tensor by tensor (expert stacks in blocks), so the
    peak is the model plus one expert block — never a float copy of the whole model."""
    if tier not in TIER_EXPERTS:
        raise ValueError(f"tier must be one of {sorted(TIER_EXPERTS)}, got {tier!r}")
    key = mx.random.key(seed)
    out: dict[str, Weight] = {}
    for i, (name, shape) in enumerate(sorted(weight_shapes(cfg).items())):
        k = mx.random.key(seed * 1_000_003 + i) if i else key
        if name.endswith("tid2eid"):
            out[name] = mx.random.randint(0, cfg.n_routed_experts, shape, key=k).astype(mx.int32)
        elif len(shape) == 1 or name.endswith(("_base", "_scale", "attn_sink", "ape", "gate.bias")):
            base = 1.0 if name.endswith(("norm.weight", "_scale")) else 0.0
            out[name] = base + 0.1 * mx.random.normal(shape, key=k)
        elif (fmt := _tier_format(name, tier)) is None:
            w = _random_matrix(shape, k)
            out[name] = w.astype(mx.float32) if "hc_" in name else w  # hc mixers are F32
        elif len(shape) == 3:
            parts = []
            for a in range(0, shape[0], _EXPERT_BLOCK):
                n = min(_EXPERT_BLOCK, shape[0] - a)
                q = _qt(_random_matrix((n, *shape[1:]), mx.random.key(seed + 7919 * i + a)), fmt)
                mx.eval(*_arrays(q))
                parts.append(q)
            out[name] = _concat_q(parts)
        else:
            out[name] = _qt(_random_matrix(shape, k), fmt)
        mx.eval(*_arrays(out[name]))
    return out


def _concat_q(parts: list[QuantizedTensor]) -> QuantizedTensor:
    first = parts[0]
    cat = [mx.concatenate([getattr(p, f) for p in parts]) for f in ("weight", "scales")]
    biases = mx.concatenate([p.biases for p in parts]) if first.biases is not None else None
    return QuantizedTensor(cat[0], cat[1], biases, first.mode, first.bits, first.group_size)
