"""Tiny random DeepSeek V4 checkpoints in the official on-disk format, plus their reference.

A checkpoint is built from transformers' `DeepseekV4ForCausalLM` (float32, random weights from
our own seeded generator) and exported exactly like the official Hugging Face release
(engine-spec §4.1): official tensor names, sharded safetensors + `model.safetensors.index.json`,
and a `config.json` with the official keys (`compress_ratios` including the MTP slot,
`num_hash_layers`, `rope_scaling`, `compress_rope_theta`, …). With `quantized=True` the FP8
matrices are written as F8_E4M3 with 128×128 F8_E8M0 block scales and the routed experts as
FP4 e2m1 packed in I8 with an e8m0 scale per 32 inputs; BF16-class tensors are written BF16.

The reference model is always rebuilt *from the files on disk* (dequantized exactly), so the
engine and transformers see bit-identical weights. The MTP block (`mtp.0.*`) is exported too,
although transformers ignores it.

Exports are cached per (config, options, this file's source) under a hash-named directory, so
many tests (and xdist workers) share one build; a build is written to a temporary sibling and
renamed into place atomically.

How transformers 5.23.0 relates to the spec's §1.3 traps (checked while writing this):
- It maps the official `compress_ratios` list 0→sliding, 4→CSA, 128→HCA and truncates it to
  `num_hidden_layers`, i.e. it drops the trailing MTP slot; without the list it would build the
  V4-Pro schedule, so we always write the list.
- `qk_rope_head_dim` becomes `partial_rotary_factor`; RoPE rotates the *trailing* channels of
  each head, interleaved pairs; YaRN applies to the "compress" rope only, with
  `attention_factor=1` (no mscale), matching the spec.
- It does not simulate FP8 KV storage nor the Hadamard+FP4 indexer rounding (spec §2.8): it is
  the reference of our `exact` numerics only.
- It ignores `mtp.*` weights entirely.
- The sliding window is `kv > q - sliding_window` (current token + window-1 previous).
"""

from __future__ import annotations

import copy
import functools
import hashlib
import json
import os
import shutil
import struct
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
from ds4_agent.engine import quant
from ds4_agent.engine.config import v4_rope_config

REAL_VOCAB = 129_280

# --------------------------------------------------------------------------------------------
# Configs
# --------------------------------------------------------------------------------------------


def base_config(vocab: int = 512) -> dict[str, Any]:
    """Official-key config with tiny dims. head_dim 256 = 192 "nope" (3 FP8 blocks of 64) + 64
    RoPE, so every scaled-down split of the real 448/64 layout is exercised; all matrix dims
    are multiples of 128 so FP8 128×128 blocks and FP4 32-groups tile exactly."""
    return {
        "architectures": ["DeepseekV4ForCausalLM"],
        "model_type": "deepseek_v4",
        "vocab_size": vocab,
        "hidden_size": 128,
        "moe_intermediate_size": 128,
        "num_hidden_layers": 6,
        "num_attention_heads": 4,
        "num_key_value_heads": 1,
        "head_dim": 256,
        "qk_rope_head_dim": 64,
        "q_lora_rank": 128,
        "o_groups": 2,
        "o_lora_rank": 128,
        "n_routed_experts": 8,
        "n_shared_experts": 1,
        "num_experts_per_tok": 2,
        "n_group": 1,
        "topk_group": 1,
        "scoring_func": "sqrtsoftplus",
        "topk_method": "noaux_tc",
        "norm_topk_prob": True,
        "routed_scaling_factor": 1.5,
        "num_hash_layers": 3,
        "sliding_window": 128,
        # Flash layer pattern; the last entry is the MTP block's slot.
        "compress_ratios": [0, 0, 4, 128, 4, 128, 0],
        **v4_rope_config(),
        # 16 heads: a row scores exactly 0 (ReLU of every head) with probability 2^-16,
        # so exact ties at the top-k boundary practically never happen.
        "index_n_heads": 16,
        "index_head_dim": 128,
        "index_topk": 8,
        "hc_mult": 4,
        "hc_sinkhorn_iters": 20,
        "hc_eps": 1e-6,
        "swiglu_limit": 10.0,
        "rms_norm_eps": 1e-6,
        "hidden_act": "silu",
        "max_position_embeddings": 1048576,
        "num_nextn_predict_layers": 1,
        "bos_token_id": 0,
        "eos_token_id": 1,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
    }


