"""Fast single-token decode step (S == 1) for the DeepSeek V4 engine.

`Model.forward` (engine/model.py) is the reference: one code path for any chunk length, with
per-layer Python graph building and shapes that follow the row counts. On GPU backends a
decoded token is launch-bound (every MLX primitive costs ~10 µs there), so this module runs
the same mathematics as a handful of `mx.compile`d functions:

- one compiled function per layer *variant* — kind (SWA / CSA / HCA) × "this token completes a
  compressor window" × hash routing × weight formats — with the layer's weights passed as
  inputs, so the 43 layers reuse a few traced graphs;
- everything that depends on the position (ring slot, RoPE tables, visibility masks, row
  counts) is a small device array built once per step and shared by all layers;
- the state's capacity blocks are the fixed shapes: rows beyond the count are masked
  (`arange(cap) < n`) instead of sliced, the ring and the row blocks are written with
  `mx.slice_update` at a device index, so shapes change only when a block doubles;
- fewer primitives: projections that read the same input are one matmul over weights
  concatenated at load (same format only), the grouped `wo_a` is one `gather_qmm` /
  batched matmul, RoPE is one element-wise expression over the whole row (no stack or
  concatenate), routed experts' w1|w3 optionally one gather over a fused stack.

On CUDA the FP8/FP4 rounding chains run as one launch each (engine/decode_kernels.py) and
the mHC Sinkhorn as engine/fused.py's kernel; both, the reversed-pair RoPE view and the grouped
`wo_a` gather are checked once at load on the device, with array-op fallbacks
(`FastDecoder.*_how` say what runs).

Numerics are those of the reference path (exact: ≤ 1e-5 relative logit difference, checked by
tests/test_engine_decode_fast.py).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from functools import partial

import mlx.core as mx
from ds4_agent.engine.config import ModelConfig
from ds4_agent.engine.decode_kernels import Rounders
from ds4_agent.engine.model import Model, embed_rows, rope_tables, swiglu
from ds4_agent.engine.qtensor import QuantizedTensor, Weight
from ds4_agent.engine.quant import hadamard
from ds4_agent.engine.state import DecodeState

# A weight's format: ("q", mode, bits, group_size, has_biases, scales dtype, input dtype or
# None) or ("p", dtype). Only weights of one format are fused.
Fmt = tuple


def _fmt(w: Weight) -> Fmt:
    if isinstance(w, QuantizedTensor):
        return (
            "q",
            w.mode,
            w.bits,
            w.group_size,
            w.biases is not None,
            w.scales.dtype,
            w.input_dtype,
        )
    return ("p", w.dtype)


def _put(dst: dict[str, mx.array], key: str, w: Weight) -> None:
    if isinstance(w, QuantizedTensor):
        dst[key + ".w"] = w.weight
        dst[key + ".s"] = w.scales
        if w.biases is not None:
            dst[key + ".b"] = w.biases
    else:
        dst[key] = w


def _lin(x: mx.array, W: dict[str, mx.array], key: str, fmt: Fmt) -> mx.array:
    """Same operation as `model.linear` on the packed arrays."""
    if fmt[0] == "q":
        _, mode, bits, gs, has_b, _, in_dtype = fmt
        if in_dtype is not None:
            x = x.astype(in_dtype)
        return mx.quantized_matmul(
            x,
            W[key + ".w"],
            W[key + ".s"],
            W[key + ".b"] if has_b else None,
            transpose=True,
            group_size=gs,
            bits=bits,
            mode=mode,
        ).astype(mx.float32)
    return (x @ W[key].T).astype(mx.float32)


def _gather(
    x: mx.array, W: dict[str, mx.array], key: str, fmt: Fmt, idx: mx.array, lhs: mx.array
) -> mx.array:
    """x [..., 1, in] against stacked matrices idx of W[key] [N, out, in] → [..., 1, out].
    `lhs` indexes x's batch (passed in: a default one is an arange kernel per call)."""
    if fmt[0] == "q":
        _, mode, bits, gs, has_b, _, in_dtype = fmt
        if in_dtype is not None:
            x = x.astype(in_dtype)
        return mx.gather_qmm(
            x,
            W[key + ".w"],
            W[key + ".s"],
            W[key + ".b"] if has_b else None,
            lhs_indices=lhs,
            rhs_indices=idx,
            transpose=True,
            group_size=gs,
            bits=bits,
            mode=mode,
        ).astype(mx.float32)
    w = W[key]
    y = mx.gather_mm(x.astype(w.dtype), w.swapaxes(-1, -2), lhs_indices=lhs, rhs_indices=idx)
    return y.astype(mx.float32)


def _group_weight(W: dict[str, mx.array], key: str, g: int) -> dict[str, mx.array]:
    """The arrays of group g of a [G, out, in] packed weight, under the same key."""
    return {k: v[g] for k, v in W.items() if k == key or k.startswith(key + ".")}


def _concat_weights(ws: list[Weight], axis: int = 0) -> Weight:
    if len(ws) == 1:
        return ws[0]
    if isinstance(ws[0], QuantizedTensor):
        q0 = ws[0]
        return QuantizedTensor(
            mx.concatenate([w.weight for w in ws], axis=axis),
            mx.concatenate([w.scales for w in ws], axis=axis),
            mx.concatenate([w.biases for w in ws], axis=axis) if q0.biases is not None else None,
            q0.mode,
            q0.bits,
            q0.group_size,
            q0.input_dtype,
        )
    return mx.concatenate(ws, axis=axis)


