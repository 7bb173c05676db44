"""ds4's GGUF files as a conversion source: tensor names, config, tensors.

`GGUFSource(path)` opens a `deepseek4` GGUF (antirez/ds4's q2/q4 files, or the MTP file)
through the `gguf` package's memory-mapped reader and presents it in the vocabulary of the
official checkpoint:

- `tensors()` lists every tensor under its official name (spec §4.1) with its logical shape
  and ggml type. Routed experts keep ds4's stacked layout, which already is the engine's
  `layers.L.ffn.experts.w1.weight` [n_experts, out, in].
- `config()` rebuilds the official `config.json` keys from the `deepseek4.*` metadata.
- `read_f32(name, expert=None)` dequantizes one tensor (or one expert of a stack) to float32,
  bit-identical to `gguf.quants.dequantize`.
- `convert(name, target)` produces MLX arrays for a target (see `TargetSpec`): plain float
  arrays, exact affine mappings (Q8_0 → 8-bit, Q4_K → 4-bit) or a re-quantization with the
  added error measured. Expert stacks are processed one expert at a time, so peak memory is
  one float32 expert matrix plus the packed output stack, whatever the model size.
- `tokenizer_json()` (in `gguf_tokenizer`) rebuilds a Hugging Face `tokenizer.json`.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from ds4_agent.engine import gguf_quants as gq

ARCH = "deepseek4"

# ds4 per-layer tensor name (after `blk.L.` or `mtp.0.`) → official name (after `layers.L.`).
LAYER_NAMES: dict[str, str] = {
    "attn_norm.weight": "attn_norm.weight",
    "ffn_norm.weight": "ffn_norm.weight",
    "hc_attn_fn.weight": "hc_attn_fn",
    "hc_attn_base.weight": "hc_attn_base",
    "hc_attn_scale.weight": "hc_attn_scale",
    "hc_ffn_fn.weight": "hc_ffn_fn",
    "hc_ffn_base.weight": "hc_ffn_base",
    "hc_ffn_scale.weight": "hc_ffn_scale",
    "attn_q_a.weight": "attn.wq_a.weight",
    "attn_q_a_norm.weight": "attn.q_norm.weight",
    "attn_q_b.weight": "attn.wq_b.weight",
    "attn_kv.weight": "attn.wkv.weight",
    "attn_kv_a_norm.weight": "attn.kv_norm.weight",
    "attn_output_a.weight": "attn.wo_a.weight",
    "attn_output_b.weight": "attn.wo_b.weight",
    "attn_sinks.weight": "attn.attn_sink",
    "attn_compressor_kv.weight": "attn.compressor.wkv.weight",
    "attn_compressor_gate.weight": "attn.compressor.wgate.weight",
    "attn_compressor_ape.weight": "attn.compressor.ape",
    "attn_compressor_norm.weight": "attn.compressor.norm.weight",
    "indexer.attn_q_b.weight": "attn.indexer.wq_b.weight",
    "indexer.proj.weight": "attn.indexer.weights_proj.weight",
    "indexer_compressor_kv.weight": "attn.indexer.compressor.wkv.weight",
    "indexer_compressor_gate.weight": "attn.indexer.compressor.wgate.weight",
    "indexer_compressor_ape.weight": "attn.indexer.compressor.ape",
    "indexer_compressor_norm.weight": "attn.indexer.compressor.norm.weight",
    "ffn_gate_inp.weight": "ffn.gate.weight",
    "exp_probs_b.bias": "ffn.gate.bias",
    "ffn_gate_tid2eid.weight": "ffn.gate.tid2eid",
    "ffn_gate_exps.weight": "ffn.experts.w1.weight",
    "ffn_up_exps.weight": "ffn.experts.w3.weight",
    "ffn_down_exps.weight": "ffn.experts.w2.weight",
    "ffn_gate_shexp.weight": "ffn.shared_experts.w1.weight",
    "ffn_up_shexp.weight": "ffn.shared_experts.w3.weight",
    "ffn_down_shexp.weight": "ffn.shared_experts.w2.weight",
}

GLOBAL_NAMES: dict[str, str] = {
    "token_embd.weight": "embed.weight",
    "output.weight": "head.weight",
    "output_norm.weight": "norm.weight",
    "output_hc_fn.weight": "hc_head_fn",
    "output_hc_base.weight": "hc_head_base",
    "output_hc_scale.weight": "hc_head_scale",
}

# Tensors only the MTP block has (besides a full layer's set), same names on both sides.
MTP_EXTRA_NAMES: dict[str, str] = {
    "e_proj.weight": "e_proj.weight",
    "h_proj.weight": "h_proj.weight",
    "enorm.weight": "enorm.weight",
    "hnorm.weight": "hnorm.weight",
    "norm.weight": "norm.weight",
    "hc_head_fn.weight": "hc_head_fn",
    "hc_head_base.weight": "hc_head_base",
    "hc_head_scale.weight": "hc_head_scale",
}

_BLK = re.compile(r"^blk\.(\d+)\.(.+)$")
_MTP = re.compile(r"^mtp\.(\d+)\.(.+)$")


class GGUFSourceError(ValueError):
    """The file is not a ds4 DeepSeek V4 GGUF we can convert (message says why and what to do)."""


def official_name(gguf_name: str) -> str:
    """ds4 tensor name → official checkpoint name; raises GGUFSourceError for unknown names."""
    if gguf_name in GLOBAL_NAMES:
        return GLOBAL_NAMES[gguf_name]
    m = _BLK.match(gguf_name)
    if m and m.group(2) in LAYER_NAMES:
        return f"layers.{m.group(1)}.{LAYER_NAMES[m.group(2)]}"
    m = _MTP.match(gguf_name)
    if m:
        rest = m.group(2)
        if rest in MTP_EXTRA_NAMES:
            return f"mtp.{m.group(1)}.{MTP_EXTRA_NAMES[rest]}"
        if rest in LAYER_NAMES:
            return f"mtp.{m.group(1)}.{LAYER_NAMES[rest]}"
    raise GGUFSourceError(f"unknown ds4 tensor name {gguf_name!r} (not a DeepSeek V4 Flash GGUF?)")


def gguf_name(official: str) -> str:
    """Inverse of `official_name`."""
    for g, o in GLOBAL_NAMES.items():
        if o == official:
            return g
    m = re.match(r"^(layers|mtp)\.(\d+)\.(.+)$", official)
    if m:
        kind, idx, rest = m.groups()
        if kind == "mtp":
            for g, o in MTP_EXTRA_NAMES.items():
                if o == rest:
                    return f"mtp.{idx}.{g}"
        for g, o in LAYER_NAMES.items():
            if o == rest:
                return f"{'blk' if kind == 'layers' else 'mtp'}.{idx}.{g}"
    raise KeyError(official)


def tensor_class(official: str) -> str:
    """Coarse class for reports and quantization choices."""
    if ".ffn.experts." in official:
        return "routed_experts"
    if ".ffn.shared_experts." in official:
        return "shared_experts"
    if official in ("embed.weight",):
        return "embed"
    if official in ("head.weight",):
        return "head"
    if ".compressor." in official or ".indexer." in official:
        return "compressor_indexer"
    if re.search(r"\.attn\.w(q_a|q_b|kv|o_a|o_b)\.weight$", official) or official.endswith(
        ("e_proj.weight", "h_proj.weight")
    ):
        return "attention"
    return "small"


@dataclass(frozen=True)
class SourceTensor:
    name: str  # official name
    gguf_name: str
    shape: tuple[int, ...]  # logical numpy shape (slowest dimension first)
    qtype: str  # ggml type name: F32, F16, BF16, I32, Q8_0, Q4_K, Q2_K, IQ2_XXS
    nbytes: int

    @property
    def is_expert_stack(self) -> bool:
        return ".ffn.experts." in self.name


@dataclass(frozen=True)
class TargetSpec:
    """What one tensor becomes in MLX.

    kind "plain": a float array of `dtype` ("float32" | "float16" | "bfloat16" | "int32").
    kind "affine": MLX affine quantization with `bits`, `group_size`, and scale/bias `scale_dtype`
    ("float16" | "float32"); exact mappings are used when the source type allows them.
    """

    kind: str
    dtype: str = "float32"
    bits: int = 0
    group_size: int = 0
    scale_dtype: str = "float16"


@dataclass
class ConvertedTensor:
    """MLX arrays for one tensor, as numpy, plus how faithful they are to the GGUF values."""

    name: str
    target: TargetSpec
    array: np.ndarray | None = None  # kind "plain"
    affine: gq.AffineArrays | None = None  # kind "affine"
    exact: bool = True  # represents the GGUF values exactly
    error: gq.ErrorStats = field(default_factory=gq.ErrorStats)
    method: str = ""  # "copy" | "q8_0→affine8" | "q4_k→affine4" | "requantize"

    def to_weight(self) -> Any:
        """As the engine's `Weight` (`mx.array` or `QuantizedTensor`)."""
        import mlx.core as mx
        from ds4_agent.engine.qtensor import QuantizedTensor

        if self.affine is None:
            assert self.array is not None
            if self.target.dtype == "bfloat16":
                return mx.array(self.array).astype(mx.bfloat16)
            return mx.array(self.array)
        a = self.affine
        return QuantizedTensor(
            weight=mx.array(a.weight),
            scales=mx.array(a.scales),
            biases=mx.array(a.biases),
            mode="affine",
            bits=a.bits,
            group_size=a.group_size,
        )