def flash_config(vocab: int = 512) -> dict[str, Any]:
    """Flash pattern [0,0,4,128,4,128] + MTP slot, 3 hash layers, real 128-token window."""
    return base_config(vocab)


def window_config(vocab: int = 512) -> dict[str, Any]:
    """A small sliding window (16) so T ≥ 300 crosses many window boundaries; CSA first."""
    cfg = base_config(vocab)
    cfg.update(
        num_hidden_layers=4,
        sliding_window=16,
        compress_ratios=[4, 128, 0, 4, 0],
        num_hash_layers=1,
        index_topk=4,
    )
    return cfg


def quant_config(vocab: int = 512) -> dict[str, Any]:
    """Flash pattern with the official FP8/FP4 weight formats (use with quantized=True)."""
    cfg = base_config(vocab)
    cfg["quantization_config"] = {
        "quant_method": "fp8",
        "fmt": "e4m3",
        "activation_scheme": "dynamic",
        "weight_block_size": [128, 128],
        "scale_fmt": "ue8m0",
    }
    cfg["expert_dtype"] = "fp4"
    return cfg


PRESETS = {"flash": flash_config, "window": window_config, "quant": quant_config}

# --------------------------------------------------------------------------------------------
# Official ↔ transformers names
# --------------------------------------------------------------------------------------------

# Per-layer official suffix → transformers suffix (under `model.layers.L.`).
_LAYER_MAP = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "hc_attn_fn": "attn_hc.fn",
    "hc_attn_base": "attn_hc.base",
    "hc_attn_scale": "attn_hc.scale",
    "hc_ffn_fn": "ffn_hc.fn",
    "hc_ffn_base": "ffn_hc.base",
    "hc_ffn_scale": "ffn_hc.scale",
    "attn.wq_a.weight": "self_attn.q_a_proj.weight",
    "attn.q_norm.weight": "self_attn.q_a_norm.weight",
    "attn.wq_b.weight": "self_attn.q_b_proj.weight",
    "attn.wkv.weight": "self_attn.kv_proj.weight",
    "attn.kv_norm.weight": "self_attn.kv_norm.weight",
    "attn.wo_a.weight": "self_attn.o_a_proj.weight",
    "attn.wo_b.weight": "self_attn.o_b_proj.weight",
    "attn.attn_sink": "self_attn.sinks",
    "attn.compressor.wkv.weight": "self_attn.compressor.kv_proj.weight",
    "attn.compressor.wgate.weight": "self_attn.compressor.gate_proj.weight",
    "attn.compressor.ape": "self_attn.compressor.position_bias",
    "attn.compressor.norm.weight": "self_attn.compressor.kv_norm.weight",
    "attn.indexer.wq_b.weight": "self_attn.compressor.indexer.q_b_proj.weight",
    "attn.indexer.weights_proj.weight": "self_attn.compressor.indexer.scorer.weights_proj.weight",
    "attn.indexer.compressor.wkv.weight": "self_attn.compressor.indexer.kv_proj.weight",
    "attn.indexer.compressor.wgate.weight": "self_attn.compressor.indexer.gate_proj.weight",
    "attn.indexer.compressor.ape": "self_attn.compressor.indexer.position_bias",
    "attn.indexer.compressor.norm.weight": "self_attn.compressor.indexer.kv_norm.weight",
    "ffn.gate.weight": "mlp.gate.weight",
    "ffn.gate.bias": "mlp.gate.e_score_correction_bias",
    "ffn.gate.tid2eid": "mlp.gate.tid2eid",
    "ffn.shared_experts.w1.weight": "mlp.shared_experts.gate_proj.weight",
    "ffn.shared_experts.w2.weight": "mlp.shared_experts.down_proj.weight",
    "ffn.shared_experts.w3.weight": "mlp.shared_experts.up_proj.weight",
}
_HF_TO_LAYER = {v: k for k, v in _LAYER_MAP.items()}
_GLOBAL_MAP = {
    "embed.weight": "model.embed_tokens.weight",
    "head.weight": "lm_head.weight",
    "norm.weight": "model.norm.weight",
    "hc_head_fn": "model.hc_head.hc_fn",
    "hc_head_base": "model.hc_head.hc_base",
    "hc_head_scale": "model.hc_head.hc_scale",
}
_HF_TO_GLOBAL = {v: k for k, v in _GLOBAL_MAP.items()}

