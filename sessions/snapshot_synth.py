"""Synthetic engine states with real shapes, for snapshot tests and benchmarks (no model run).

A state is a pure function of its token ids, and the rows of every complete 128-token chunk
depend only on the ids up to the end of that chunk, so two synthetic sessions that share a
prefix share those rows exactly, like forks of a real session do (and so share segments). In `official`
numerics the KV rows are FP8 e4m3 × 2^k on all but the last `rope_dim` channels (those are
bfloat16) and the index keys FP4 e2m1 × 2^k, as the engine produces them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import xxhash
from ds4_agent.engine.state_export import LayerExport, StateExport
from ds4_agent.sessions.codec import E2M1, E4M3, dequantize_blocks

FLASH_RATIOS = (0, 0) + (4, 128) * 20 + (4,)
KIND = {0: "swa", 4: "csa", 128: "hca"}
_CHUNK = 128


@dataclass(frozen=True)
class SynthConfig:
    ratios: tuple[int, ...] = FLASH_RATIOS
    head_dim: int = 512
    rope_dim: int = 64
    index_dim: int = 128
    window: int = 128
    vocab: int = 129280


def tiny_config() -> SynthConfig:
    """Flash's layer pattern in miniature: fast enough for unit tests."""
    return SynthConfig(
        ratios=(0, 0, 4, 128, 4, 128), head_dim=256, index_dim=128, window=128, vocab=512
    )


def kv_rows(rng: np.random.Generator, n: int, cfg: SynthConfig, numerics: str) -> np.ndarray:
    d, r = cfg.head_dim, cfg.rope_dim
    if numerics != "official":
        return rng.standard_normal((n, d), dtype=np.float32)
    nb = (d - r) // E4M3.block
    codes = rng.integers(0, 256, (n, nb, E4M3.block), dtype=np.uint8)
    codes[(codes & 0x7F) == 0x7F] = 0  # the NaN code
    e8 = rng.integers(120, 132, (n, nb), dtype=np.uint8)
    out = np.empty((n, d), dtype=np.float32)
    out[:, : nb * E4M3.block] = dequantize_blocks(codes, e8, E4M3).reshape(n, -1)
    rope = rng.standard_normal((n, d - nb * E4M3.block), dtype=np.float32)
    out[:, nb * E4M3.block :] = (rope.view(np.uint32) & 0xFFFF0000).view(np.float32)
    return out


def index_rows(rng: np.random.Generator, n: int, cfg: SynthConfig, numerics: str) -> np.ndarray:
    d = cfg.index_dim
    if numerics != "official":
        return rng.standard_normal((n, d), dtype=np.float32)
    nb = d // E2M1.block
    codes = rng.integers(0, 16, (n, nb, E2M1.block), dtype=np.uint8)
    e8 = rng.integers(122, 130, (n, nb), dtype=np.uint8)
    return dequantize_blocks(codes, e8, E2M1).reshape(n, d)


def _seeds(tokens: np.ndarray, step: int, n: int) -> list[int]:
    """Seed i = hash of tokens[: (i+1)·step]: depends on exactly the ids that made row i."""
    h = xxhash.xxh3_64()
    out = []
    for i in range(n):
        h.update(np.ascontiguousarray(tokens[i * step : (i + 1) * step], dtype="<i4"))
        out.append(h.intdigest())
    return out