# Scalar metadata keys (without the `deepseek4.` prefix) → official config.json keys.
_CONFIG_KEYS: dict[str, str] = {
    "block_count": "num_hidden_layers",
    "context_length": "max_position_embeddings",
    "embedding_length": "hidden_size",
    "vocab_size": "vocab_size",
    "attention.head_count": "num_attention_heads",
    "attention.head_count_kv": "num_key_value_heads",
    "attention.key_length": "head_dim",
    "attention.q_lora_rank": "q_lora_rank",
    "attention.output_lora_rank": "o_lora_rank",
    "attention.output_group_count": "o_groups",
    "attention.sliding_window": "sliding_window",
    "attention.compress_rope_freq_base": "compress_rope_theta",
    "attention.indexer.head_count": "index_n_heads",
    "attention.indexer.key_length": "index_head_dim",
    "attention.indexer.top_k": "index_topk",
    "attention.layer_norm_rms_epsilon": "rms_norm_eps",
    "rope.dimension_count": "qk_rope_head_dim",
    "rope.freq_base": "rope_theta",
    "expert_count": "n_routed_experts",
    "expert_used_count": "num_experts_per_tok",
    "expert_shared_count": "n_shared_experts",
    "expert_feed_forward_length": "moe_intermediate_size",
    "expert_weights_scale": "routed_scaling_factor",
    "expert_weights_norm": "norm_topk_prob",
    "hash_layer_count": "num_hash_layers",
    "hyper_connection.count": "hc_mult",
    "hyper_connection.sinkhorn_iterations": "hc_sinkhorn_iters",
    "hyper_connection.epsilon": "hc_eps",
    "nextn_predict_layers": "num_nextn_predict_layers",
}