# Official storage class of each tensor (spec §4.1): FP8 matrices, FP4 experts, F32 keep-outs;
# everything else is BF16 in the release.
_FP8_SUFFIXES = (
    "attn.wq_a.weight",
    "attn.wq_b.weight",
    "attn.wkv.weight",
    "attn.wo_a.weight",
    "attn.wo_b.weight",
    "attn.indexer.wq_b.weight",
    "ffn.shared_experts.w1.weight",
    "ffn.shared_experts.w2.weight",
    "ffn.shared_experts.w3.weight",
    "e_proj.weight",
    "h_proj.weight",
)
_F32_SUFFIXES = (
    "_fn",
    "_base",
    "_scale",
    "attn_sink",
    "ape",
    "gate.bias",
)


def _storage_class(name: str) -> str:
    if ".ffn.experts." in name:
        return "fp4"
    if name.endswith("tid2eid"):
        return "i64"
    if name.endswith(_FP8_SUFFIXES):
        return "fp8"
    if name.endswith(_F32_SUFFIXES):
        return "f32"
    return "bf16"


def _hf_to_official(hf: dict[str, np.ndarray], n_experts: int) -> dict[str, np.ndarray]:
    """transformers state dict (numpy) → official names, experts split per expert."""
    out: dict[str, np.ndarray] = {}
    for name, arr in hf.items():
        if name in _HF_TO_GLOBAL:
            out[_HF_TO_GLOBAL[name]] = arr
            continue
        prefix, _, rest = name.partition(".layers.")
        layer, _, suffix = rest.partition(".")
        if prefix != "model" or not layer.isdigit():
            raise KeyError(f"unexpected transformers tensor {name}")
        base = f"layers.{layer}."
        if suffix == "mlp.experts.gate_up_proj":
            inter = arr.shape[1] // 2
            for e in range(n_experts):
                out[f"{base}ffn.experts.{e}.w1.weight"] = arr[e, :inter]
                out[f"{base}ffn.experts.{e}.w3.weight"] = arr[e, inter:]
        elif suffix == "mlp.experts.down_proj":
            for e in range(n_experts):
                out[f"{base}ffn.experts.{e}.w2.weight"] = arr[e]
        else:
            out[base + _HF_TO_LAYER[suffix]] = arr
    return out


def _official_to_hf(off: dict[str, np.ndarray], n_layers: int) -> dict[str, np.ndarray]:
    """Inverse of `_hf_to_official` for the main model (drops `mtp.*`, stacks experts)."""
    out: dict[str, np.ndarray] = {}
    experts: dict[tuple[int, str], dict[int, np.ndarray]] = {}
    for name, arr in off.items():
        if name.startswith("mtp."):
            continue
        if name in _GLOBAL_MAP:
            out[_GLOBAL_MAP[name]] = arr
            continue
        _, layer, suffix = name.split(".", 2)
        if suffix.startswith("ffn.experts."):
            _, _, e, w, _ = suffix.split(".")
            experts.setdefault((int(layer), w), {})[int(e)] = arr
            continue
        out[f"model.layers.{layer}.{_LAYER_MAP[suffix]}"] = arr
    for layer in range(n_layers):
        w1, w2, w3 = (experts[(layer, w)] for w in ("w1", "w2", "w3"))
        n = len(w1)
        out[f"model.layers.{layer}.mlp.experts.gate_up_proj"] = np.stack(
            [np.concatenate([w1[e], w3[e]], axis=0) for e in range(n)]
        )
        out[f"model.layers.{layer}.mlp.experts.down_proj"] = np.stack([w2[e] for e in range(n)])
    return out


# --------------------------------------------------------------------------------------------
# Random weights
# --------------------------------------------------------------------------------------------


def _hf_config(cfg: dict[str, Any]):
    from transformers import DeepseekV4Config

    return DeepseekV4Config(**copy.deepcopy(cfg))


