"""Decode state of the DeepSeek V4 engine (engine-spec §3.1), held as MLX arrays.

Per layer: the raw sliding window as a ring (`slot = position mod window`), the compressed KV
rows and (CSA layers) the index keys in preallocated growable blocks, and the compressor
frontiers. Every update is functional (`mx.slice_update` returns a new array), so `clone()` is
a cheap shallow copy: two states never alias a buffer that one of them later mutates.

Growable blocks double their capacity when full; the copy is amortised O(1) per row, and
there is never a per-token concatenation of the whole cache.

Frontier layout (the official one, §3.1):
- CSA (ratio 4): `kv_state` / `score_state` [2·4, 2·head_dim] — slots 0..3 hold the previous
  complete window's full (A|B) rows, slots 4..7 the current window's rows so far; likewise
  `idx_kv_state` / `idx_score_state` [8, 2·index_head_dim] for the indexer's compressor.
- HCA (ratio 128): `kv_state` / `score_state` [128, head_dim], slot = position mod 128.
Gates are stored with the absolute-position bias (`ape`) already added; unused slots hold
kv 0 and gate −inf (softmax weight 0), so the frontier is canonical for a given T.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import mlx.core as mx
import numpy as np
from ds4_agent.engine.config import ModelConfig
from ds4_agent.engine.state_export import LayerExport, StateExport

KIND_OF_RATIO = {0: "swa", 4: "csa", 128: "hca"}
_MIN_ROWS = 64


@dataclass
class GrowBuf:
    """Rows [n, dim] in a preallocated block [capacity, dim] that doubles when full."""

    data: mx.array
    n: int = 0

    @classmethod
    def empty(cls, dim: int, capacity: int = _MIN_ROWS) -> GrowBuf:
        return cls(mx.zeros((max(capacity, 1), dim), dtype=mx.float32), 0)

    @property
    def rows(self) -> mx.array:
        return self.data[: self.n]

    def reserve(self, need: int) -> None:
        """Make room for `need` rows (doubling), keeping rows 0..n. The fast decode step
        writes into the block at row n itself, so it grows the block here first."""
        if need > self.data.shape[0]:
            cap = self.data.shape[0]
            while cap < need:
                cap *= 2
            self.grow_to(cap)

    def grow_to(self, cap: int) -> None:
        """Capacity exactly `cap` rows if it is smaller (keeping rows 0..n)."""
        if cap > self.data.shape[0]:
            grown = mx.zeros((cap, self.data.shape[1]), dtype=self.data.dtype)
            self.data = mx.slice_update(grown, self.data[: self.n], mx.array([0]), axes=(0,))

    def append(self, rows: mx.array) -> None:
        k = rows.shape[0]
        if k == 0:
            return
        need = self.n + k
        self.reserve(need)
        self.data = mx.slice_update(self.data, rows, mx.array([self.n]), axes=(0,))
        self.n = need


@dataclass
class LayerState:
    ratio: int
    raw: mx.array  # [window, head_dim] ring, slot = position mod window
    comp: GrowBuf | None = None  # [T // ratio, head_dim]
    index: GrowBuf | None = None  # [T // 4, index_head_dim] (CSA only)
    front: dict[str, mx.array] = field(default_factory=dict)
    # Position held by each ring slot (−1 empty) for rings that are not fed every position
    # (the MTP block's); None means "all positions before T", computed on the fly.
    raw_pos: np.ndarray | None = None


def _frontier(slots: int, width: int) -> tuple[mx.array, mx.array]:
    return (
        mx.zeros((slots, width), dtype=mx.float32),
        mx.full((slots, width), -mx.inf, dtype=mx.float32),
    )


def new_layer_state(cfg: ModelConfig, ratio: int) -> LayerState:
    hd, di = cfg.head_dim, cfg.index_head_dim
    st = LayerState(ratio=ratio, raw=mx.zeros((cfg.sliding_window, hd), dtype=mx.float32))
    if ratio == 4:
        st.comp, st.index = GrowBuf.empty(hd), GrowBuf.empty(di)
        st.front["kv_state"], st.front["score_state"] = _frontier(8, 2 * hd)
        st.front["idx_kv_state"], st.front["idx_score_state"] = _frontier(8, 2 * di)
    elif ratio == 128:
        st.comp = GrowBuf.empty(hd, 8)
        st.front["kv_state"], st.front["score_state"] = _frontier(128, hd)
    return st


def ring_positions(n_tokens: int, window: int) -> np.ndarray:
    """Absolute position held by each ring slot after `n_tokens` tokens (−1 = empty)."""
    slots = np.arange(window)
    last = n_tokens - 1
    pos = last - ((last - slots) % window)
    return np.where(pos >= 0, pos, -1)


def ring_write(ring: mx.array, rows: mx.array, start_pos: int) -> mx.array:
    """Write rows for positions start_pos.. into the ring (keeping only the last `window`)."""
    window = ring.shape[0]
    s = rows.shape[0]
    if s > window:
        rows, start_pos, s = rows[s - window :], start_pos + s - window, window
    slot = start_pos % window
    first = min(s, window - slot)
    ring = mx.slice_update(ring, rows[:first], mx.array([slot]), axes=(0,))
    if first < s:
        ring = mx.slice_update(ring, rows[first:], mx.array([0]), axes=(0,))
    return ring


@dataclass
class DecodeState:
    """Everything decode needs after `n_tokens` tokens; produced by `Engine.new_state()`."""

    numerics: str
    window: int
    layers: list[LayerState]
    tokens: list[int] = field(default_factory=list)
    logits: mx.array | None = None  # float32 [vocab] after the last token
    last_streams: mx.array | None = None  # [hc_mult, hidden] before hc_head (feeds MTP)
    mtp_layer: LayerState | None = None  # the MTP block's own raw window (not exported)

    @classmethod
    def new(cls, cfg: ModelConfig, numerics: str) -> DecodeState:
        layers = [new_layer_state(cfg, r) for r in cfg.ratios]
        return cls(numerics=numerics, window=cfg.sliding_window, layers=layers)

    @property
    def n_tokens(self) -> int:
        return len(self.tokens)

    def clone(self, copy_tokens: bool = True) -> DecodeState:
        """Independent copy (arrays are shared but never mutated in place). O(layers + T): the
        token list is the only part copied element by element (shared if not copy_tokens)."""
        out = copy.copy(self)
        if copy_tokens:
            out.tokens = list(self.tokens)
        out.layers = []
        for ls in self.layers:
            c = copy.copy(ls)
            c.comp = copy.copy(ls.comp) if ls.comp is not None else None
            c.index = copy.copy(ls.index) if ls.index is not None else None
            c.front = dict(ls.front)
            out.layers.append(c)
        if self.mtp_layer is not None:
            out.mtp_layer = copy.copy(self.mtp_layer)
            if self.mtp_layer.raw_pos is not None:
                out.mtp_layer.raw_pos = self.mtp_layer.raw_pos.copy()
        return out

    def checkpoint(self) -> tuple:
        """A cheap snapshot for `rollback`: small arrays and row counts (see Engine._advance)."""
        layers = [
            (
                ls.raw,
                dict(ls.front),
                ls.comp.n if ls.comp is not None else 0,
                ls.index.n if ls.index is not None else 0,
                ls.raw_pos,
            )
            for ls in self.layers
        ]
        mtp = copy.copy(self.mtp_layer) if self.mtp_layer is not None else None
        return (len(self.tokens), self.logits, self.last_streams, mtp, layers)

    def rollback(self, snap: tuple) -> None:
        n_tokens, self.logits, self.last_streams, self.mtp_layer, layers = snap
        del self.tokens[n_tokens:]
        for ls, (raw, front, n_comp, n_index, raw_pos) in zip(self.layers, layers, strict=True):
            ls.raw, ls.front, ls.raw_pos = raw, front, raw_pos
            if ls.comp is not None:
                ls.comp.n = n_comp
            if ls.index is not None:
                ls.index.n = n_index

    def arrays(self) -> list[mx.array]:
        """All arrays, for `mx.eval` after a chunk (bounds the lazy graph)."""
        out: list[mx.array] = []
        for ls in self.layers:
            out.append(ls.raw)
            if ls.comp is not None:
                out.append(ls.comp.data)
            if ls.index is not None:
                out.append(ls.index.data)
            out.extend(ls.front.values())
        if self.logits is not None:
            out.append(self.logits)
        if self.last_streams is not None:
            out.append(self.last_streams)
        return out

    # ------------------------------------------------------------------ export / import

    def export(self) -> StateExport:
        t = self.n_tokens
        pos = ring_positions(t, self.window)
        order = np.argsort(np.where(pos >= 0, pos, np.iinfo(np.int64).max))[: min(t, self.window)]
        layers = []
        for ls in self.layers:
            raw = np.array(ls.raw)[order]
            layers.append(
                LayerExport(
                    kind=KIND_OF_RATIO[ls.ratio],
                    ratio=ls.ratio,
                    raw=raw.astype(np.float32),
                    comp=np.array(ls.comp.rows) if ls.comp is not None else None,
                    index=np.array(ls.index.rows) if ls.index is not None else None,
                    frontiers={k: np.array(v) for k, v in ls.front.items()},
                )
            )
        mtp = None
        if self.last_streams is not None:
            mtp = {"last_streams": np.array(self.last_streams)}
        return StateExport(
            n_tokens=t,
            tokens=np.asarray(self.tokens, dtype=np.int32),
            layers=layers,
            numerics=self.numerics,
            logits=np.array(self.logits) if self.logits is not None else None,
            mtp=mtp,
        )

    @classmethod
    def from_export(cls, cfg: ModelConfig, ex: StateExport) -> DecodeState:
        st = cls.new(cfg, ex.numerics)
        t = int(ex.n_tokens)
        if len(ex.tokens) != t:
            raise ValueError(f"state export: {len(ex.tokens)} token ids for n_tokens={t}")
        if len(ex.layers) != len(st.layers):
            raise ValueError(
                f"state export has {len(ex.layers)} layers, the model has {len(st.layers)}"
            )
        st.tokens = [int(x) for x in ex.tokens]
        n_raw = min(t, st.window)
        for i, (ls, le) in enumerate(zip(st.layers, ex.layers, strict=True)):
            if le.ratio != ls.ratio:
                raise ValueError(f"state export layer {i}: ratio {le.ratio}, model {ls.ratio}")
            if le.raw.shape != (n_raw, ls.raw.shape[1]):
                raise ValueError(f"state export layer {i}: raw window shape {le.raw.shape}")
            if n_raw:
                ls.raw = ring_write(ls.raw, mx.array(le.raw, dtype=mx.float32), t - n_raw)
            if ls.comp is not None:
                rows = le.comp if le.comp is not None else np.zeros((0, ls.raw.shape[1]))
                if rows.shape[0] != t // ls.ratio:
                    raise ValueError(
                        f"state export layer {i}: {rows.shape[0]} compressed rows, "
                        f"expected {t // ls.ratio}"
                    )
                ls.comp.append(mx.array(rows, dtype=mx.float32))
            if ls.index is not None:
                rows = le.index if le.index is not None else np.zeros((0, 1))
                if rows.shape[0] != t // 4:
                    raise ValueError(f"state export layer {i}: {rows.shape[0]} index keys")
                ls.index.append(mx.array(rows, dtype=mx.float32))
            for k in ls.front:
                if k not in le.frontiers:
                    raise ValueError(f"state export layer {i}: missing frontier {k!r}")
                arr = le.frontiers[k]
                if arr.shape != ls.front[k].shape:
                    raise ValueError(f"state export layer {i}: frontier {k!r} shape {arr.shape}")
                ls.front[k] = mx.array(arr, dtype=mx.float32)
        if ex.logits is not None:
            st.logits = mx.array(ex.logits, dtype=mx.float32)
        if ex.mtp and "last_streams" in ex.mtp:
            st.last_streams = mx.array(ex.mtp["last_streams"], dtype=mx.float32)
        return st