def _slice_weight(w: Weight, a: int, b: int, axis: int = 0) -> Weight:
    sl = (slice(None),) * axis + (slice(a, b),)
    if isinstance(w, QuantizedTensor):
        return QuantizedTensor(
            w.weight[sl],
            w.scales[sl],
            w.biases[sl] if w.biases is not None else None,
            w.mode,
            w.bits,
            w.group_size,
            w.input_dtype,
        )
    return w[sl]


def _arrays(w: Weight) -> list[mx.array]:
    if isinstance(w, QuantizedTensor):
        return [a for a in (w.weight, w.scales, w.biases) if a is not None]
    return [w]


@dataclass(frozen=True)
class Proj:
    """Several projections of one input run as one matmul over row-concatenated weights."""

    key: str
    fmt: Fmt
    parts: tuple[tuple[str, int, int], ...]  # (weight name suffix, first, last output column)

    def __call__(self, x: mx.array, W: dict[str, mx.array]) -> dict[str, mx.array]:
        y = _lin(x, W, self.key, self.fmt)
        if len(self.parts) == 1:
            return {self.parts[0][0]: y}
        return {name: y[..., a:b] for name, a, b in self.parts}


def _rms(x: mx.array, w: mx.array | None, eps: float) -> mx.array:
    """`model.rms` as one fused kernel (the compiled expression is three: the square, the
    reduction, the scaling); float32 in, float32 out, equal to it within rounding."""
    return mx.fast.rms_norm(x, w, eps)


def _as_f32(w: mx.array) -> mx.array:
    return w if w.dtype == mx.float32 else w.astype(mx.float32)


# --------------------------------------------------------------------------------------------
# RoPE as one element-wise expression
# --------------------------------------------------------------------------------------------


def rope_pairs(cos: mx.array, sin: mx.array, width: int) -> tuple[mx.array, mx.array]:
    """cos/sin [R/2] of one position → (c2, s2) [width/2, 2] so that interleaved RoPE on the
    last R channels of a row x [.., width] is `x2 * c2 + swap(x2) * s2` (x2 = pairs of x,
    swap = the two members exchanged); the leading channels get (1, 0), i.e. pass through."""
    nh = width // 2 - cos.shape[-1]
    c = mx.concatenate([mx.ones((nh,), dtype=mx.float32), cos])
    s = mx.concatenate([mx.zeros((nh,), dtype=mx.float32), sin])
    return mx.stack([c, c], axis=-1), mx.stack([-s, s], axis=-1)