def _randomize(hf_names_shapes: dict[str, tuple[tuple[int, ...], str]], cfg: dict, seed: int):
    """Seeded random values with magnitudes that keep activations O(1) and leave clear gaps
    in the router and indexer rankings (so float rounding never flips a top-k)."""
    rng = np.random.default_rng(seed)
    out: dict[str, np.ndarray] = {}
    n_exp, k = cfg["n_routed_experts"], cfg["num_experts_per_tok"]
    for name in sorted(hf_names_shapes):
        shape, dtype = hf_names_shapes[name]
        leaf = name.rsplit(".", 1)[-1]
        if name.endswith("tid2eid"):
            ids = rng.random((shape[0], n_exp)).argsort(axis=1)[:, :k]  # k distinct per row
            out[name] = ids.astype(np.int64)
            continue
        if name.endswith(("norm.weight",)) and len(shape) == 1:
            v = 1.0 + 0.1 * rng.standard_normal(shape)
        elif leaf == "sinks":
            v = rng.standard_normal(shape)
        elif leaf in ("base", "hc_base"):
            v = 0.5 * rng.standard_normal(shape)
        elif leaf in ("scale", "hc_scale"):
            v = 1.0 + 0.2 * rng.standard_normal(shape)
        elif leaf in ("fn", "hc_fn"):
            v = rng.standard_normal(shape) / np.sqrt(shape[-1])
        elif leaf == "position_bias":
            v = 0.5 * rng.standard_normal(shape)
        elif leaf == "e_score_correction_bias":
            v = 0.1 * rng.standard_normal(shape)
        elif name.endswith("embed_tokens.weight"):
            v = rng.standard_normal(shape)
        elif name.endswith("mlp.gate.weight") or "indexer" in name:
            v = 2.0 * rng.standard_normal(shape) / np.sqrt(shape[-1])
        else:  # projections and experts: unit-gain fan-in scaling
            v = rng.standard_normal(shape) / np.sqrt(shape[-1])
        out[name] = v.astype(np.float32)
    return out


def _mtp_tensors(cfg: dict[str, Any], seed: int) -> dict[str, np.ndarray]:
    """The MTP block (official `mtp.0.*` names): one sliding-window, non-hash decoder layer
    plus its input projections, norms and its own hc head."""
    import torch
    from transformers.models.deepseek_v4.modeling_deepseek_v4 import DeepseekV4DecoderLayer

    one = copy.deepcopy(cfg)
    one.update(num_hidden_layers=1, compress_ratios=[0], num_hash_layers=0)
    layer = DeepseekV4DecoderLayer(_hf_config(one), 0)
    shapes = {
        f"model.layers.0.{n}": (tuple(p.shape), str(p.dtype)) for n, p in layer.state_dict().items()
    }
    del torch
    off = _hf_to_official(_randomize(shapes, cfg, seed + 1), cfg["n_routed_experts"])
    rng = np.random.default_rng(seed + 2)
    h, hc = cfg["hidden_size"], cfg["hc_mult"]
    out = {f"mtp.0.{k[len('layers.0.') :]}": v for k, v in off.items()}
    out["mtp.0.e_proj.weight"] = (rng.standard_normal((h, h)) / np.sqrt(h)).astype(np.float32)
    out["mtp.0.h_proj.weight"] = (rng.standard_normal((h, h)) / np.sqrt(h)).astype(np.float32)
    for n in ("enorm", "hnorm", "norm"):
        out[f"mtp.0.{n}.weight"] = (1.0 + 0.1 * rng.standard_normal(h)).astype(np.float32)
    out["mtp.0.hc_head_fn"] = (rng.standard_normal((hc, hc * h)) / np.sqrt(hc * h)).astype(
        np.float32
    )
    out["mtp.0.hc_head_base"] = (0.5 * rng.standard_normal(hc)).astype(np.float32)
    out["mtp.0.hc_head_scale"] = (1.0 + 0.2 * rng.standard_normal(1)).astype(np.float32)
    return out


# --------------------------------------------------------------------------------------------
# safetensors (written and read by hand: we need F8_E4M3 / F8_E8M0 / I8 exactly as released)
# --------------------------------------------------------------------------------------------