def synth_export(
    cfg: SynthConfig, tokens, numerics: str = "official", *, with_logits: bool = True
) -> StateExport:
    tokens = np.ascontiguousarray(tokens, dtype=np.int32).reshape(-1)
    t = len(tokens)
    layer_ids = {ratio: [i for i, r in enumerate(cfg.ratios) if r == ratio] for ratio in (4, 128)}
    comps: dict[int, np.ndarray] = {}
    idxs: dict[int, np.ndarray] = {}
    for ratio, ids in layer_ids.items():
        n = t // ratio
        per = np.empty((len(ids), n, cfg.head_dim), np.float32)
        per_i = np.empty((len(ids), n, cfg.index_dim), np.float32) if ratio == 4 else None
        # Rows of complete 128-token chunks come from one seed per chunk (fast); the rows of
        # the last, partial chunk from one seed per row.
        per_chunk = _CHUNK // ratio
        n_full = (t // _CHUNK) * per_chunk
        jobs = [
            (w * per_chunk, per_chunk, sd)
            for w, sd in enumerate(_seeds(tokens, _CHUNK, t // _CHUNK))
        ]
        tail_seeds = _seeds(tokens, ratio, n)[n_full:] if n > n_full else []
        jobs += [(n_full + j, 1, sd) for j, sd in enumerate(tail_seeds)]
        for r0, count, seed in jobs:
            rng = np.random.default_rng(seed)
            rows = kv_rows(rng, len(ids) * count, cfg, numerics)
            per[:, r0 : r0 + count] = rows.reshape(len(ids), count, -1)
            if per_i is not None:
                irows = index_rows(rng, len(ids) * count, cfg, numerics)
                per_i[:, r0 : r0 + count] = irows.reshape(len(ids), count, -1)
        for j, i in enumerate(ids):
            comps[i] = per[j]
            if per_i is not None:
                idxs[i] = per_i[j]
    # Raw window: the kv rows of the last min(T, window) positions, oldest first.
    n_raw = min(t, cfg.window)
    pos_seeds = _seeds(tokens, 1, t)[t - n_raw :]
    raw = np.empty((len(cfg.ratios), n_raw, cfg.head_dim), np.float32)
    for p, seed in enumerate(pos_seeds):
        raw[:, p] = kv_rows(np.random.default_rng(seed ^ 0x5A5A), len(cfg.ratios), cfg, numerics)
    full = np.random.default_rng(_seeds(tokens, max(t, 1), 1)[0] if t else 0)
    layers = []
    for i, ratio in enumerate(cfg.ratios):
        front: dict[str, np.ndarray] = {}
        if ratio == 4:
            filled = 4 + t % 4 if t >= 4 else t % 4
            for name, width in (
                ("kv_state", 2 * cfg.head_dim),
                ("idx_kv_state", 2 * cfg.index_dim),
            ):
                kv = np.zeros((8, width), np.float32)
                gate = np.full((8, width), -np.inf, np.float32)
                kv[:filled] = full.standard_normal((filled, width), dtype=np.float32)
                gate[:filled] = full.standard_normal((filled, width), dtype=np.float32)
                front[name] = kv
                front[name.replace("kv_", "score_")] = gate
        elif ratio == 128:
            filled = t % 128
            kv = np.zeros((128, cfg.head_dim), np.float32)
            gate = np.full((128, cfg.head_dim), -np.inf, np.float32)
            kv[:filled] = full.standard_normal((filled, cfg.head_dim), dtype=np.float32)
            gate[:filled] = full.standard_normal((filled, cfg.head_dim), dtype=np.float32)
            front = {"kv_state": kv, "score_state": gate}
        layers.append(
            LayerExport(
                kind=KIND[ratio],
                ratio=ratio,
                raw=raw[i],
                comp=comps.get(i),
                index=idxs.get(i),
                frontiers=front,
            )
        )
    logits = full.standard_normal(cfg.vocab, dtype=np.float32) if with_logits else None
    return StateExport(n_tokens=t, tokens=tokens, layers=layers, numerics=numerics, logits=logits)


def exports_equal(a: StateExport, b: StateExport) -> str | None:
    """None when bit-identical, else a description of the first difference (for asserts)."""

    def same(x, y) -> bool:
        if x is None or y is None:
            return x is None and y is None
        x, y = np.asarray(x), np.asarray(y)
        return x.shape == y.shape and x.dtype == y.dtype and x.tobytes() == y.tobytes()

    if (a.n_tokens, a.numerics) != (b.n_tokens, b.numerics):
        return f"header {(a.n_tokens, a.numerics)} != {(b.n_tokens, b.numerics)}"
    if not same(a.tokens, b.tokens):
        return "tokens differ"
    if not same(a.logits, b.logits):
        return "logits differ"
    if len(a.layers) != len(b.layers):
        return "layer count differs"
    for i, (x, y) in enumerate(zip(a.layers, b.layers, strict=True)):
        if (x.kind, x.ratio) != (y.kind, y.ratio):
            return f"layer {i} kind differs"
        for name in ("raw", "comp", "index"):
            if not same(getattr(x, name), getattr(y, name)):
                return f"layer {i} {name} differs"
        if set(x.frontiers) != set(y.frontiers):
            return f"layer {i} frontier names differ"
        for k in x.frontiers:
            if not same(x.frontiers[k], y.frontiers[k]):
                return f"layer {i} frontier {k} differs"
    if (a.mtp is None) != (b.mtp is None):
        return "mtp presence differs"
    if a.mtp is not None:
        if set(a.mtp) != set(b.mtp):
            return "mtp names differ"
        for k in a.mtp:
            if not same(a.mtp[k], b.mtp[k]):
                return f"mtp {k} differs"
    return None