def rope_apply_stacked(
    x: mx.array, tab: tuple[mx.array, mx.array], inverse: bool = False
) -> mx.array:
    """`rope_apply` without the reversed (negative-stride) view: the two members of each pair
    as positive-stride views, recombined by a stack (one more kernel). The fallback should a
    backend mishandle the reversed view (checked at load, `_rope_checked`)."""
    c2, s2 = tab
    c, s = c2[:, 0], s2[:, 1]
    if inverse:
        s = -s
    x2 = x.reshape(*x.shape[:-1], x.shape[-1] // 2, 2)
    x0, x1 = x2[..., 0], x2[..., 1]
    return mx.stack([x0 * c - x1 * s, x1 * c + x0 * s], axis=-1).reshape(x.shape)


def rope_apply(x: mx.array, tab: tuple[mx.array, mx.array], inverse: bool = False) -> mx.array:
    """RoPE (or its inverse) with tables from `rope_pairs`; x [..., width]. Per pair this is
    x0·c − x1·s, x1·c + x0·s — the reference's expression — with no stack or concatenate."""
    c2, s2 = tab
    x2 = x.reshape(*x.shape[:-1], x.shape[-1] // 2, 2)
    y = x2 * c2 + x2[..., ::-1] * (-s2 if inverse else s2)
    return y.reshape(x.shape)


# The RoPE the traced layers use: `rope_apply`, or `rope_apply_stacked` where the load-time
# check found the reversed view mishandled (one device per process, so one global choice).
_ROPE = [rope_apply]


def _rope_checked() -> str:
    """Compare the compiled `rope_apply` with the reference `rope_tail` on this device."""
    from ds4_agent.engine.model import rope_tail

    if mx.default_device() == mx.cpu:
        return "reversed-pair view (CPU)"
    try:
        x = mx.random.normal((3, 4, 512), key=mx.random.key(5))
        inv = mx.array([10000.0 ** (-k / 32) for k in range(32)], dtype=mx.float32)
        cos, sin = rope_tables(inv, mx.array([7.0, 300.0, 5000.0]))
        want = rope_tail(x, cos, sin)
        got = mx.stack(
            [mx.compile(rope_apply)(x[i], rope_pairs(cos[i], sin[i], 512)) for i in range(3)]
        )
        err = float(mx.abs(got - want).max() / mx.abs(want).max())
        if err <= 1e-6:
            return "reversed-pair view"
        why = f"max rel. difference {err:.3g}"
    except Exception as e:  # keep the stacked form
        why = f"{type(e).__name__}: {str(e)[:200]}"
    _ROPE[0] = rope_apply_stacked
    return f"stacked ({why})"


# --------------------------------------------------------------------------------------------
# Packed weights of one layer
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LayerSpec:
    """Static description of one layer: selects (and keys) its compiled function."""

    ratio: int
    hashed: bool
    proj_a: tuple[Proj, ...]  # projections of the attn-normed input
    proj_q: tuple[Proj, ...]  # projections of q_lat
    proj_f: tuple[Proj, ...]  # projections of the ffn-normed input
    wo_a: Fmt
    wo_a_grouped: bool  # one gather over the groups (else one matmul per group, see probe)
    wo_b: Fmt
    sh_w2: Fmt
    experts: tuple[Fmt, ...]  # (w13,) fused or (w1, w3); then w2 last
    fused_experts: bool


_A_INPUT = (
    "attn.wq_a.weight",
    "attn.wkv.weight",
    "attn.compressor.wkv.weight",
    "attn.compressor.wgate.weight",
    "attn.indexer.weights_proj.weight",
    "attn.indexer.compressor.wkv.weight",
    "attn.indexer.compressor.wgate.weight",
)
_Q_INPUT = ("attn.wq_b.weight", "attn.indexer.wq_b.weight")
_F_INPUT = ("ffn.gate.weight", "ffn.shared_experts.w1.weight", "ffn.shared_experts.w3.weight")
_VECTORS = (
    "hc_attn_fn",
    "hc_attn_base",
    "hc_attn_scale",
    "hc_ffn_fn",
    "hc_ffn_base",
    "hc_ffn_scale",
    "attn_norm.weight",
    "ffn_norm.weight",
    "attn.q_norm.weight",
    "attn.kv_norm.weight",
    "attn.attn_sink",
    "attn.compressor.ape",
    "attn.compressor.norm.weight",
    "attn.indexer.compressor.ape",
    "attn.indexer.compressor.norm.weight",
    "ffn.gate.bias",
)


def _group(
    names: tuple[str, ...], w: dict[str, Weight], p: str, tag: str
) -> tuple[list[tuple[str, Weight, list[str]]], tuple[Proj, ...]]:
    """Group the present projections by format; → (fused weights to store, Proj specs)."""
    groups: dict[Fmt, list[str]] = {}
    for n in names:
        if p + n in w:
            groups.setdefault(_fmt(w[p + n]), []).append(n)
    stored, projs = [], []
    for gi, (fmt, members) in enumerate(groups.items()):
        key = f"{tag}{gi}"
        parts, off = [], 0
        for n in members:
            rows = w[p + n].shape[0]
            parts.append((n, off, off + rows))
            off += rows
        stored.append((key, _concat_weights([w[p + n] for n in members]), members))
        projs.append(Proj(key, fmt, tuple(parts)))
    return stored, tuple(projs)


def upcast_affine_scales(w: dict[str, Weight], prefix: str) -> int:
    """Store the float32 scales/biases of affine weights that multiply float32 activations.

    MLX's `quantized_matmul` / `gather_qmm` compute in the promoted type of (x, scales): with
    float32 x and bf16 scales every call first casts the scales and biases to float32 — for a
    routed-expert stack that is the whole [E, out, in/group] array per token and layer (two
    extra launches and ~0.2 GB of traffic per layer at the Flash shapes). The cast is exact,
    so doing it once here changes no result. Returns the bytes added.
    """
    added = 0
    for name in [n for n in w if n.startswith(prefix)]:
        q = w[name]
        if (
            isinstance(q, QuantizedTensor)
            and q.mode == "affine"
            and q.input_dtype is None
            and q.scales.dtype != mx.float32
        ):
            s32 = q.scales.astype(mx.float32)
            b32 = q.biases.astype(mx.float32) if q.biases is not None else None
            mx.eval(s32, *([b32] if b32 is not None else []))
            added += s32.nbytes - q.scales.nbytes
            if b32 is not None:
                added += b32.nbytes - q.biases.nbytes
            w[name] = QuantizedTensor(q.weight, s32, b32, q.mode, q.bits, q.group_size, None)
    return added


def pack_layer(
    model: Model, i: int, fuse_experts: bool, share: bool = True, upcast_scales: bool = False
) -> tuple[LayerSpec, dict[str, mx.array]]:
    """The arrays one layer's compiled function takes, and its static spec.

    With `share`, the model's own entries for the fused matrices are replaced by views into
    the fused arrays (same values), so fusing does not keep two copies of a weight. With
    `upcast_scales`, affine scales/biases are stored float32 (`upcast_affine_scales`; the
    model's entries are replaced too, so the reference path runs on the same arrays).
    """
    cfg, w = model.cfg, model.w
    p = f"layers.{i}."
    if upcast_scales:
        upcast_affine_scales(w, p)
    W: dict[str, mx.array] = {}
    for n in _VECTORS:
        if p + n in w:
            W[n] = _as_f32(w[p + n])
    hc = cfg.hc_mult
    for site in ("hc_attn", "hc_ffn"):
        sc = W[site + "_scale"]
        W[site + "_scale_row"] = mx.concatenate(
            [
                mx.broadcast_to(sc[0:1], (hc,)),
                mx.broadcast_to(sc[1:2], (hc,)),
                mx.broadcast_to(sc[2:3], (hc * hc,)),
            ]
        )
    # Compressor gate bias per frontier slot (CSA: the current window's slots are 4..7).
    for pre_, m in (("attn.compressor.", cfg.ratios[i]), ("attn.indexer.compressor.", 4)):
        if pre_ + "ape" in W and m:
            ape = W[pre_ + "ape"]
            W[pre_ + "ape_slots"] = mx.concatenate([mx.zeros_like(ape), ape]) if m == 4 else ape
    mx.eval(list(W.values()))
    if p + "ffn.gate.tid2eid" in w:
        W["ffn.gate.tid2eid"] = w[p + "ffn.gate.tid2eid"].astype(mx.int32)

    new_views: dict[str, Weight] = {}
    proj_sets = []
    for names, tag in ((_A_INPUT, "pa"), (_Q_INPUT, "pq"), (_F_INPUT, "pf")):
        stored, projs = _group(names, w, p, tag)
        for (key, fused, members), pr in zip(stored, projs, strict=True):
            if len(members) > 1:
                mx.eval(*_arrays(fused))
                if share:
                    for n, a, b in pr.parts:
                        new_views[p + n] = _slice_weight(fused, a, b)
            _put(W, key, fused)
        proj_sets.append(projs)

    # Grouped output projection as one batched op: wo_a [G·r_o, in] → [G, r_o, in] (a view).
    g_n, r_o = cfg.o_groups, cfg.o_lora_rank
    wo_a = w[p + "attn.wo_a.weight"]
    if isinstance(wo_a, QuantizedTensor):
        wo_g = QuantizedTensor(
            *(
                a.reshape(g_n, r_o, -1) if a is not None else None
                for a in (wo_a.weight, wo_a.scales, wo_a.biases)
            ),
            wo_a.mode,
            wo_a.bits,
            wo_a.group_size,
            wo_a.input_dtype,
        )
    else:
        wo_g = wo_a.reshape(g_n, r_o, -1)
    _put(W, "wo_a", wo_g)
    _put(W, "wo_b", w[p + "attn.wo_b.weight"])
    _put(W, "sh_w2", w[p + "ffn.shared_experts.w2.weight"])

    w1, w2, w3 = (w[p + f"ffn.experts.{k}.weight"] for k in ("w1", "w2", "w3"))
    fused = fuse_experts and _fmt(w1) == _fmt(w3)
    if fused:
        # Stacked along the expert axis ([2E, I, D]): expert e's w3 is row E + e, so one
        # gather with indices (idx, idx + E) computes both, and w1 / w3 stay contiguous views.
        w13 = _concat_weights([w1, w3])
        mx.eval(*_arrays(w13))
        _put(W, "w13", w13)
        n_e = w1.shape[0]
        if share:
            new_views[p + "ffn.experts.w1.weight"] = _slice_weight(w13, 0, n_e)
            new_views[p + "ffn.experts.w3.weight"] = _slice_weight(w13, n_e, 2 * n_e)
        exp_fmts = (_fmt(w1), _fmt(w2))
    else:
        _put(W, "w1", w1)
        _put(W, "w3", w3)
        exp_fmts = (_fmt(w1), _fmt(w3), _fmt(w2))
    _put(W, "w2", w2)
    if new_views:
        mx.eval(*[a for v in new_views.values() for a in _arrays(v)])
        w.update(new_views)

    spec = LayerSpec(
        ratio=cfg.ratios[i],
        hashed=cfg.is_hash_layer(i),
        proj_a=proj_sets[0],
        proj_q=proj_sets[1],
        proj_f=proj_sets[2],
        wo_a=_fmt(wo_a),
        wo_a_grouped=True,
        wo_b=_fmt(w[p + "attn.wo_b.weight"]),
        sh_w2=_fmt(w[p + "ffn.shared_experts.w2.weight"]),
        experts=exp_fmts,
        fused_experts=fused,
    )
    return spec, W


# --------------------------------------------------------------------------------------------
# The layer body (traced once per variant by mx.compile)
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Static:
    """Model constants the traced functions close over."""

    hc: int
    eps: float
    hc_eps: float
    heads: int
    head_dim: int
    nope: int
    window: int
    groups: int
    idx_heads: int
    idx_dim: int
    topk_experts: int
    routed_scale: float
    swiglu_limit: float
    official: bool

    @classmethod
    def of(cls, cfg: ModelConfig, official: bool) -> Static:
        return cls(
            hc=cfg.hc_mult,
            eps=cfg.rms_norm_eps,
            hc_eps=cfg.hc_eps,
            heads=cfg.num_attention_heads,
            head_dim=cfg.head_dim,
            nope=cfg.nope_dim,
            window=cfg.sliding_window,
            groups=cfg.o_groups,
            idx_heads=cfg.index_n_heads,
            idx_dim=cfg.index_head_dim,
            topk_experts=cfg.num_experts_per_tok,
            routed_scale=cfg.routed_scaling_factor,
            swiglu_limit=cfg.swiglu_limit,
            official=official,
        )


def round_kv(kv: mx.array, c: Static, nope: mx.array, rnd: Rounders) -> mx.array:
    """`Model._round_kv`: FP8 non-RoPE / BF16 RoPE channels (official), else unchanged."""
    return rnd.kv(kv, nope) if c.official else kv


def round_index(v: mx.array, c: Static, rnd: Rounders) -> mx.array:
    return rnd.fp4(hadamard(v)) if c.official else v


def _hc_pre(x: mx.array, W, T, site: str, c: Static, sinkhorn):
    """`Model.hc_pre` for one token on packed weights: x [1, hc, D] → a [1, D], post, comb."""
    hc = c.hc
    flat = _rms(x.reshape(1, -1), None, c.eps)
    mix = flat @ W[site + "_fn"].T
    # One element-wise launch over the whole mix row (the per-part scales expanded at load);
    # pre / post / comb are then views of its outputs.
    # `parts` masks pick, per column, pre (sigmoid + eps), post (2·sigmoid) or comb (z): one
    # output array, so the whole expression fuses into one kernel.
    z = mix * W[site + "_scale_row"] + W[site + "_base"]
    sg = mx.sigmoid(z)
    y = mx.where(T["hc_pre"], sg + c.hc_eps, mx.where(T["hc_post"], 2 * sg, z))
    pre, post = y[:, :hc], y[:, hc : 2 * hc]
    comb = sinkhorn(y[:, 2 * hc :].reshape(1, hc, hc))
    a = (pre[:, None, :] @ x)[:, 0]  # Σ_k pre_k·X_k as one matmul [1, 1, hc] @ [1, hc, D]
    return a, post, comb


def _hc_post(o, x, post, comb):
    return post[:, :, None] * o[:, None, :] + comb.swapaxes(-1, -2) @ x


def _compress(
    cvec, gvec, W, S, T, pre: str, fk: str, m: int, width: int, complete: bool, tab, c: Static
):
    """One compressor fed one token (`Model._compress` for S = 1): writes the token's slot of
    the frontier; on a window's last token pools it → (row [1, width] or None, new frontier)."""
    overlap = m == 4
    # Write the token's frontier slot as a select over the (small) frontier: one fused kernel
    # each, where a gather of the ape row + add + slice update would be three.
    at = T["at4" if overlap else "at128"]  # [slots, 1] bool: the token's slot
    kv_f = mx.where(at, cvec, S[fk + "kv_state"])
    sc_f = mx.where(at, gvec + W[pre + "ape_slots"], S[fk + "score_state"])
    if not complete:
        return None, kv_f, sc_f
    cw = kv_f.shape[1]
    if overlap:
        # Row pools the A-halves of the previous window and the B-halves of this one.
        win_kv, win_g = kv_f[m:], sc_f[m:]
        slot_kv = mx.concatenate([kv_f[:m, :width], win_kv[:, width:]])
        slot_g = mx.concatenate([sc_f[:m, :width], win_g[:, width:]])
        new_kv = mx.concatenate([win_kv, mx.zeros((m, cw), dtype=mx.float32)])
        new_g = mx.concatenate([win_g, mx.full((m, cw), -mx.inf, dtype=mx.float32)])
    else:
        slot_kv, slot_g = kv_f, sc_f
        new_kv = mx.zeros(kv_f.shape, dtype=mx.float32)
        new_g = mx.full(sc_f.shape, -mx.inf, dtype=mx.float32)
    pooled = (mx.softmax(slot_g, axis=0, precise=True) * slot_kv).sum(axis=0, keepdims=True)
    row = _ROPE[0](_rms(pooled, W[pre + "norm.weight"], c.eps), tab)
    return row, new_kv, new_g


def layer_body(spec: LayerSpec, complete: bool, c: Static, sinkhorn, rnd: Rounders, x, W, S, T):
    """One decoder layer for one token. x [1, hc, D]; W packed weights; S the layer's state
    arrays (raw ring, row capacity blocks, frontiers); T the step's shared small arrays.
    → (x' [1, hc, D], S')."""
    ratio = spec.ratio
    h, hd = c.heads, c.head_dim
    S2 = dict(S)

    # ---------------------------------------------------------------- attention
    a, post, comb = _hc_pre(x, W, T, "hc_attn", c, sinkhorn)
    a = _rms(a, W["attn_norm.weight"], c.eps)
    pa: dict[str, mx.array] = {}
    for pr in spec.proj_a:
        pa.update(pr(a, W))
    q_lat = _rms(pa["attn.wq_a.weight"], W["attn.q_norm.weight"], c.eps)
    pq: dict[str, mx.array] = {}
    for pr in spec.proj_q:
        pq.update(pr(q_lat, W))
    tab = (T["main_c"], T["main_s"]) if ratio == 0 else (T["cmp_c"], T["cmp_s"])
    q = _ROPE[0](_rms(pq["attn.wq_b.weight"].reshape(h, hd), None, c.eps), tab)  # [H, hd]
    kv = _rms(pa["attn.wkv.weight"], W["attn.kv_norm.weight"], c.eps)
    kv = round_kv(_ROPE[0](kv, tab), c, T["nope"], rnd)  # [1, hd]
    ring = mx.slice_update(S["raw"], kv, T["slot_w"], axes=(0,))
    S2["raw"] = ring

    scale = 1.0 / math.sqrt(hd)
    blocks = [(q @ ring.T) * scale + T["bias_raw"]]  # [H, W]
    values = [ring]
    if ratio:
        tabm = (T["c4_c"], T["c4_s"]) if ratio == 4 else (T["c128_c"], T["c128_s"])
        row, S2["kv_state"], S2["score_state"] = _compress(
            pa["attn.compressor.wkv.weight"],
            pa["attn.compressor.wgate.weight"],
            W,
            S,
            T,
            "attn.compressor.",
            "",
            ratio,
            hd,
            complete,
            tabm,
            c,
        )
        comp = S["comp"]
        nb = T["n4b" if ratio == 4 else "n128b"]
        if row is not None:
            comp = mx.slice_update(comp, round_kv(row, c, T["nope"], rnd), nb, axes=(0,))
            S2["comp"] = comp
        if ratio == 128:
            blocks.append((q @ comp.T) * scale + T["bias128"])  # rows < n visible
            values.append(comp)
        else:
            irow, S2["idx_kv_state"], S2["idx_score_state"] = _compress(
                pa["attn.indexer.compressor.wkv.weight"],
                pa["attn.indexer.compressor.wgate.weight"],
                W,
                S,
                T,
                "attn.indexer.compressor.",
                "idx_",
                4,
                c.idx_dim,
                complete,
                (T["i4_c"], T["i4_s"]),
                c,
            )
            keys = S["index"]
            if irow is not None:
                keys = mx.slice_update(keys, round_index(irow, c, rnd), nb, axes=(0,))
                S2["index"] = keys
            # Lightning indexer over the whole capacity block, rows ≥ n masked to −inf.
            hi, di = c.idx_heads, c.idx_dim
            qi = pq["attn.indexer.wq_b.weight"].reshape(hi, di)
            qi = round_index(_ROPE[0](qi, (T["idx_c"], T["idx_s"])), c, rnd)
            wts = pa["attn.indexer.weights_proj.weight"] * (di**-0.5 * hi**-0.5)  # [1, Hi]
            dots = mx.maximum(qi @ keys.T, 0.0)  # [Hi, cap]
            sc = (dots * wts.reshape(hi, 1)).sum(axis=0)  # [cap]
            sc = mx.where(T["vis4"], sc, -mx.inf)
            k = T["k4"].shape[0]
            cap = sc.shape[0]
            if k < cap:
                idx = mx.argpartition(-sc, kth=k - 1)[:k]
            else:
                idx = T["k4"]  # every row is a candidate
            sel = comp[idx]  # [k, hd]
            bias = mx.where(idx < T["n4a"], 0.0, -mx.inf)
            blocks.append((q @ sel.T) * scale + bias)
            values.append(sel)
    sink = W["attn.attn_sink"][:, None]  # [H, 1]
    probs = mx.softmax(mx.concatenate([*blocks, sink], axis=-1), axis=-1, precise=True)
    out = None
    off = 0
    for v in values:
        n = v.shape[0]
        o = probs[:, off : off + n] @ v
        out = o if out is None else out + o
        off += n
    out = _ROPE[0](out, tab, inverse=True)  # [H, hd]
    og = out.reshape(c.groups, 1, -1)
    if spec.wo_a_grouped:
        u = _gather(og, W, "wo_a", spec.wo_a, T["groups"], T["groups"]).reshape(1, -1)
    else:
        u = mx.concatenate(
            [_lin(og[g], _group_weight(W, "wo_a", g), "wo_a", spec.wo_a) for g in range(c.groups)],
            axis=-1,
        )  # [1, G·o_lora]
    o = _lin(u, W, "wo_b", spec.wo_b)
    x = _hc_post(o, x, post, comb)

    # ---------------------------------------------------------------- MoE
    a, post, comb = _hc_pre(x, W, T, "hc_ffn", c, sinkhorn)
    a = _rms(a, W["ffn_norm.weight"], c.eps)
    pf: dict[str, mx.array] = {}
    for pr in spec.proj_f:
        pf.update(pr(a, W))
    z = pf["ffn.gate.weight"]  # [1, E]
    scores = mx.sqrt(mx.logaddexp(z, 0.0))
    k = c.topk_experts
    if spec.hashed:
        idx = W["ffn.gate.tid2eid"][T["tok"]]  # [1, k]
    else:
        biased = scores + W["ffn.gate.bias"]
        idx = mx.argpartition(-biased, kth=k - 1, axis=-1)[:, :k]
    wts = mx.take_along_axis(scores, idx, axis=-1)
    wts = wts / (wts.sum(axis=-1, keepdims=True) + 1e-20) * c.routed_scale
    xe = a[:, None, None, :]  # [1, 1, 1, D]
    if spec.fused_experts:
        n_e = W["w2.w"].shape[0] if "w2.w" in W else W["w2"].shape[0]
        h13 = _gather(
            xe, W, "w13", spec.experts[0], mx.concatenate([idx, idx + n_e], axis=-1), T["zero"]
        )
        hmid = swiglu(h13[:, :k], h13[:, k:], c.swiglu_limit)  # [1, k, 1, I]
    else:
        hmid = swiglu(
            _gather(xe, W, "w1", spec.experts[0], idx, T["zero"]),
            _gather(xe, W, "w3", spec.experts[1], idx, T["zero"]),
            c.swiglu_limit,
        )
    y = _gather(hmid, W, "w2", spec.experts[-1], idx, T["k_experts"])[:, :, 0, :]  # [1, k, D]
    routed = (wts[:, None, :] @ y)[:, 0]  # Σ_j w_j·y_j
    sh = swiglu(
        pf["ffn.shared_experts.w1.weight"], pf["ffn.shared_experts.w3.weight"], c.swiglu_limit
    )
    o = routed + _lin(sh, W, "sh_w2", spec.sh_w2)
    return _hc_post(o, x, post, comb), S2


def head_body(c: Static, head_fmt: Fmt, x, W):
    """hc_head + final norm + LM head for one token: x [1, hc, D] → logits [vocab]."""
    flat = _rms(x.reshape(1, -1), None, c.eps)
    mix = flat @ W["hc_head_fn"].T
    pre = mx.sigmoid(mix * W["hc_head_scale"] + W["hc_head_base"]) + c.hc_eps
    y = (pre[:, None, :] @ x)[:, 0]
    y = _rms(y, W["norm.weight"], c.eps)
    return _lin(y, W, "head", head_fmt)[0]


def step_tables(c: Static, inv_main, inv_comp, posf, ints, ar_w, ar_4, ar_128):
    """RoPE tables and masks of one step. posf = [P, P−3, P−127] (the token, and the first
    positions of the ratio-4 / ratio-128 windows it may complete); ints as `step_arrays`
    packs them; ar_* = arange(window), arange(cap4), arange(cap128)."""
    cm, sm = rope_tables(inv_main, posf[:1])
    cc, scc = rope_tables(inv_comp, posf)
    out = {}
    out["main_c"], out["main_s"] = rope_pairs(cm[0], sm[0], c.head_dim)
    out["cmp_c"], out["cmp_s"] = rope_pairs(cc[0], scc[0], c.head_dim)
    out["idx_c"], out["idx_s"] = rope_pairs(cc[0], scc[0], c.idx_dim)
    out["c4_c"], out["c4_s"] = rope_pairs(cc[1], scc[1], c.head_dim)
    out["i4_c"], out["i4_s"] = rope_pairs(cc[1], scc[1], c.idx_dim)
    out["c128_c"], out["c128_s"] = rope_pairs(cc[2], scc[2], c.head_dim)
    n4a, nraw, n128a, slot4, slot128 = (ints[k] for k in (4, 5, 6, 7, 8))
    out["bias_raw"] = mx.where(ar_w < nraw, 0.0, -mx.inf)  # ring slots holding the window
    out["bias128"] = mx.where(ar_128 < n128a, 0.0, -mx.inf)  # ratio-128 rows present
    out["vis4"] = ar_4 < n4a  # index keys present
    out["at4"] = (mx.arange(8) == slot4)[:, None]  # the token's frontier slot
    out["at128"] = (mx.arange(128) == slot128)[:, None]
    return out


# --------------------------------------------------------------------------------------------
# Driver
# --------------------------------------------------------------------------------------------


class FastDecoder:
    """Decode one token with the compiled per-variant layer functions (see module docstring).

    Built once per `Model` (at engine load): packs the weights (fusing same-format
    projections), after which `step(state, token)` returns the lazy next-token logits and
    replaces the state's arrays with the updated ones; the caller evaluates them.
    """

    def __init__(
        self,
        model: Model,
        fuse_experts: bool = False,
        share: bool = True,
        use_kernels: bool | None = None,
        upcast_scales: bool = False,
    ):
        """`use_kernels`: the verified one-launch CUDA kernels (rounding chains; the fused
        Sinkhorn inside compiled graphs) — None: where CUDA is the default device.
        `upcast_scales`: see `upcast_affine_scales` (costs memory: +8.7 GB for the q2 Flash
        experts)."""
        self.model = model
        cfg = model.cfg
        self.cfg = cfg
        self.rounders = Rounders.build(
            cfg.head_dim, cfg.nope_dim, cfg.index_head_dim, use_kernels=use_kernels
        )
        self.sinkhorn, self.sinkhorn_how = _checked_sinkhorn(model)
        self.rope_how = _rope_checked()
        self.static = Static.of(cfg, model.numerics != "exact")  # bf16 rounds as official
        self.fuse_experts = fuse_experts
        self.upcast_scales = upcast_scales
        self.layers = [
            pack_layer(model, i, fuse_experts, share, upcast_scales) for i in range(len(cfg.ratios))
        ]
        w = model.w
        if upcast_scales:
            upcast_affine_scales(w, "head.")
        self.head_w: dict[str, mx.array] = {
            "hc_head_fn": _as_f32(w["hc_head_fn"]),
            "hc_head_base": _as_f32(w["hc_head_base"]),
            "hc_head_scale": _as_f32(w["hc_head_scale"]),
            "norm.weight": _as_f32(w["norm.weight"]),
        }
        _put(self.head_w, "head", w["head.weight"])
        self._head = mx.compile(partial(head_body, self.static, _fmt(w["head.weight"])))
        self._tables = mx.compile(partial(step_tables, self.static))
        self._fns: dict[tuple, object] = {}
        self._aranges: dict[int, mx.array] = {}
        # Layers per asynchronous evaluation inside a step (0: none, evaluate at the end).
        self.async_layers = int(os.environ.get("DS4_DECODE_ASYNC_LAYERS", "0"))
        self.groups = mx.arange(cfg.o_groups, dtype=mx.uint32)
        self.zero = mx.zeros((1, 1), dtype=mx.uint32)  # the token row, for each expert
        self.k_experts = mx.arange(cfg.num_experts_per_tok, dtype=mx.uint32)[None]  # [1, k]
        self.nope_mask = mx.arange(cfg.head_dim) < cfg.nope_dim
        cols = mx.arange((2 + cfg.hc_mult) * cfg.hc_mult)
        self.hc_masks = (cols < cfg.hc_mult, cols < 2 * cfg.hc_mult)
        mx.eval(self.groups, self.zero, self.k_experts, self.nope_mask, *self.hc_masks)
        self.wo_a_how = self._probe_grouped_wo_a()
        # Nothing lazy may outlive the constructor: a lazy array carries the stream of the
        # thread that made it, and decoding may run on another thread (the agent's UI does).
        mx.eval([list(W.values()) for _, W in self.layers], list(self.head_w.values()))

    def _probe_grouped_wo_a(self) -> str:
        """Run the grouped `wo_a` gather once per weight format; a backend without that gather
        kernel (e.g. a quantization mode it lacks) gets one matmul per group instead."""
        from dataclasses import replace

        verdict: dict[Fmt, bool] = {}
        for i, (spec, W) in enumerate(self.layers):
            if spec.wo_a not in verdict:
                og = mx.zeros((self.cfg.o_groups, 1, _wo_a_in(W, spec.wo_a)), dtype=mx.float32)
                try:
                    mx.eval(_gather(og, W, "wo_a", spec.wo_a, self.groups, self.groups))
                    verdict[spec.wo_a] = True
                except Exception:  # e.g. "not implemented" for this mode on this backend
                    verdict[spec.wo_a] = False
            if not verdict[spec.wo_a]:
                self.layers[i] = (replace(spec, wo_a_grouped=False), W)
        bad = [f for f, ok in verdict.items() if not ok]
        return "one gather" if not bad else f"per-group matmuls for {bad}"

    # -------------------------------------------------------------- eligibility

    def supports(self, state: DecodeState) -> bool:
        """The fast step handles every main-model state of this engine's numerics."""
        return (
            state.numerics == self.model.numerics
            and state.window == self.cfg.sliding_window
            and all(ls.raw_pos is None for ls in state.layers)
        )

    def layer_fn(self, i: int, complete: bool):
        spec, _ = self.layers[i]
        key = (spec, complete)
        fn = self._fns.get(key)
        if fn is None:
            fn = mx.compile(
                partial(
                    layer_body,
                    spec,
                    complete and spec.ratio != 0,
                    self.static,
                    self.sinkhorn,
                    self.rounders,
                )
            )
            self._fns[key] = fn
        return fn

    # -------------------------------------------------------------- per step

    def step_arrays(self, state: DecodeState, token: int) -> dict[str, mx.array]:
        """The small position-dependent arrays all layers of this step share (one host→device
        transfer each, never per layer). Grows the row blocks first when the step adds a row."""
        cfg = self.cfg
        p = state.n_tokens
        win = cfg.sliding_window
        n4a, n128a = (p + 1) // 4, (p + 1) // 128
        # All blocks of a kind share one capacity (the step's masks are shaped by it); they
        # grow in step, and any that lag (e.g. built another way) are grown to match.
        csa = [b for ls in state.layers if ls.ratio == 4 for b in (ls.comp, ls.index)]
        hca = [ls.comp for ls in state.layers if ls.ratio == 128]
        for bufs, need in ((csa, n4a), (hca, n128a)):
            for b in bufs:
                b.reserve(need)
            cap = max((b.data.shape[0] for b in bufs), default=0)
            for b in bufs:
                b.grow_to(cap)
        cap4 = csa[0].data.shape[0] if csa else 0
        cap128 = hca[0].data.shape[0] if hca else 0
        # One host→device transfer of the step's integers; the masks and RoPE tables are built
        # from them on the device by one compiled function (a handful of kernels per step).
        ints = mx.array(
            [p % win, p // 4, p // 128, token, n4a, min(p + 1, win), n128a, 4 + p % 4, p % 128],
            dtype=mx.int32,
        )
        T = {
            "slot_w": ints[0:1],
            "n4b": ints[1:2],
            "n128b": ints[2:3],
            "tok": ints[3:4],
            "n4a": ints[4],
            "groups": self.groups,
            "zero": self.zero,
            "hc_pre": self.hc_masks[0],
            "hc_post": self.hc_masks[1],
            "k_experts": self.k_experts,
            "nope": self.nope_mask,
        }
        if cap4:
            T["k4"] = self._arange(min(cfg.index_topk, cap4))
        posf = mx.array([p, p - 3, p - 127], dtype=mx.float32)
        T.update(
            self._tables(
                self.model.inv_freq["main"],
                self.model.inv_freq["compress"],
                posf,
                ints,
                self._arange(win),
                self._arange(max(cap4, 1)),
                self._arange(max(cap128, 1)),
            )
        )
        return T

    def _arange(self, n: int) -> mx.array:
        a = self._aranges.get(n)
        if a is None:
            a = self._aranges[n] = mx.arange(n, dtype=mx.int32)
            mx.eval(a)
        return a

    def step(self, state: DecodeState, token: int) -> mx.array:
        """Run one token at position state.n_tokens; updates the state's arrays (not its token
        list: the caller appends once evaluated) → lazy logits float32 [vocab]."""
        cfg, w = self.cfg, self.model.w
        p = state.n_tokens
        T = self.step_arrays(state, token)
        e = embed_rows(w["embed.weight"], T["tok"])  # [1, D]
        x = mx.broadcast_to(e[:, None, :], (1, cfg.hc_mult, cfg.hidden_size))
        for i, ls in enumerate(state.layers):
            r = ls.ratio
            complete = bool(r) and (p + 1) % r == 0
            _, W = self.layers[i]
            S = {"raw": ls.raw, **ls.front}
            if ls.comp is not None:
                S["comp"] = ls.comp.data
            if ls.index is not None:
                S["index"] = ls.index.data
            x, S2 = self.layer_fn(i, complete)(x, W, S, T)
            if self.async_layers and (i + 1) % self.async_layers == 0:
                # Start the device on the layers built so far while Python builds the rest:
                # the host's graph building (~0.4 ms a layer) overlaps the device's work.
                mx.async_eval(x, *S2.values())
            ls.raw = S2["raw"]
            for k in ls.front:
                ls.front[k] = S2[k]
            if complete:
                ls.comp.data = S2["comp"]
                ls.comp.n += 1
                if ls.index is not None:
                    ls.index.data = S2["index"]
                    ls.index.n += 1
        state.last_streams = x[0]
        logits = self._head(x, self.head_w)
        state.logits = logits
        return logits


def _checked_sinkhorn(model: Model):
    """The model's Sinkhorn (the one-launch kernel on CUDA) if it also runs inside a compiled
    graph and matches the array expression there; else the compiled array expression."""
    from ds4_agent.engine.fused import make_sinkhorn, sinkhorn_reference, use_cuda

    cfg = model.cfg
    fn = model._sinkhorn
    if not use_cuda():
        return fn, "model Sinkhorn"
    try:
        c = mx.random.normal((3, cfg.hc_mult, cfg.hc_mult), key=mx.random.key(7)) * 4
        got = mx.compile(lambda v: fn(v * 1.0))(c)
        want = sinkhorn_reference(c, cfg.hc_sinkhorn_iters, cfg.hc_eps)
        err = float(mx.abs(got - want).max() / mx.abs(want).max())
        if err <= 1e-5:
            return fn, f"fused Sinkhorn kernel (compiled check {err:.2g})"
        why = f"max rel. difference {err:.3g}"
    except Exception as e:  # the kernel cannot be traced: keep the array expression
        why = f"{type(e).__name__}: {str(e)[:200]}"
    return make_sinkhorn(cfg.hc_sinkhorn_iters, cfg.hc_eps, fused=False), f"array ({why})"


def _wo_a_in(W: dict[str, mx.array], fmt: Fmt) -> int:
    """Input width of the packed grouped `wo_a` [G, r_o, in]."""
    if fmt[0] == "q":
        return W["wo_a.w"].shape[-1] * 32 // fmt[2]
    return W["wo_a"].shape[-1]