_NP_OF = {
    "F32": np.float32,
    "I64": np.int64,
    "I32": np.int32,
    "I8": np.int8,
    "U8": np.uint8,
    "F8_E4M3": np.uint8,
    "F8_E8M0": np.uint8,
    "BF16": np.uint16,
}


def _bf16_bits(x: np.ndarray) -> np.ndarray:
    """float32 → bf16 bit patterns, round to nearest even."""
    b = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    b = b + 0x7FFF + ((b >> 16) & 1)
    return (b >> 16).astype(np.uint16)


def _bf16_value(bits: np.ndarray) -> np.ndarray:
    return (bits.astype(np.uint32) << 16).view(np.float32)


def write_safetensors(path: Path, tensors: dict[str, tuple[str, np.ndarray]]) -> None:
    """tensors: name → (safetensors dtype, array whose raw bytes are the payload)."""
    header: dict[str, Any] = {}
    offset = 0
    blobs = []
    for name in sorted(tensors):
        dtype, arr = tensors[name]
        data = np.ascontiguousarray(arr).tobytes()
        header[name] = {
            "dtype": dtype,
            "shape": list(arr.shape),
            "data_offsets": [offset, offset + len(data)],
        }
        blobs.append(data)
        offset += len(data)
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(head)))
        f.write(head)
        for b in blobs:
            f.write(b)


