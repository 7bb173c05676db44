"""Token sampling: greedy, temperature, top-k, top-p, min-p, seeded; plus scripted sampling.

Defaults follow ds4 and the model card: temperature 1.0, top-p 1.0, min-p 0.05, no top-k.
The filters apply in the order temperature → top-k → min-p (relative to the most likely token)
→ top-p (smallest prefix of the sorted distribution whose mass reaches p), then renormalise.
Sampling happens on the host in float64 (one [vocab] transfer per token, which decode needs
anyway to decide whether to stop).
"""

from __future__ import annotations

from collections.abc import Sequence

import mlx.core as mx
import numpy as np
from pydantic import BaseModel, ConfigDict, Field


class SamplerConfig(BaseModel):
    model_config = ConfigDict(frozen=True)

    temperature: float = Field(default=1.0, ge=0.0)  # 0 → greedy
    top_k: int = Field(default=0, ge=0)  # 0 → off
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    min_p: float = Field(default=0.05, ge=0.0, le=1.0)
    seed: int | None = None


def _to_np(logits: mx.array | np.ndarray) -> np.ndarray:
    return np.asarray(logits, dtype=np.float64).reshape(-1)


def probabilities(logits: mx.array | np.ndarray, cfg: SamplerConfig) -> np.ndarray:
    """The filtered, renormalised distribution the sampler draws from (float64 [vocab])."""
    x = _to_np(logits)
    if cfg.temperature == 0.0:
        p = np.zeros_like(x)
        p[int(np.argmax(x))] = 1.0
        return p
    x = x / cfg.temperature
    if cfg.top_k and cfg.top_k < x.size:
        kth = np.partition(x, -cfg.top_k)[-cfg.top_k]
        x = np.where(x >= kth, x, -np.inf)
    p = np.exp(x - np.max(x))
    p /= p.sum()
    if cfg.min_p > 0.0:
        p = np.where(p >= cfg.min_p * p.max(), p, 0.0)
    if cfg.top_p < 1.0:
        order = np.argsort(-p, kind="stable")
        csum = np.cumsum(p[order]) / p.sum()
        # Smallest prefix with mass ≥ top_p (a hair of slack so 0.5+0.3 counts as 0.8).
        keep = int(np.searchsorted(csum, cfg.top_p - 1e-9) + 1)
        mask = np.zeros_like(p, dtype=bool)
        mask[order[:keep]] = True
        p = np.where(mask, p, 0.0)
    return p / p.sum()


class Sampler:
    """Draws token ids from logits; `greedy=True` on a call forces argmax for that step."""

    def __init__(self, config: SamplerConfig | None = None):
        self.config = config or SamplerConfig()
        self._rng = np.random.default_rng(self.config.seed)

    def sample(self, logits: mx.array | np.ndarray, greedy: bool = False) -> int:
        if greedy or self.config.temperature == 0.0:
            return int(np.argmax(_to_np(logits)))
        p = probabilities(logits, self.config)
        return int(self._rng.choice(p.size, p=p))


class ScriptedSampler(Sampler):
    """Returns a fixed token sequence regardless of the logits (teacher forcing in tests).

    Raises `IndexError` when asked for more tokens than scripted.
    """

    def __init__(self, token_ids: Sequence[int], keep_logits: bool = False):
        super().__init__(SamplerConfig(temperature=0.0))
        self.token_ids = [int(t) for t in token_ids]
        self.pos = 0
        self.keep_logits = keep_logits
        self.seen_logits: list[np.ndarray] = []  # the logits of each step, if keep_logits

    def sample(self, logits: mx.array | np.ndarray, greedy: bool = False) -> int:
        if self.pos >= len(self.token_ids):
            raise IndexError(f"ScriptedSampler: script of {len(self.token_ids)} tokens exhausted")
        if self.keep_logits:
            self.seen_logits.append(np.asarray(logits, dtype=np.float32).reshape(-1))
        tok = self.token_ids[self.pos]
        self.pos += 1
        return tok