_REQUIRED_CONFIG = (
    "num_hidden_layers",
    "hidden_size",
    "num_attention_heads",
    "head_dim",
    "n_routed_experts",
    "num_experts_per_tok",
    "moe_intermediate_size",
)


class GGUFSource:
    def __init__(self, path: str | Path) -> None:
        from gguf import GGUFReader

        self.path = Path(path)
        # Experts decoded concurrently; each in flight holds a few float32 expert matrices.
        self.threads = max(1, min(4, os.cpu_count() or 1))
        if not self.path.is_file():
            raise GGUFSourceError(f"{self.path}: no such file")
        try:
            self._reader = GGUFReader(str(self.path))
        except (ValueError, OSError) as e:
            raise GGUFSourceError(f"{self.path}: not a readable GGUF file ({e})") from e
        arch = self.metadata("general.architecture")
        if arch != ARCH:
            raise GGUFSourceError(
                f"{self.path}: architecture {arch!r} is not {ARCH!r}; "
                "only antirez/ds4's DeepSeek V4 Flash GGUF files can be converted"
            )
        self._tensors: dict[str, SourceTensor] = {}
        self._raw: dict[str, Any] = {}
        for t in self._reader.tensors:
            name = official_name(t.name)
            qtype = t.tensor_type.name
            if qtype not in gq.BLOCK_LAYOUT:
                raise GGUFSourceError(
                    f"{self.path}: tensor {t.name} has ggml type {qtype}, which ds4's files do not use"
                )
            shape = tuple(int(x) for x in reversed(t.shape.tolist()))
            self._tensors[name] = SourceTensor(name, t.name, shape, qtype, int(t.n_bytes))
            self._raw[name] = t.data

    # -- metadata ---------------------------------------------------------------------

    def metadata(self, key: str, default: Any = None) -> Any:
        from gguf import GGUFValueType

        f = self._reader.fields.get(key)
        if f is None:
            return default
        v = f.contents()
        # float32 metadata read back as Python floats shows binary noise (1e-6 →
        # 9.99999997e-07); the shortest float32 repr is the value the file's author wrote.
        if f.types and f.types[-1] == GGUFValueType.FLOAT32:
            if isinstance(v, list):
                return [float(str(np.float32(x))) for x in v]
            return float(str(np.float32(v)))
        return v

    def metadata_keys(self) -> list[str]:
        return list(self._reader.fields)

    def config(self) -> dict[str, Any]:
        """The official `config.json` for this model, rebuilt from `deepseek4.*` metadata."""
        cfg: dict[str, Any] = {
            "architectures": ["DeepseekV4ForCausalLM"],
            "model_type": "deepseek_v4",
            "hidden_act": "silu",
            "scoring_func": "sqrtsoftplus",
            "topk_method": "noaux_tc",
            "n_group": 1,
            "topk_group": 1,
            "tie_word_embeddings": False,
            "torch_dtype": "bfloat16",
        }
        for key, out in _CONFIG_KEYS.items():
            v = self.metadata(f"{ARCH}.{key}")
            if v is not None:
                cfg[out] = v
        missing = [k for k in _REQUIRED_CONFIG if k not in cfg]
        if missing:
            raise GGUFSourceError(
                f"{self.path}: metadata lacks {', '.join(f'{ARCH}.*{k}' for k in missing)}; "
                "the file is incomplete or not a ds4 GGUF"
            )
        if "vocab_size" not in cfg and "embed.weight" in self._tensors:
            cfg["vocab_size"] = self._tensors["embed.weight"].shape[0]
        n = int(cfg["num_hidden_layers"])
        # ds4 ships the MTP block as a separate file: a main-model GGUF has none.
        has_mtp = any(name.startswith("mtp.") for name in self._tensors)
        cfg.setdefault("num_nextn_predict_layers", 1 if has_mtp else 0)
        ratios = self.metadata(f"{ARCH}.attention.compress_ratios")
        if ratios is not None:
            ratios = [int(r) for r in ratios]
            # The official list carries one entry per MTP layer after the main layers.
            ratios += [0] * max(0, n + int(cfg["num_nextn_predict_layers"]) - len(ratios))
            cfg["compress_ratios"] = ratios
        clamp = self.metadata(f"{ARCH}.swiglu_clamp_exp")
        if clamp is not None:
            values = [float(c) for c in np.atleast_1d(np.asarray(clamp, dtype=np.float64))]
            cfg["swiglu_limit"] = max(values) if values else 0.0
        factor = self.metadata(f"{ARCH}.rope.scaling.factor")
        if factor is not None:
            cfg["rope_scaling"] = {
                "type": "yarn",
                "factor": factor,
                "original_max_position_embeddings": self.metadata(
                    f"{ARCH}.rope.scaling.original_context_length"
                ),
                "beta_fast": self.metadata(f"{ARCH}.rope.scaling.yarn_beta_fast", 32.0),
                "beta_slow": self.metadata(f"{ARCH}.rope.scaling.yarn_beta_slow", 1.0),
                "mscale": 1.0,
                "mscale_all_dim": 1.0,
            }
        for key in ("bos_token_id", "eos_token_id", "padding_token_id"):
            v = self.metadata(f"tokenizer.ggml.{key}")
            if v is not None:
                cfg["pad_token_id" if key == "padding_token_id" else key] = int(v)
        # Normalise numpy scalars so the dict is JSON-serialisable and compares cleanly.
        return {k: _plain(v) for k, v in cfg.items()}

    def tokenizer_files(self) -> dict[str, dict[str, Any]]:
        """`tokenizer.json` and `tokenizer_config.json` contents rebuilt from the metadata."""
        from ds4_agent.engine import gguf_tokenizer as gt

        meta = gt.tokenizer_metadata(self)
        return {
            "tokenizer.json": gt.tokenizer_json_from_metadata(meta),
            "tokenizer_config.json": gt.tokenizer_config_from_metadata(meta),
        }

    # -- tensors ----------------------------------------------------------------------

    def tensors(self) -> list[SourceTensor]:
        return list(self._tensors.values())

    def __contains__(self, name: str) -> bool:
        return name in self._tensors

    def info(self, name: str) -> SourceTensor:
        try:
            return self._tensors[name]
        except KeyError:
            raise KeyError(f"{self.path}: no tensor {name!r}") from None

    def raw(self, name: str, expert: int | None = None) -> np.ndarray:
        """The tensor's bytes (memory-mapped), or one expert's slice of a stack."""
        data = self._raw[name]
        if expert is not None:
            data = data[expert]
        return data

    def read_f32(self, name: str, expert: int | None = None) -> np.ndarray:
        t = self.info(name)
        shape = t.shape if expert is None else t.shape[1:]
        if t.qtype == "I32":
            return np.asarray(self.raw(name, expert)).view(np.int32).reshape(shape)
        return gq.dequantize(self.raw(name, expert), t.qtype, shape)

    def iter_f32(self) -> Iterator[tuple[str, np.ndarray]]:
        for name in self._tensors:
            yield name, self.read_f32(name)

    def convert(
        self,
        name: str,
        target: TargetSpec,
        quantizer: gq.Quantizer | None = None,
        measure: bool = True,
    ) -> ConvertedTensor:
        """One tensor → MLX arrays for `target` (expert stacks one expert at a time)."""
        t = self.info(name)
        if target.kind == "plain":
            return self._convert_plain(t, target)
        if target.kind != "affine":
            raise ValueError(f"unknown target kind {target.kind!r}")
        if t.qtype in ("I32",):
            raise GGUFSourceError(f"{name}: integer tensors cannot be quantized")
        quantizer = quantizer or gq.rtn_quantize
        mapper = self._exact_mapper(t, target)
        n = t.shape[0] if t.is_expert_stack else None
        rows = t.shape[1:] if n is not None else t.shape
        out: gq.AffineArrays | None = None
        err = gq.ErrorStats()
        exact = True
        method = ""

        def decode(e: int | None) -> tuple[gq.AffineArrays | None, bool, str, np.ndarray | None]:
            # Pure numpy (releases the GIL), so experts decode in parallel threads; the MLX
            # calls (re-quantizer, error measurement) stay on the calling thread.
            raw = self.raw(name, e)
            if mapper is not None:
                arr, ex, how = mapper(raw, rows)
                ref = gq.dequantize(raw, t.qtype, rows) if measure and not ex else None
                return arr, ex, how, ref
            return None, False, "requantize", gq.dequantize(raw, t.qtype, rows)

        items = list(range(n)) if n is not None else [None]
        for e, result in _ordered_map(decode, items, self.threads):
            arr, exact_here, method, ref = result
            if arr is None:
                assert ref is not None
                arr = _cast_scales(
                    quantizer(ref, target.bits, target.group_size), target.scale_dtype
                )
            if ref is not None:
                err.add(ref, gq.affine_dequantize(arr))
            del ref
            exact = exact and exact_here
            if e is None:
                out = arr
                break
            if out is None:
                # Expert stacks are filled in place: memory is one packed stack plus a few
                # float32 expert matrices in flight, never a list of parts plus a stacked copy.
                out = gq.AffineArrays(
                    np.empty((n, *arr.weight.shape), arr.weight.dtype),
                    np.empty((n, *arr.scales.shape), arr.scales.dtype),
                    np.empty((n, *arr.biases.shape), arr.biases.dtype),
                    arr.bits,
                    arr.group_size,
                )
            out.weight[e], out.scales[e], out.biases[e] = arr.weight, arr.scales, arr.biases
        assert out is not None
        return ConvertedTensor(name, target, affine=out, exact=exact, error=err, method=method)

    # -- internals --------------------------------------------------------------------

    def _convert_plain(self, t: SourceTensor, target: TargetSpec) -> ConvertedTensor:
        if t.qtype == "I32" or target.dtype == "int32":
            if t.qtype != "I32":
                raise GGUFSourceError(f"{t.name}: {t.qtype} cannot become an int32 array")
            arr = np.asarray(self.raw(t.name)).view(np.int32).reshape(t.shape).copy()
            return ConvertedTensor(t.name, target, array=arr, method="copy")
        same = {"F32": "float32", "F16": "float16"}.get(t.qtype) == target.dtype
        if same:  # bytes as stored: no float32 detour (the F16 embedding alone is 1 GiB)
            dtype = np.float32 if t.qtype == "F32" else np.float16
            arr = np.asarray(self.raw(t.name)).view(dtype).reshape(t.shape).copy()
            return ConvertedTensor(t.name, target, array=arr, method="copy")
        f32 = self.read_f32(t.name)
        if target.dtype == "float32":
            return ConvertedTensor(t.name, target, array=f32, method="copy")
        if target.dtype == "float16":
            arr = f32.astype(np.float16)
        elif target.dtype == "bfloat16":
            # Stored as float32 holding bf16-rounded values; to_weight() casts in MLX.
            import mlx.core as mx

            arr = np.array(mx.array(f32).astype(mx.bfloat16).astype(mx.float32))
        else:
            raise ValueError(f"unknown plain dtype {target.dtype!r}")
        err = gq.ErrorStats()
        err.add(f32, arr.astype(np.float32))
        exact = err.sq_err == 0.0
        return ConvertedTensor(t.name, target, array=arr, exact=exact, error=err, method="cast")

    def _exact_mapper(
        self, t: SourceTensor, target: TargetSpec
    ) -> Callable[[np.ndarray, tuple[int, ...]], tuple[gq.AffineArrays, bool, str]] | None:
        if target.group_size != 32:
            return None
        if t.qtype == "Q8_0" and target.bits == 8:
            return lambda raw, shape: (gq.q8_0_to_affine(raw, shape), True, "q8_0→affine8")
        if t.qtype == "Q4_K" and target.bits == 4:
            f32 = target.scale_dtype == "float32"
            dtype = np.float32 if f32 else np.float16
            return lambda raw, shape: (gq.q4_k_to_affine(raw, shape, dtype), f32, "q4_k→affine4")
        return None