def read_safetensors(path: Path) -> dict[str, tuple[str, np.ndarray]]:
    raw = Path(path).read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    out = {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        a, b = meta["data_offsets"]
        arr = np.frombuffer(raw[8 + n + a : 8 + n + b], dtype=_NP_OF[meta["dtype"]])
        out[name] = (meta["dtype"], arr.reshape(meta["shape"]))
    return out


def _encode(name: str, value: np.ndarray, quantized: bool) -> dict[str, tuple[str, np.ndarray]]:
    """One official tensor → its on-disk entries (weight [+ .scale])."""
    cls = _storage_class(name)
    if cls == "i64":
        return {name: ("I64", value.astype(np.int64))}
    if not quantized or cls == "f32":
        return {name: ("F32", value.astype(np.float32))}
    if cls == "bf16":
        return {name: ("BF16", _bf16_bits(value))}
    stem = name[: -len(".weight")]
    if cls == "fp8":
        codes, scales = quant.fp8_block_quantize(value, 128)
        return {name: ("F8_E4M3", codes), f"{stem}.scale": ("F8_E8M0", scales)}
    packed, scales = quant.fp4_row_quantize(value, 32)
    return {name: ("I8", packed.view(np.int8)), f"{stem}.scale": ("F8_E8M0", scales)}


def load_official_float(model_dir: Path) -> dict[str, np.ndarray]:
    """Every official tensor of a checkpoint, dequantized exactly to float32 (int for tid2eid)."""
    model_dir = Path(model_dir)
    index = json.loads((model_dir / "model.safetensors.index.json").read_text())
    raw: dict[str, tuple[str, np.ndarray]] = {}
    for shard in sorted(set(index["weight_map"].values())):
        raw.update(read_safetensors(model_dir / shard))
    out: dict[str, np.ndarray] = {}
    for name, (dtype, arr) in raw.items():
        if name.endswith(".scale") and dtype == "F8_E8M0":
            continue
        if dtype == "F8_E4M3":
            out[name] = quant.fp8_block_dequantize(arr, raw[name[:-7] + ".scale"][1], 128)
        elif dtype == "I8":
            out[name] = quant.fp4_row_dequantize(arr.view(np.uint8), raw[name[:-7] + ".scale"][1])
        elif dtype == "BF16":
            out[name] = _bf16_value(arr)
        else:
            out[name] = np.array(arr)
    return out


# --------------------------------------------------------------------------------------------
# Build / cache / reference
# --------------------------------------------------------------------------------------------

_SOURCE_HASH = hashlib.sha256(Path(__file__).read_bytes()).hexdigest()[:12]


def default_cache_root() -> Path:
    return Path(os.environ.get("DS4_TINY_CACHE", Path(tempfile.gettempdir()) / "ds4-tiny-models"))


def build_tiny_model(
    cfg: dict[str, Any] | str = "flash",
    *,
    quantized: bool | None = None,
    seed: int = 0,
    vocab: int | None = None,
    cache_root: Path | None = None,
    n_shards: int = 2,
) -> Path:
    """Export (or reuse) a tiny checkpoint; returns its directory.

    `cfg` is a config dict or a preset name ("flash", "window", "quant"); `vocab` overrides the
    vocabulary (e.g. `REAL_VOCAB` for agent tests that run the real tokenizer). `quantized`
    defaults to True for the "quant" preset.
    """
    if isinstance(cfg, str):
        if quantized is None:
            quantized = cfg == "quant"
        cfg = PRESETS[cfg]()
    cfg = copy.deepcopy(cfg)
    if vocab is not None:
        cfg["vocab_size"] = vocab
    quantized = bool(quantized)
    key = json.dumps([cfg, quantized, seed, n_shards, _SOURCE_HASH], sort_keys=True)
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    root = Path(cache_root) if cache_root is not None else default_cache_root()
    final = root / f"tiny-{digest}"
    if (final / "config.json").is_file():
        return final
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tiny-{digest}-", dir=root))
    try:
        # Random weights can put two candidates within float noise of each other at a top-k
        # boundary (router or indexer), where the engine and transformers may legitimately
        # pick differently. Re-draw (deterministically) until the margin sequences are clear.
        for attempt in range(8):
            _export(cfg, quantized, seed + 1000 * attempt, tmp, n_shards)
            if _margins_ok(tmp):
                break
            reference_model.cache_clear()
        else:
            raise RuntimeError(f"no tie-free draw for {cfg} within 8 attempts")
        try:
            os.rename(tmp, final)
        except OSError:
            if not (final / "config.json").is_file():
                raise
            # Another worker won the race; its export is identical.
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def _export(cfg: dict[str, Any], quantized: bool, seed: int, out_dir: Path, n_shards: int):
    from transformers import DeepseekV4ForCausalLM

    model = DeepseekV4ForCausalLM(_hf_config(cfg))
    shapes = {n: (tuple(p.shape), str(p.dtype)) for n, p in model.state_dict().items()}
    hf = _randomize(shapes, cfg, seed)
    tensors = _hf_to_official(hf, cfg["n_routed_experts"])
    if cfg.get("num_nextn_predict_layers", 0):
        tensors.update(_mtp_tensors(cfg, seed))
    entries: dict[str, tuple[str, np.ndarray]] = {}
    for name, value in tensors.items():
        entries.update(_encode(name, value, quantized))
    # Shard by name order; scales stay with their weights (same stem sorts adjacently).
    names = sorted(entries)
    per = -(-len(names) // n_shards)
    weight_map: dict[str, str] = {}
    total = 0
    for i in range(n_shards):
        part = names[i * per : (i + 1) * per]
        shard = f"model-{i + 1:05d}-of-{n_shards:05d}.safetensors"
        write_safetensors(out_dir / shard, {n: entries[n] for n in part})
        for n in part:
            weight_map[n] = shard
            total += entries[n][1].nbytes
    (out_dir / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1)
    )
    (out_dir / "config.json").write_text(json.dumps(cfg, indent=1))


MARGIN_SEEDS = (0, 1)  # random_tokens(300, vocab, seed) sequences checked for top-k margins
MARGIN = 2e-5  # minimum gap at a top-k boundary, relative to the largest |score| of that row


def _gap_ok(scores: np.ndarray, k: int) -> bool:
    """scores [rows, n] with −inf for unavailable candidates; rows with ≤ k finite ones pass."""
    for row in scores:
        v = np.sort(row[np.isfinite(row)])[::-1]
        if len(v) > k and v[k - 1] - v[k] <= MARGIN * max(np.abs(v).max(), 1e-12):
            return False
    return True


def _margins_ok(model_dir: Path) -> bool:
    """Do the router and indexer top-k boundaries of the reference have clear gaps on the
    margin sequences? (Hash layers select by table, not by score.)"""
    import torch
    from transformers.models.deepseek_v4 import modeling_deepseek_v4 as mdl

    model = reference_model(Path(model_dir))
    cfg = model.config
    seen: list[bool] = []

    def router_hook(mod, args, out):
        logits = out[0].detach().float()
        sc = mod.score_fn(logits) + mod.e_score_correction_bias
        seen.append(_gap_ok(sc.numpy(), mod.top_k))

    def scorer_hook(mod, args, out):
        sc = out[0].detach().float().numpy()  # [S, rows]
        s, n = sc.shape
        thr = (np.arange(s) + 1) // cfg.compress_rates["compressed_sparse_attention"]
        sc = np.where(np.arange(n)[None, :] < thr[:, None], sc, -np.inf)
        seen.append(_gap_ok(sc, cfg.index_topk))

    hooks = []
    for m in model.modules():
        if isinstance(m, mdl.DeepseekV4TopKRouter):
            hooks.append(m.register_forward_hook(router_hook))
        elif isinstance(m, mdl.DeepseekV4IndexerScorer):
            hooks.append(m.register_forward_hook(scorer_hook))
    try:
        with torch.no_grad():
            for seed in MARGIN_SEEDS:
                toks = random_tokens(300, cfg.vocab_size, seed=seed)
                model(input_ids=torch.tensor([toks]), use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    return all(seen)


@functools.lru_cache(maxsize=8)
def reference_model(model_dir: Path):
    """transformers' DeepseekV4ForCausalLM (float32, eval) loaded from the exported files."""
    import torch
    from transformers import DeepseekV4ForCausalLM

    cfg = json.loads((Path(model_dir) / "config.json").read_text())
    model = DeepseekV4ForCausalLM(_hf_config(cfg))
    hf = _official_to_hf(load_official_float(model_dir), cfg["num_hidden_layers"])
    state = {k: torch.from_numpy(np.array(v)) for k, v in hf.items()}
    model.load_state_dict(state, strict=True)
    return model.eval()


def reference_logits(model_dir: Path, tokens: list[int]) -> np.ndarray:
    """Full-forward logits [T, vocab] (float32) of the transformers reference."""
    import torch

    model = reference_model(Path(model_dir))
    with torch.no_grad():
        out = model(input_ids=torch.tensor([tokens]), use_cache=False)
    return out.logits[0].float().numpy()


def random_tokens(n: int, vocab: int, seed: int = 0) -> list[int]:
    """Token ids avoiding 0/1 (BOS/EOS) so generation tests do not stop early by accident."""
    rng = np.random.default_rng(seed)
    return [int(t) for t in rng.integers(2, vocab, size=n)]


def cache_root(request) -> Path:
    """The pytest cache directory for exports (shared by xdist workers and across runs)."""
    cache = getattr(request.config, "cache", None)
    if cache is None:  # cacheprovider disabled
        return default_cache_root()
    return Path(cache.mkdir("tiny-models"))


@functools.lru_cache(maxsize=16)
def cached_engine(model_dir: Path, numerics: str = "exact"):
    """One loaded `Engine` per (checkpoint, numerics) per process."""
    from ds4_agent.engine.generate import Engine

    return Engine.load(model_dir, numerics=numerics)


def rel_err(a: np.ndarray, ref: np.ndarray) -> float:
    """max |a − ref| scaled by max |ref|."""
    return float(np.abs(np.asarray(a) - ref).max() / np.abs(ref).max())


@functools.lru_cache(maxsize=32)
def _one_shot(model_dir: Path, numerics: str, tokens: tuple[int, ...]) -> np.ndarray:
    eng = cached_engine(model_dir, numerics)
    out = eng.forward_all(eng.new_state(), list(tokens))
    out.setflags(write=False)
    return out


def one_shot_logits(model_dir: Path, tokens: list[int], numerics: str = "exact") -> np.ndarray:
    """The engine's one-shot all-position logits [T, vocab], cached per process (read-only)."""
    return _one_shot(Path(model_dir), numerics, tuple(int(t) for t in tokens))


@functools.lru_cache(maxsize=16)
def _ref(model_dir: Path, tokens: tuple[int, ...]) -> np.ndarray:
    out = reference_logits(model_dir, list(tokens))
    out.setflags(write=False)
    return out


def cached_reference_logits(model_dir: Path, tokens: list[int]) -> np.ndarray:
    return _ref(Path(model_dir), tuple(int(t) for t in tokens))
