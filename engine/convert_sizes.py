"""Sizes and memory fit: the real Flash tensor list (shapes/dtypes only), per-tier output sizes,
KV-state bytes per token, and whether a model fits a Mac's memory with what context budget.

The Flash tensor list is rebuilt from the published shapes (engine-spec §4.1) so that
`model convert --dry-run` and the size targets can be checked without the 160 GB checkpoint.

Memory model (`fit`): usable memory = RAM − max(8 GiB, RAM/8) — what a Mac leaves to a single
GPU process once `iogpu.wired_limit_mb` is raised (the default limit is lower); the model needs
its weights + a runtime overhead (activations, prefill scratch: 2 GiB for Flash) + the decode
state for the context (BF16 rows, spec §3.1/§3.2).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ds4_agent.engine.config import v4_rope_config
from ds4_agent.engine.weights import TensorEntry

GIB = 1 << 30
MAC_TIERS_GB = (96, 128, 192, 256, 512)  # Apple's "GB" sizes are binary
RUNTIME_OVERHEAD = 2 * GIB
# Size targets per tier for the full Flash model (issue 5); q3/lossless are ours.
TIER_TARGET_GIB = {"q2": 92.0, "q3": 125.0, "q4": 150.0, "lossless": 150.0}


# --------------------------------------------------------------------------------------------
# The real DeepSeek V4 Flash checkpoint, shapes and dtypes only
# --------------------------------------------------------------------------------------------

FLASH_CONFIG: dict[str, Any] = {
    "architectures": ["DeepseekV4ForCausalLM"],
    "model_type": "deepseek_v4",
    "vocab_size": 129280,
    "hidden_size": 4096,
    "moe_intermediate_size": 2048,
    "num_hidden_layers": 43,
    "num_attention_heads": 64,
    "num_key_value_heads": 1,
    "head_dim": 512,
    "qk_rope_head_dim": 64,
    "q_lora_rank": 1024,
    "o_groups": 8,
    "o_lora_rank": 1024,
    "n_routed_experts": 256,
    "n_shared_experts": 1,
    "num_experts_per_tok": 6,
    "scoring_func": "sqrtsoftplus",
    "topk_method": "noaux_tc",
    "norm_topk_prob": True,
    "routed_scaling_factor": 1.5,
    "num_hash_layers": 3,
    "sliding_window": 128,
    "compress_ratios": [0, 0] + [4 if i % 2 == 0 else 128 for i in range(2, 43)] + [0],
    **v4_rope_config(),
    "index_n_heads": 64,
    "index_head_dim": 128,
    "index_topk": 512,
    "hc_mult": 4,
    "hc_sinkhorn_iters": 20,
    "hc_eps": 1e-6,
    "swiglu_limit": 10.0,
    "rms_norm_eps": 1e-6,
    "max_position_embeddings": 1048576,
    "num_nextn_predict_layers": 1,
    "bos_token_id": 0,
    "eos_token_id": 1,
}


def _fp8(out: dict, name: str, rows: int, cols: int) -> None:
    out[name] = ("F8_E4M3", (rows, cols))
    out[name[: -len(".weight")] + ".scale"] = ("F8_E8M0", (-(-rows // 128), -(-cols // 128)))


def _fp4(out: dict, name: str, rows: int, cols: int) -> None:
    out[name] = ("I8", (rows, cols // 2))
    out[name[: -len(".weight")] + ".scale"] = ("F8_E8M0", (rows, cols // 32))


def _layer(out: dict, p: str, cfg: dict[str, Any], ratio: int, hash_layer: bool) -> None:
    d, hc = cfg["hidden_size"], cfg["hc_mult"]
    hd, inter, n_exp = cfg["head_dim"], cfg["moe_intermediate_size"], cfg["n_routed_experts"]
    mix = (2 + hc) * hc
    for n in ("attn_norm.weight", "ffn_norm.weight"):
        out[p + n] = ("BF16", (d,))
    for site in ("attn", "ffn"):
        out[f"{p}hc_{site}_fn"] = ("F32", (mix, hc * d))
        out[f"{p}hc_{site}_base"] = ("F32", (mix,))
        out[f"{p}hc_{site}_scale"] = ("F32", (3,))
    q, heads, og, olr = (
        cfg["q_lora_rank"],
        cfg["num_attention_heads"],
        cfg["o_groups"],
        cfg["o_lora_rank"],
    )
    _fp8(out, p + "attn.wq_a.weight", q, d)
    out[p + "attn.q_norm.weight"] = ("BF16", (q,))
    _fp8(out, p + "attn.wq_b.weight", heads * hd, q)
    _fp8(out, p + "attn.wkv.weight", hd, d)
    out[p + "attn.kv_norm.weight"] = ("BF16", (hd,))
    _fp8(out, p + "attn.wo_a.weight", og * olr, heads * hd // og)
    _fp8(out, p + "attn.wo_b.weight", d, og * olr)
    out[p + "attn.attn_sink"] = ("F32", (heads,))
    if ratio:
        width = hd * (2 if ratio == 4 else 1)
        out[p + "attn.compressor.wkv.weight"] = ("BF16", (width, d))
        out[p + "attn.compressor.wgate.weight"] = ("BF16", (width, d))
        out[p + "attn.compressor.ape"] = ("F32", (ratio, width))
        out[p + "attn.compressor.norm.weight"] = ("BF16", (hd,))
    if ratio == 4:
        ih, idim = cfg["index_n_heads"], cfg["index_head_dim"]
        _fp8(out, p + "attn.indexer.wq_b.weight", ih * idim, q)
        out[p + "attn.indexer.weights_proj.weight"] = ("BF16", (ih, d))
        out[p + "attn.indexer.compressor.wkv.weight"] = ("BF16", (2 * idim, d))
        out[p + "attn.indexer.compressor.wgate.weight"] = ("BF16", (2 * idim, d))
        out[p + "attn.indexer.compressor.ape"] = ("F32", (4, 2 * idim))
        out[p + "attn.indexer.compressor.norm.weight"] = ("BF16", (idim,))
    out[p + "ffn.gate.weight"] = ("BF16", (n_exp, d))
    if hash_layer:
        out[p + "ffn.gate.tid2eid"] = ("I64", (cfg["vocab_size"], cfg["num_experts_per_tok"]))
    else:
        out[p + "ffn.gate.bias"] = ("F32", (n_exp,))
    for e in range(n_exp):
        _fp4(out, f"{p}ffn.experts.{e}.w1.weight", inter, d)
        _fp4(out, f"{p}ffn.experts.{e}.w3.weight", inter, d)
        _fp4(out, f"{p}ffn.experts.{e}.w2.weight", d, inter)
    _fp8(out, p + "ffn.shared_experts.w1.weight", inter, d)
    _fp8(out, p + "ffn.shared_experts.w3.weight", inter, d)
    _fp8(out, p + "ffn.shared_experts.w2.weight", d, inter)


def flash_entries(cfg: dict[str, Any] | None = None) -> dict[str, TensorEntry]:
    """Every tensor of the official Flash checkpoint (main model + MTP) as shape-only entries."""
    cfg = cfg or FLASH_CONFIG
    spec: dict[str, tuple[str, tuple[int, ...]]] = {}
    d, hc, v = cfg["hidden_size"], cfg["hc_mult"], cfg["vocab_size"]
    spec["embed.weight"] = ("BF16", (v, d))
    n = cfg["num_hidden_layers"]
    for layer in range(n):
        _layer(
            spec,
            f"layers.{layer}.",
            cfg,
            cfg["compress_ratios"][layer],
            layer < cfg["num_hash_layers"],
        )
    for m in range(cfg.get("num_nextn_predict_layers", 0)):
        p = f"mtp.{m}."
        _fp8(spec, p + "e_proj.weight", d, d)
        _fp8(spec, p + "h_proj.weight", d, d)
        for nm in ("enorm.weight", "hnorm.weight", "norm.weight"):
            spec[p + nm] = ("BF16", (d,))
        spec[p + "hc_head_fn"] = ("F32", (hc, hc * d))
        spec[p + "hc_head_base"] = ("F32", (hc,))
        spec[p + "hc_head_scale"] = ("F32", (1,))
        _layer(spec, p, cfg, 0, False)
    spec["norm.weight"] = ("BF16", (d,))
    spec["head.weight"] = ("BF16", (v, d))
    spec["hc_head_fn"] = ("F32", (hc, hc * d))
    spec["hc_head_base"] = ("F32", (hc,))
    spec["hc_head_scale"] = ("F32", (1,))
    size = {"BF16": 2, "F32": 4, "I64": 8, "I8": 1, "F8_E4M3": 1, "F8_E8M0": 1}
    out = {}
    for name, (dtype, shape) in spec.items():
        nb = size[dtype]
        for s in shape:
            nb *= s
        out[name] = TensorEntry(name, dtype, shape, Path(""), 0, nb)
    return out


# --------------------------------------------------------------------------------------------
# Decode-state bytes and memory fit
# --------------------------------------------------------------------------------------------


def state_bytes_per_token(cfg: dict[str, Any]) -> float:
    """BF16 compressed rows + index keys per token (spec §3.2: 6 880 B for Flash)."""
    hd, idim = cfg["head_dim"], cfg["index_head_dim"]
    total = 0.0
    for r in cfg["compress_ratios"][: cfg["num_hidden_layers"]]:
        if r == 4:
            total += 2 * hd / 4 + 2 * idim / 4
        elif r:
            total += 2 * hd / r
    return total


def state_fixed_bytes(cfg: dict[str, Any]) -> int:
    """Raw windows (BF16) + FP32 compressor frontiers, independent of the context length."""
    hd, w, n = cfg["head_dim"], cfg["sliding_window"], cfg["num_hidden_layers"]
    idim = cfg["index_head_dim"]
    fixed = n * w * hd * 2
    for r in cfg["compress_ratios"][:n]:
        if r == 4:
            fixed += 2 * 8 * 2 * hd * 4 + 2 * 8 * 2 * idim * 4
        elif r:
            fixed += 2 * r * hd * 4
    return fixed + cfg["vocab_size"] * 4


def usable_memory(total_bytes: int) -> int:
    """What one GPU process can hold: RAM minus max(8 GiB, RAM/8) on Mac-sized machines (less
    reserve on small test machines: at most a quarter of RAM)."""
    return total_bytes - max(min(8 * GIB, total_bytes // 4), total_bytes // 8)


def runtime_overhead(weights_bytes: int) -> int:
    """Activations and prefill scratch: 2 GiB for Flash, proportionally less for small models."""
    return min(RUNTIME_OVERHEAD, weights_bytes // 10 + (256 << 20))


def physical_memory() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 0


@dataclass
class Fit:
    memory_bytes: int
    usable_bytes: int
    weights_bytes: int
    fits: bool
    context_tokens: int  # largest context the state fits in (capped at the model's maximum)

    @property
    def label(self) -> str:
        if not self.fits:
            short = (
                self.weights_bytes + runtime_overhead(self.weights_bytes) - self.usable_bytes
            ) / GIB
            return f"no (short by {short:.1f} GiB)"
        return f"yes, context up to {_tokens(self.context_tokens)}"


def _tokens(n: int) -> str:
    if n >= 1 << 20:
        return f"{n / (1 << 20):.2g}M tokens" if n % (1 << 20) else f"{n >> 20}M tokens"
    return f"{n // 1024}K tokens"


def fit(weights_bytes: int, cfg: dict[str, Any], memory_bytes: int, min_context: int = 4096) -> Fit:
    usable = usable_memory(memory_bytes)
    free = usable - weights_bytes - runtime_overhead(weights_bytes) - state_fixed_bytes(cfg)
    per = max(state_bytes_per_token(cfg), 1.0)
    ctx = int(max(free, 0) // per)
    ctx = min(ctx, int(cfg.get("max_position_embeddings", 1 << 20)))
    return Fit(memory_bytes, usable, weights_bytes, ctx >= min_context, ctx)


def mac_fits(weights_bytes: int, cfg: dict[str, Any]) -> dict[int, Fit]:
    return {gb: fit(weights_bytes, cfg, gb * GIB) for gb in MAC_TIERS_GB}


class InsufficientMemoryError(RuntimeError):
    """The model (plus the requested context) does not fit this machine's memory."""