TIERS = ("q2", "q3", "q4", "lossless")
# Group size for re-quantized routed experts: 64 keeps q2 within its size target
# (2 + 32/64 = 2.5 bpw with fp16 scale and bias); the exact maps need ggml's group of 32.
REQUANT_GROUP = 64


def default_target(t: SourceTensor, tier: str, requant_group: int = REQUANT_GROUP) -> TargetSpec:
    """The MLX form of one GGUF tensor for a tier.

    Float tensors stay as they are; Q8_0 → exact affine 8-bit everywhere; Q4_K → exact 4-bit
    (fp32 scales) for `lossless`, fp16-scaled 4-bit for `q4`, re-quantized for q2/q3; Q2_K and
    IQ2_XXS are re-quantized to the tier's width (no exact MLX form, so no `lossless`).
    """
    if tier not in TIERS:
        raise ValueError(f"unknown tier {tier!r}; expected one of {', '.join(TIERS)}")
    q = t.qtype
    if q == "I32":
        return TargetSpec("plain", dtype="int32")
    if q in ("F32", "F16", "BF16"):
        return TargetSpec(
            "plain", dtype={"F32": "float32", "F16": "float16", "BF16": "bfloat16"}[q]
        )
    if q == "Q8_0":
        return TargetSpec("affine", bits=8, group_size=32, scale_dtype="float16")
    bits = {"q2": 2, "q3": 3, "q4": 4, "lossless": 4}[tier]
    if q == "Q4_K" and bits == 4:
        scale = "float32" if tier == "lossless" else "float16"
        return TargetSpec("affine", bits=4, group_size=32, scale_dtype=scale)
    if tier == "lossless":
        raise GGUFSourceError(
            f"{t.name} is {q}, which MLX cannot hold exactly; convert this file with --tier q2 "
            "(or use the official checkpoint for a lossless tier)"
        )
    return TargetSpec("affine", bits=bits, group_size=requant_group, scale_dtype="float16")


