"""`ModelConfig`: the official DeepSeek V4 `config.json`, validated, plus derived layout.

Only keys the forward pass needs are required; anything else in the file (quantization
fields, architectures, dtype hints) is ignored. A missing key or an unknown `model_type` is a
`ConfigError` whose message names the key and the file, e.g.
`config.json: missing key 'compress_ratios' (the official DeepSeek V4 config lists it)`.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

SUPPORTED_MODEL_TYPES = ("deepseek_v4",)


def v4_rope_config() -> dict[str, Any]:
    """The RoPE keys of every released V4 Flash config (spec §1.1–§1.2): main RoPE for the
    sliding-window layers and MTP, YaRN-scaled "compress" RoPE for the CSA/HCA layers.
    A fresh dict each call, so callers may edit their copy."""
    return {
        "rope_theta": 10000.0,
        "compress_rope_theta": 160000.0,
        "rope_scaling": {
            "type": "yarn",
            "factor": 16,
            "original_max_position_embeddings": 65536,
            "beta_fast": 32,
            "beta_slow": 1,
        },
    }


class ConfigError(ValueError):
    """The model config cannot be used; the message says which key and how to fix it."""


class RopeScaling(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: str = Field(default="yarn", validation_alias="type")
    factor: float
    original_max_position_embeddings: int
    beta_fast: float = 32.0
    beta_slow: float = 1.0

    @model_validator(mode="before")
    @classmethod
    def _rope_type_alias(cls, data: Any) -> Any:
        if isinstance(data, dict) and "type" not in data and "rope_type" in data:
            data = {**data, "type": data["rope_type"]}
        return data


class ModelConfig(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)

    model_type: str
    vocab_size: int
    hidden_size: int
    moe_intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    head_dim: int
    qk_rope_head_dim: int
    q_lora_rank: int
    o_groups: int
    o_lora_rank: int
    n_routed_experts: int
    n_shared_experts: int = 1
    num_experts_per_tok: int
    scoring_func: str = "sqrtsoftplus"
    norm_topk_prob: bool = True
    routed_scaling_factor: float
    num_hash_layers: int
    sliding_window: int
    compress_ratios: list[int]
    compress_rope_theta: float
    rope_theta: float
    rope_scaling: RopeScaling | None = None
    index_n_heads: int
    index_head_dim: int
    index_topk: int
    hc_mult: int
    hc_sinkhorn_iters: int
    hc_eps: float
    swiglu_limit: float
    rms_norm_eps: float
    num_nextn_predict_layers: int = 0
    bos_token_id: int = 0
    eos_token_id: int = 1

    # ---------------------------------------------------------------- construction

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "config.json") -> ModelConfig:
        mt = data.get("model_type")
        if mt is None:
            raise ConfigError(f"{source}: missing key 'model_type' (expected 'deepseek_v4')")
        if mt not in SUPPORTED_MODEL_TYPES:
            raise ConfigError(
                f"{source}: unsupported model_type {mt!r}; this engine runs "
                f"{', '.join(SUPPORTED_MODEL_TYPES)} (DeepSeek V4 Flash) only"
            )
        try:
            cfg = cls.model_validate(data)
        except ValidationError as e:
            err = e.errors()[0]
            key = ".".join(str(p) for p in err["loc"]) or "?"
            if err["type"] == "missing":
                raise ConfigError(
                    f"{source}: missing key {key!r} (the official DeepSeek V4 config lists it)"
                ) from None
            raise ConfigError(f"{source}: bad value for {key!r}: {err['msg']}") from None
        cfg._check(source)
        return cfg

    @classmethod
    def from_json(cls, text: str, source: str = "config.json") -> ModelConfig:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{source}: not valid JSON ({e})") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{source}: expected a JSON object")
        return cls.from_dict(data, source)

    @classmethod
    def from_dir(cls, model_dir: str | Path) -> ModelConfig:
        path = Path(model_dir) / "config.json"
        if not path.is_file():
            raise ConfigError(f"{path}: not found; --model must be a model directory")
        return cls.from_json(path.read_text(encoding="utf-8"), str(path))

    def _check(self, source: str) -> None:
        n = self.num_hidden_layers
        if len(self.compress_ratios) < n:
            raise ConfigError(
                f"{source}: 'compress_ratios' has {len(self.compress_ratios)} entries, "
                f"need one per layer ({n}) plus the MTP slot"
            )
        bad = [r for r in self.compress_ratios if r not in (0, 4, 128)]
        if bad:
            raise ConfigError(f"{source}: 'compress_ratios' entries must be 0, 4 or 128, got {bad}")
        if self.num_attention_heads % self.o_groups:
            raise ConfigError(f"{source}: 'num_attention_heads' must be a multiple of 'o_groups'")
        if self.qk_rope_head_dim % 2 or self.qk_rope_head_dim > min(
            self.head_dim, self.index_head_dim
        ):
            raise ConfigError(f"{source}: bad 'qk_rope_head_dim' {self.qk_rope_head_dim}")
        if self.scoring_func != "sqrtsoftplus":
            raise ConfigError(f"{source}: 'scoring_func' {self.scoring_func!r} is not supported")

    # ---------------------------------------------------------------- derived layout

    @property
    def ratios(self) -> list[int]:
        """Compress ratio of each main layer (the MTP slot dropped)."""
        return list(self.compress_ratios[: self.num_hidden_layers])

    @property
    def mtp_ratio(self) -> int:
        extra = self.compress_ratios[self.num_hidden_layers :]
        return extra[0] if extra else 0

    @property
    def nope_dim(self) -> int:
        return self.head_dim - self.qk_rope_head_dim

    def is_hash_layer(self, layer: int) -> bool:
        return layer < self.num_hash_layers

    def rope_inv_freq(self, compressed: bool) -> list[float]:
        """Per-pair inverse frequencies (length qk_rope_head_dim/2) of the "main" (θ=rope_theta,
        no scaling) or "compress" (θ=compress_rope_theta + YaRN, no mscale) RoPE, §1.2."""
        dim = self.qk_rope_head_dim
        base = self.compress_rope_theta if compressed else self.rope_theta
        freqs = [base ** (-(2 * i) / dim) for i in range(dim // 2)]
        ys = self.rope_scaling
        if not compressed or ys is None or ys.type != "yarn":
            return freqs

        def corr(rot: float) -> float:
            return (
                dim
                * math.log(ys.original_max_position_embeddings / (rot * 2 * math.pi))
                / (2 * math.log(base))
            )

        low = max(math.floor(corr(ys.beta_fast)), 0)
        high = min(math.ceil(corr(ys.beta_slow)), dim - 1)
        if low == high:
            high += 0.001
        out = []
        for i, f in enumerate(freqs):
            ramp = min(max((i - low) / (high - low), 0.0), 1.0)
            out.append(f * (1 - ramp) + (f / ys.factor) * ramp)
        return out