def model_weight_bytes(model_dir: str | Path) -> int:
    """Bytes of weights on disk (safetensors shards), which is what MLX will hold in memory."""
    d = Path(model_dir)
    index = d / "model.safetensors.index.json"
    if index.is_file():
        shards = set(json.loads(index.read_text())["weight_map"].values())
        return sum((d / s).stat().st_size for s in shards if (d / s).is_file())
    return sum(p.stat().st_size for p in d.glob("*.safetensors"))


def check_memory_fit(
    model_dir: str | Path, context_tokens: int = 4096, memory_bytes: int | None = None
) -> Fit:
    """Raise `InsufficientMemoryError` (one clear line) when the model cannot run here with
    `context_tokens` of context; return the fit otherwise. Set DS4_SKIP_MEMORY_CHECK=1 to skip."""
    cfg = json.loads((Path(model_dir) / "config.json").read_text())
    weights = model_weight_bytes(model_dir)
    mem = memory_bytes if memory_bytes is not None else physical_memory()
    f = fit(weights, cfg, mem, min_context=context_tokens)
    if mem and not f.fits and os.environ.get("DS4_SKIP_MEMORY_CHECK") != "1":
        need = weights + runtime_overhead(weights) + state_fixed_bytes(cfg)
        need += int(context_tokens * state_bytes_per_token(cfg))
        raise InsufficientMemoryError(
            f"{model_dir}: needs about {need / GIB:.1f} GiB for weights + {context_tokens} tokens "
            f"of context, but this machine can give a model about {f.usable_bytes / GIB:.1f} GiB "
            f"of its {mem / GIB:.0f} GiB; use a smaller tier (`ds4-agent model convert --tier q2`) "
            "or a shorter --ctx"
        )
    return f
