"""The engine's decode state as plain numpy arrays: the contract between engine and snapshots.

The engine (`engine/state.py`) produces and consumes this; `sessions/` serializes it. It holds
exactly the per-layer state of the spec (§3.1): the raw window in logical order, the
compressed rows, the index keys and the compressor frontiers, plus the token ids and
optionally the last logits. Everything is float32 as the engine holds it; in `official`
numerics the KV rows are FP8-representable and the index keys FP4-representable, which the
snapshot codec exploits losslessly.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class LayerExport:
    kind: str  # "swa" (ratio 0) | "csa" (ratio 4) | "hca" (ratio 128)
    ratio: int  # 0, 4 or 128
    raw: np.ndarray  # float32 [min(T, window), head_dim], oldest first
    comp: np.ndarray | None = None  # float32 [T // ratio, head_dim]; None for swa
    index: np.ndarray | None = None  # float32 [T // 4, index_head_dim]; csa only
    # Fixed-size compressor frontiers (kv and gate states, FP32, gates with ape added),
    # e.g. {"kv_state": …, "score_state": …, "idx_kv_state": …, "idx_score_state": …}.
    frontiers: dict[str, np.ndarray] = field(default_factory=dict)


@dataclass
class StateExport:
    n_tokens: int  # T
    tokens: np.ndarray  # int32 [T]
    layers: list[LayerExport]
    numerics: str  # "exact" | "official"
    logits: np.ndarray | None = None  # float32 [vocab] after the last token
    mtp: dict[str, np.ndarray] | None = None  # optional MTP ring + last 4-stream state