def _ordered_map(fn: Callable[[Any], Any], items: list[Any], threads: int) -> Iterator[Any]:
    """(item, fn(item)) in order, at most `threads` computed ahead (bounded memory)."""
    if threads <= 1 or len(items) <= 1:
        for it in items:
            yield it, fn(it)
        return
    from collections import deque
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=threads) as pool:
        pending: deque[tuple[Any, Any]] = deque()
        for it in items:
            pending.append((it, pool.submit(fn, it)))
            if len(pending) >= threads:
                head, fut = pending.popleft()
                yield head, fut.result()
        while pending:
            head, fut = pending.popleft()
            yield head, fut.result()


def _cast_scales(a: gq.AffineArrays, scale_dtype: str) -> gq.AffineArrays:
    dtype = {"float16": np.float16, "float32": np.float32}.get(scale_dtype)
    if dtype is None:
        raise ValueError(f"scale dtype {scale_dtype!r} is not float16/float32")
    return gq.AffineArrays(
        a.weight, a.scales.astype(dtype), a.biases.astype(dtype), a.bits, a.group_size
    )


def _plain(v: Any) -> Any:
    if isinstance(v, np.generic):
        return v.item()
    if isinstance(v, list):
        return [_plain(x) for x in v]
    if isinstance(v, dict):
        return {k: _plain(x) for k, x in v.items()}
    return v
