"""DeepSeek V4 Flash forward pass in MLX (engine-spec §2).

One function processes a chunk of S ≥ 1 consecutive tokens at absolute positions P..P+S-1
against a `DecodeState` and updates it; prefill (any chunking) and decode are the same code.
All shapes depend only on host integers (P, S, the row counts ⌊T/m⌋), so nothing inside the
layer loop synchronises with the device (no `.item()` / `.tolist()`).

Numerics modes (chosen at load, part of the fingerprint):
- `official` (default): what the official reference computes (§2.8) — the stored KV rows (raw
  window and compressed rows) are FP8 e4m3 round-tripped on their non-RoPE channels in blocks
  of 64 and BF16-rounded on their RoPE channels (the reference's cache dtype), and the
  indexer keys and queries are Hadamard-rotated then FP4 e2m1 round-tripped in blocks of 32.
  Selection by the lightning indexer is only the model's graph with this.
- `exact`: float32 everywhere, no rounding — the numerics of transformers'
  `DeepseekV4ForCausalLM`, which the tests compare against.
- `bf16`: `official`, plus bfloat16 inputs to every quantized matmul (projections and routed
  experts), as the reference feeds its FP8/FP4 GEMMs low-precision activations. Accumulation,
  norms, softmax, attention scores, mHC and the dense (float) weights stay float32. It is the
  fast mode on GPUs, where MLX's quantized kernels run 4–5× faster on bf16 inputs (measured on
  an H200, docs/benchmarks.md); its drift from `exact` is bounded in the tests.
Activations are float32 otherwise (weights may be bf16 / mxfp8 / mxfp4 / affine).

Weights are a dict keyed by official checkpoint names (`layers.3.attn.wq_a.weight`, …) with
values `mx.array | QuantizedTensor`; routed experts are stacked per projection
(`layers.L.ffn.experts.w1.weight`: [n_experts, out, in]).

Shape legend: S = chunk length, D = hidden, H = heads, hd = head_dim, R = rope dims,
hc = mHC streams, E = routed experts, k = experts per token, N = keys, W = window,
Hi/Di = indexer heads/dim, n = compressed rows so far.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import mlx.core as mx
import numpy as np
from ds4_agent.engine.config import ModelConfig
from ds4_agent.engine.fused import make_sinkhorn
from ds4_agent.engine.qtensor import QuantizedTensor, Weight
from ds4_agent.engine.quant import fp4_e2m1_roundtrip, fp8_e4m3_roundtrip, hadamard
from ds4_agent.engine.state import DecodeState, LayerState, ring_positions, ring_write

NUMERICS = ("official", "exact", "bf16")
_INDEX_TILE_ELEMS = 1 << 26

# --------------------------------------------------------------------------------------------
# Primitives
# --------------------------------------------------------------------------------------------


def linear(x: mx.array, w: Weight) -> mx.array:
    """x [..., in] · wᵀ, w [out, in] (plain or quantized) → [..., out] float32."""
    if isinstance(w, QuantizedTensor):
        if w.input_dtype is not None:
            x = x.astype(w.input_dtype)
        return mx.quantized_matmul(
            x,
            w.weight,
            w.scales,
            w.biases,
            transpose=True,
            group_size=w.group_size,
            bits=w.bits,
            mode=w.mode,
        ).astype(mx.float32)
    return (x @ w.T).astype(mx.float32)


def _rows(w: Weight, a: int, b: int) -> Weight:
    """Output rows a..b of a (possibly quantized) matrix."""
    if isinstance(w, QuantizedTensor):
        # `replace` keeps every other field (format, input dtype) as the whole matrix has it.
        biases = w.biases[a:b] if w.biases is not None else None
        return replace(w, weight=w.weight[a:b], scales=w.scales[a:b], biases=biases)
    return w[a:b]


def with_input_dtype(weights: dict[str, Weight], dtype: mx.Dtype) -> dict[str, Weight]:
    """A new dict whose quantized weights cast their matmul inputs to `dtype` (arrays shared)."""
    return {
        name: replace(w, input_dtype=dtype) if isinstance(w, QuantizedTensor) else w
        for name, w in weights.items()
    }


def embed_rows(w: Weight, ids: mx.array) -> mx.array:
    """Embedding lookup for int ids [S] → [S, D] float32."""
    if isinstance(w, QuantizedTensor):
        sub = QuantizedTensor(
            w.weight[ids],
            w.scales[ids],
            w.biases[ids] if w.biases is not None else None,
            w.mode,
            w.bits,
            w.group_size,
        )
        return sub.dequantize(mx.float32)
    return w[ids].astype(mx.float32)


def rms(x: mx.array, w: mx.array | None, eps: float) -> mx.array:
    """RMSNorm over the last axis (float32); unweighted when w is None."""
    x = x.astype(mx.float32)
    y = x * mx.rsqrt(mx.mean(x * x, axis=-1, keepdims=True) + eps)
    return y if w is None else y * w.astype(mx.float32)


def rope_tables(inv_freq: mx.array, positions: mx.array) -> tuple[mx.array, mx.array]:
    """positions [S] (float32) → cos, sin [S, R/2]. Angles in float32 like the reference."""
    ang = positions.astype(mx.float32)[:, None] * inv_freq[None, :]
    return mx.cos(ang), mx.sin(ang)


def rope_tail(x: mx.array, cos: mx.array, sin: mx.array, inverse: bool = False) -> mx.array:
    """Interleaved RoPE on the trailing R channels of x [S, ..., C]; cos/sin [S, R/2]."""
    half = cos.shape[-1]
    extra = x.ndim - 2
    c = cos.reshape(cos.shape[0], *([1] * extra), half)
    s = sin.reshape(sin.shape[0], *([1] * extra), half)
    if inverse:
        s = -s
    nope, r = x[..., : -2 * half], x[..., -2 * half :]
    r = r.reshape(*r.shape[:-1], half, 2)
    x0, x1 = r[..., 0], r[..., 1]
    y = mx.stack([x0 * c - x1 * s, x0 * s + x1 * c], axis=-1).reshape(*nope.shape[:-1], 2 * half)
    return mx.concatenate([nope, y], axis=-1)


def swiglu(g: mx.array, u: mx.array, limit: float) -> mx.array:
    g = mx.minimum(g, limit)
    u = mx.clip(u, -limit, limit)
    return g * mx.sigmoid(g) * u


# Each element-wise chain above as one fused launch per shape (bit-identical to the eager ops;
# on GPU backends every launch costs tens of µs, and these run ~10 times per layer).
rms = mx.compile(rms)
rope_tail = mx.compile(rope_tail)
swiglu = mx.compile(swiglu)


# --------------------------------------------------------------------------------------------
# Routed experts
# --------------------------------------------------------------------------------------------


def _gather_linear(x: mx.array, w: Weight, idx: mx.array, sorted_idx: bool) -> mx.array:
    """x [..., M, in] against experts idx [...] of stacked w [E, out, in] → [..., M, out]."""
    if isinstance(w, QuantizedTensor):
        if w.input_dtype is not None:
            x = x.astype(w.input_dtype)
        return mx.gather_qmm(
            x,
            w.weight,
            w.scales,
            w.biases,
            rhs_indices=idx,
            transpose=True,
            group_size=w.group_size,
            bits=w.bits,
            mode=w.mode,
            sorted_indices=sorted_idx,
        ).astype(mx.float32)
    x = x.astype(w.dtype)  # float experts may be bf16 (kept so to fit): cast the activations
    return mx.gather_mm(x, w.swapaxes(-1, -2), rhs_indices=idx, sorted_indices=sorted_idx).astype(
        mx.float32
    )


def _expert_block(pairs: int, n_experts: int, x_dtype: mx.Dtype) -> int:
    """Rows per expert block in the prefill layout: about the mean rows per expert, a power of
    two in [4, 32] (float32 inputs) or [4, 64] (bf16 inputs) — the best measured on an H200 at
    2,048 tokens × top-6 of 256 experts (docs/benchmarks.md)."""
    cap = 64 if x_dtype == mx.bfloat16 else 32
    mean = max(pairs / n_experts, 1.0)
    return int(min(cap, max(4, 2 ** round(math.log2(mean)))))


def routed_experts(
    x: mx.array, idx: mx.array, w1: Weight, w2: Weight, w3: Weight, limit: float
) -> mx.array:
    """x [S, D], idx [S, k] → per-selection expert outputs [S, k, D].

    Decode (S = 1) gathers the k experts of the one token directly. For S > 1 the (token,
    expert) pairs are laid out in blocks of B rows that each belong to one expert — every
    expert's pairs padded with zero rows to a multiple of B — so `gather_qmm` runs one
    B-row matmul per block instead of one 1-row matmul per pair (MLX's CUDA `gather_qmm`
    launches a GEMM per lhs matrix and ignores `sorted_indices`, ml-explore/mlx#4339: 12.7×
    faster at 2,048 tokens on an H200). The layout is computed on the device from the
    indices (no host round-trip); the padding bound E·(B−1) fixes the shapes. Each output row
    is the same dot products as before, so the result is unchanged.
    """
    s, k = idx.shape
    if s == 1:
        xe = x[:, None, None, :]  # [1, 1, 1, D]
        h = swiglu(
            _gather_linear(xe, w1, idx, False), _gather_linear(xe, w3, idx, False), limit
        )  # [1, k, 1, I]
        return _gather_linear(h, w2, idx, False)[:, :, 0, :]
    n_exp = w1.shape[0]
    pairs = s * k
    in_dtype = w1.input_dtype if isinstance(w1, QuantizedTensor) else None
    blk = _expert_block(pairs, n_exp, in_dtype or x.dtype)
    flat = idx.reshape(-1)  # [P]
    order = mx.argsort(flat)
    inv = mx.argsort(order)
    sidx = flat[order]  # expert of each sorted pair, non-decreasing
    counts = mx.zeros((n_exp,), dtype=mx.int32).at[flat].add(1)  # [E]
    padded = (counts + blk - 1) // blk * blk
    pad_end = mx.cumsum(padded)  # [E] end row of each expert's padded group
    first = mx.cumsum(counts) - counts  # [E] first sorted pair of each expert
    dest = (pad_end - padded)[sidx] + mx.arange(pairs) - first[sidx]  # [P] row in the layout
    n_blk = -(-(pairs + n_exp * (blk - 1)) // blk)
    # Expert of block b: the number of groups that end at or before row b·B (spare blocks past
    # the last group compute zeros against the last expert and are never read back).
    starts = mx.arange(n_blk, dtype=mx.int32) * blk
    blk_exp = mx.minimum((pad_end[None, :] <= starts[:, None]).sum(axis=1), n_exp - 1)
    blk_exp = blk_exp.astype(mx.uint32)  # [n_blk], non-decreasing
    xb = mx.zeros((n_blk * blk, x.shape[-1]), dtype=x.dtype)
    xb[dest] = x[order // k]
    xb = xb.reshape(n_blk, blk, -1)  # [n_blk, B, D]
    h = swiglu(
        _gather_linear(xb, w1, blk_exp, True), _gather_linear(xb, w3, blk_exp, True), limit
    )  # [n_blk, B, I]
    y = _gather_linear(h, w2, blk_exp, True).reshape(n_blk * blk, -1)  # [n_blk·B, D]
    return y[dest][inv].reshape(s, k, -1)


# --------------------------------------------------------------------------------------------
# Layers
# --------------------------------------------------------------------------------------------


@dataclass
class Ctx:
    """Per-chunk constants shared by all layers."""

    start: int  # absolute position of the chunk's first token
    length: int  # S
    tokens: mx.array  # int32 [S]
    pos: np.ndarray  # int64 [S] absolute positions (host)
    rope: dict[str, tuple[mx.array, mx.array]]  # "main"/"compress" → cos, sin [S, R/2]
    official: bool


class Model:
    """The DeepSeek V4 network over a weight dict; stateless apart from its weights."""

    def __init__(self, cfg: ModelConfig, weights: dict[str, Weight], numerics: str = "official"):
        if numerics not in NUMERICS:
            raise ValueError(f"numerics must be one of {NUMERICS}, got {numerics!r}")
        self.cfg = cfg
        self.w = with_input_dtype(weights, mx.bfloat16) if numerics == "bf16" else weights
        self.numerics = numerics
        self.inv_freq = {
            "main": mx.array(cfg.rope_inv_freq(False), dtype=mx.float32),
            "compress": mx.array(cfg.rope_inv_freq(True), dtype=mx.float32),
        }
        # ~80 tiny ops per mHC site: one hand-written launch on CUDA (engine/fused.py), the
        # compiled array expression elsewhere.
        self._sinkhorn = make_sinkhorn(cfg.hc_sinkhorn_iters, cfg.hc_eps)
        missing = [n for n in self._required_names() if n not in weights]
        if missing:
            raise KeyError(
                f"checkpoint lacks {len(missing)} tensors the config needs, e.g. {missing[0]!r}"
            )

    def _required_names(self) -> list[str]:
        names = ["embed.weight", "head.weight", "norm.weight", "hc_head_fn"]
        for i, r in enumerate(self.cfg.ratios):
            p = f"layers.{i}."
            names += [p + "attn.wq_a.weight", p + "attn.wkv.weight", p + "ffn.experts.w1.weight"]
            if r:
                names.append(p + "attn.compressor.wkv.weight")
            if r == 4:
                names.append(p + "attn.indexer.wq_b.weight")
            names.append(p + ("ffn.gate.tid2eid" if self.cfg.is_hash_layer(i) else "ffn.gate.bias"))
        return names

    # ------------------------------------------------------------------ mHC

    def _sinkhorn_impl(self, comb: mx.array) -> mx.array:
        """Softmax rows, then alternate column/row normalisation, ending on columns (§2.2)."""
        eps = self.cfg.hc_eps
        comb = mx.softmax(comb, axis=-1, precise=True) + eps
        comb = comb / (comb.sum(axis=-2, keepdims=True) + eps)
        for _ in range(self.cfg.hc_sinkhorn_iters - 1):
            comb = comb / (comb.sum(axis=-1, keepdims=True) + eps)
            comb = comb / (comb.sum(axis=-2, keepdims=True) + eps)
        return comb

    def hc_pre(self, x: mx.array, p: str) -> tuple[mx.array, mx.array, mx.array]:
        """x [S, hc, D] → block input a [S, D], post [S, hc], comb [S, hc, hc] (§2.2)."""
        cfg, w = self.cfg, self.w
        hc = cfg.hc_mult
        s = x.shape[0]
        flat = rms(x.reshape(s, -1), None, cfg.rms_norm_eps)  # [S, hc·D]
        mix = flat @ w[p + "_fn"].astype(mx.float32).T  # [S, (2+hc)·hc]
        base = w[p + "_base"].astype(mx.float32)
        scale = w[p + "_scale"].astype(mx.float32)
        pre = mx.sigmoid(mix[:, :hc] * scale[0] + base[:hc]) + cfg.hc_eps
        post = 2 * mx.sigmoid(mix[:, hc : 2 * hc] * scale[1] + base[hc : 2 * hc])
        comb = mix[:, 2 * hc :].reshape(s, hc, hc) * scale[2] + base[2 * hc :].reshape(hc, hc)
        comb = self._sinkhorn(comb)
        a = (pre[:, :, None] * x).sum(axis=1)
        return a, post, comb

    @staticmethod
    def hc_post(o: mx.array, x: mx.array, post: mx.array, comb: mx.array) -> mx.array:
        """X'[k] = post_k·o + Σ_j comb[j,k]·X[j]; o [S, D], x [S, hc, D]."""
        return post[:, :, None] * o[:, None, :] + comb.swapaxes(-1, -2) @ x

    def hc_head(self, x: mx.array, p: str) -> mx.array:
        cfg, w = self.cfg, self.w
        s = x.shape[0]
        flat = rms(x.reshape(s, -1), None, cfg.rms_norm_eps)
        mix = flat @ w[p + "hc_head_fn"].astype(mx.float32).T  # [S, hc]
        pre = (
            mx.sigmoid(
                mix * w[p + "hc_head_scale"].astype(mx.float32)
                + w[p + "hc_head_base"].astype(mx.float32)
            )
            + cfg.hc_eps
        )
        return (pre[:, :, None] * x).sum(axis=1)

    # ------------------------------------------------------------------ compressor

    def _compress(
        self,
        x: mx.array,
        ctx: Ctx,
        p: str,
        ratio: int,
        width: int,
        front: dict[str, mx.array],
        fkey: str,
    ) -> mx.array | None:
        """Feed the chunk to one compressor; returns the newly completed rows [nw, width] (normed
        and RoPE'd, not yet rounded) or None, and updates the frontier in `front` (§2.4)."""
        w = self.w
        m = ratio
        overlap = ratio == 4
        cw = 2 * width if overlap else width  # projection width
        c = linear(x, w[p + "wkv.weight"])  # [S, cw]
        ape = w[p + "ape"].astype(mx.float32)  # [m, cw]
        ape_idx = mx.array((ctx.pos % m).astype(np.int32))
        g = linear(x, w[p + "wgate.weight"]) + ape[ape_idx]  # [S, cw]
        kv_f, sc_f = front[fkey + "kv_state"], front[fkey + "score_state"]
        cur0 = m if overlap else 0  # first slot of the current window
        r = ctx.start % m  # rows of the current window already in the frontier
        seq_kv = mx.concatenate([kv_f[cur0 : cur0 + r], c]) if r else c  # [r+S, cw]
        seq_g = mx.concatenate([sc_f[cur0 : cur0 + r], g]) if r else g
        total = r + ctx.length
        nw, rem = divmod(total, m)
        rows = None
        if nw:
            win_kv = seq_kv[: nw * m].reshape(nw, m, cw)
            win_g = seq_g[: nw * m].reshape(nw, m, cw)
            if overlap:
                # Row w pools the A-halves of window w-1 and the B-halves of window w (8 slots).
                prev_kv = mx.concatenate([kv_f[None, :m, :width], win_kv[:-1, :, :width]])
                prev_g = mx.concatenate([sc_f[None, :m, :width], win_g[:-1, :, :width]])
                slot_kv = mx.concatenate([prev_kv, win_kv[:, :, width:]], axis=1)  # [nw, 2m, w]
                slot_g = mx.concatenate([prev_g, win_g[:, :, width:]], axis=1)
            else:
                slot_kv, slot_g = win_kv, win_g  # [nw, m, width]
            pooled = (mx.softmax(slot_g, axis=1, precise=True) * slot_kv).sum(axis=1)
            rows = rms(pooled, w[p + "norm.weight"], self.cfg.rms_norm_eps)  # [nw, width]
            w0 = (ctx.start - r) // m
            wpos = mx.array(((w0 + np.arange(nw)) * m).astype(np.float32))
            cos, sin = rope_tables(self.inv_freq["compress"], wpos)
            rows = rope_tail(rows, cos, sin)
        # New frontier: current rows padded with (0, −inf); for CSA the last complete window
        # becomes the "previous" half.
        pad = m - rem
        cur_kv = seq_kv[nw * m :]
        cur_g = seq_g[nw * m :]
        if pad:
            cur_kv = mx.concatenate([cur_kv, mx.zeros((pad, cw), dtype=mx.float32)])
            cur_g = mx.concatenate([cur_g, mx.full((pad, cw), -mx.inf, dtype=mx.float32)])
        if overlap:
            prev_kv_full = win_kv[-1] if nw else kv_f[:m]
            prev_g_full = win_g[-1] if nw else sc_f[:m]
            cur_kv = mx.concatenate([prev_kv_full, cur_kv])
            cur_g = mx.concatenate([prev_g_full, cur_g])
        front[fkey + "kv_state"], front[fkey + "score_state"] = cur_kv, cur_g
        return rows

    def _round_kv(self, kv: mx.array, official: bool) -> mx.array:
        """Round KV rows [..., hd] as the official reference stores them.

        The reference keeps its KV cache in BF16 and FP8-simulates the non-RoPE channels, so
        the RoPE channels are BF16-rounded too. Matching that exactly is also what makes the
        compact snapshot encoding (e4m3 codes + e8m0 exponents + BF16 rope, 583 B/row) lossless.
        """
        if not official:
            return kv
        nd = self.cfg.nope_dim
        rope = kv[..., nd:].astype(mx.bfloat16).astype(kv.dtype)
        return mx.concatenate([fp8_e4m3_roundtrip(kv[..., :nd], 64), rope], axis=-1)

    @staticmethod
    def _round_index(v: mx.array, official: bool) -> mx.array:
        return fp4_e2m1_roundtrip(hadamard(v), 32) if official else v

    # ------------------------------------------------------------------ attention

    def attention(
        self, x: mx.array, ctx: Ctx, p: str, st: LayerState, ratio: int, window: int
    ) -> mx.array:
        """x [S, D] (attn-normed) → [S, D]; updates the layer state (§2.4)."""
        cfg, w = self.cfg, self.w
        s = ctx.length
        h, hd = cfg.num_attention_heads, cfg.head_dim
        eps = cfg.rms_norm_eps
        cos, sin = ctx.rope["compress" if ratio else "main"]

        q_lat = rms(linear(x, w[p + "wq_a.weight"]), w[p + "q_norm.weight"], eps)  # [S, q_lora]
        q = linear(q_lat, w[p + "wq_b.weight"]).reshape(s, h, hd)  # [S, H, hd]
        q = rope_tail(rms(q, None, eps), cos, sin)
        kv = rms(linear(x, w[p + "wkv.weight"]), w[p + "kv_norm.weight"], eps)  # [S, hd]
        kv = self._round_kv(rope_tail(kv, cos, sin), ctx.official)

        # Raw window: ring (positions before the chunk) + the chunk itself.
        ring_pos = st.raw_pos if st.raw_pos is not None else ring_positions(ctx.start, window)
        keys = mx.concatenate([st.raw, kv])  # [W+S, hd]
        # The [S, W+S] mask is built on the device from the two position vectors: built on the
        # host it cost 22 ms per layer for a 2,048-token chunk (H200), half the attention.
        key_pos = mx.array(np.concatenate([ring_pos, ctx.pos]).astype(np.int32))[None, :]
        t = mx.array(ctx.pos.astype(np.int32))[:, None]
        ok = (key_pos >= 0) & (key_pos <= t) & (key_pos > t - window)
        raw_bias = mx.where(ok, 0.0, -mx.inf)  # [S, W+S]
        st.raw = ring_write(st.raw, kv, ctx.start)
        if st.raw_pos is not None:
            st.raw_pos = st.raw_pos.copy()
            st.raw_pos[ctx.pos[-window:] % window] = ctx.pos[-window:]

        scale = 1.0 / math.sqrt(hd)
        scores = [(q.reshape(s * h, hd) @ keys.T).reshape(s, h, -1) * scale + raw_bias[:, None]]
        values = [keys]
        gathered = None
        if ratio:
            rows = self._compress(x, ctx, p + "compressor.", ratio, hd, st.front, "")
            if rows is not None:
                st.comp.append(self._round_kv(rows, ctx.official))
            if ratio == 4:  # the indexer's compressor sees every token, like the main one
                irows = self._compress(
                    x, ctx, p + "indexer.compressor.", 4, cfg.index_head_dim, st.front, "idx_"
                )
                if irows is not None:
                    st.index.append(self._round_index(irows, ctx.official))
            n = st.comp.n
            thr = (ctx.pos + 1) // ratio  # [S] visible rows: w < thr
            if n and ratio == 128:
                comp = st.comp.rows  # [n, hd]
                vis = mx.arange(n)[None, :] < mx.array(thr.astype(np.int32))[:, None]
                bias = mx.where(vis, 0.0, -mx.inf)  # [S, n], built on the device
                scores.append(
                    (q.reshape(s * h, hd) @ comp.T).reshape(s, h, n) * scale + bias[:, None]
                )
                values.append(comp)
            elif n and ratio == 4:
                idx, valid = self.indexer(x, q_lat, ctx, p, st, thr)  # [S, k]
                sel = st.comp.rows[idx]  # [S, k, hd]
                bias = mx.where(valid, 0.0, -mx.inf)  # [S, k]
                sc = (q @ sel.swapaxes(1, 2)) * scale + bias[:, None, :]  # [S, H, k]
                scores.append(sc)
                gathered = sel

        sink = w[p + "attn_sink"].astype(mx.float32)  # [H]
        sink_col = mx.broadcast_to(sink[None, :, None], (s, h, 1))
        logits = mx.concatenate([*scores, sink_col], axis=-1)
        probs = mx.softmax(logits, axis=-1, precise=True)  # [S, H, N+1]
        out = mx.zeros((s, h, hd), dtype=mx.float32)
        off = 0
        for i, sc in enumerate(scores):
            n_i = sc.shape[-1]
            pr = probs[:, :, off : off + n_i]
            if i == len(scores) - 1 and gathered is not None:
                out = out + pr @ gathered  # [S, H, k] @ [S, k, hd]
            else:
                out = out + (pr.reshape(s * h, n_i) @ values[i]).reshape(s, h, hd)
            off += n_i
        out = rope_tail(out, cos, sin, inverse=True)  # undo the rotation V carried

        # Grouped output projection: heads of group g → o_lora via wo_a rows of group g.
        g_n, r_o = cfg.o_groups, cfg.o_lora_rank
        og = out.reshape(s, g_n, (h // g_n) * hd)
        wo_a = w[p + "wo_a.weight"]
        u = mx.concatenate(
            [linear(og[:, g], _rows(wo_a, g * r_o, (g + 1) * r_o)) for g in range(g_n)], axis=-1
        )  # [S, G·o_lora]
        return linear(u, w[p + "wo_b.weight"])

    def indexer(
        self, x: mx.array, q_lat: mx.array, ctx: Ctx, p: str, st: LayerState, thr: np.ndarray
    ) -> tuple[mx.array, mx.array]:
        """Lightning indexer over the (already updated) index keys: score the visible rows and
        keep the top-k → (idx, valid) [S, k]; invalid picks (fewer visible than k) are masked."""
        cfg, w = self.cfg, self.w
        s = ctx.length
        hi, di = cfg.index_n_heads, cfg.index_head_dim
        n = st.index.n
        cos, sin = ctx.rope["compress"]
        qi = linear(q_lat, w[p + "indexer.wq_b.weight"]).reshape(s, hi, di)
        qi = self._round_index(rope_tail(qi, cos, sin), ctx.official)  # [S, Hi, Di]
        wts = linear(x, w[p + "indexer.weights_proj.weight"]) * (di**-0.5 * hi**-0.5)  # [S, Hi]
        keys = st.index.rows  # [n, Di]
        qf = qi.reshape(s * hi, di)
        thr_mx = mx.array(thr.astype(np.int32))
        k = min(cfg.index_topk, n)
        if k == n:  # every row is a candidate; invisible ones are masked below
            idx = mx.broadcast_to(mx.arange(n, dtype=mx.int32)[None], (s, n))
            return idx, idx < thr_mx[:, None]
        # Score the rows in tiles with a running top-k (spec §2.7): the [S, Hi, tile]
        # intermediate stays ≤ ~64M floats and nothing of size [S, n] is materialised (a
        # 2048-token chunk at 1M context would otherwise need 2048·64·262144 values).
        tile = max(1, _INDEX_TILE_ELEMS // (s * hi))
        best_v = best_i = None
        for a in range(0, n, tile):
            kt = keys[a : a + tile]
            m = kt.shape[0]
            dots = mx.maximum((qf @ kt.T).reshape(s, hi, m), 0.0)
            sc = (dots * wts[:, :, None]).sum(axis=1)  # [S, m]
            ids = mx.arange(a, a + m, dtype=mx.int32)
            sc = mx.where(ids[None, :] < thr_mx[:, None], sc, -mx.inf)  # visibility
            ids = mx.broadcast_to(ids[None], (s, m))
            if best_v is not None:
                sc = mx.concatenate([best_v, sc], axis=1)
                ids = mx.concatenate([best_i, ids], axis=1)
            if sc.shape[1] > k:
                sel = mx.argpartition(-sc, kth=k - 1, axis=-1)[:, :k]
                sc = mx.take_along_axis(sc, sel, axis=-1)
                ids = mx.take_along_axis(ids, sel, axis=-1)
            best_v, best_i = sc, ids
        idx = best_i
        valid = idx < thr_mx[:, None]
        return idx, valid

    # ------------------------------------------------------------------ MoE

    def moe(self, x: mx.array, tokens: mx.array, p: str, hashed: bool) -> mx.array:
        """x [S, D] (ffn-normed) → [S, D] (§2.5)."""
        cfg, w = self.cfg, self.w
        z = linear(x, w[p + "gate.weight"])  # [S, E]
        scores = mx.sqrt(mx.logaddexp(z, 0.0))  # sqrt(softplus)
        k = cfg.num_experts_per_tok
        if hashed:
            idx = w[p + "gate.tid2eid"][tokens].astype(mx.int32)  # [S, k]
        else:
            biased = scores + w[p + "gate.bias"].astype(mx.float32)
            idx = mx.argpartition(-biased, kth=k - 1, axis=-1)[:, :k].astype(mx.int32)
        wts = mx.take_along_axis(scores, idx, axis=-1)
        wts = wts / (wts.sum(axis=-1, keepdims=True) + 1e-20) * cfg.routed_scaling_factor
        y = routed_experts(
            x,
            idx,
            w[p + "experts.w1.weight"],
            w[p + "experts.w2.weight"],
            w[p + "experts.w3.weight"],
            cfg.swiglu_limit,
        )  # [S, k, D]
        routed = (y * wts[:, :, None]).sum(axis=1)
        sh = swiglu(
            linear(x, w[p + "shared_experts.w1.weight"]),
            linear(x, w[p + "shared_experts.w3.weight"]),
            cfg.swiglu_limit,
        )
        return routed + linear(sh, w[p + "shared_experts.w2.weight"])

    # ------------------------------------------------------------------ layers and model

    def layer(
        self, x: mx.array, ctx: Ctx, p: str, st: LayerState, ratio: int, hashed: bool
    ) -> mx.array:
        """One decoder layer on streams x [S, hc, D] (§2.3)."""
        cfg, w = self.cfg, self.w
        a, post, comb = self.hc_pre(x, p + "hc_attn")
        a = rms(a, w[p + "attn_norm.weight"], cfg.rms_norm_eps)
        x = self.hc_post(
            self.attention(a, ctx, p + "attn.", st, ratio, cfg.sliding_window), x, post, comb
        )
        a, post, comb = self.hc_pre(x, p + "hc_ffn")
        a = rms(a, w[p + "ffn_norm.weight"], cfg.rms_norm_eps)
        return self.hc_post(self.moe(a, ctx.tokens, p + "ffn.", hashed), x, post, comb)

    def make_ctx(self, start: int, tokens: list[int], numerics: str) -> Ctx:
        pos = np.arange(start, start + len(tokens), dtype=np.int64)
        posf = mx.array(pos.astype(np.float32))
        return Ctx(
            start=start,
            length=len(tokens),
            tokens=mx.array(np.asarray(tokens, dtype=np.int32)),
            pos=pos,
            rope={k: rope_tables(v, posf) for k, v in self.inv_freq.items()},
            official=numerics != "exact",
        )

    def forward(self, state: DecodeState, tokens: list[int], all_logits: bool = False) -> mx.array:
        """Run a chunk of tokens at positions state.n_tokens.. and update the layer state.

        The caller appends `tokens` to `state.tokens` once the results are evaluated
        (`Engine._advance`), which keeps a failed or interrupted chunk from half-updating it.

        Returns logits float32 [S, vocab] (all_logits) or [vocab] for the last token.
        """
        cfg, w = self.cfg, self.w
        if state.numerics != self.numerics:
            raise ValueError(
                f"state was built with numerics {state.numerics!r}, model runs {self.numerics!r}"
            )
        ctx = self.make_ctx(state.n_tokens, tokens, self.numerics)
        e = embed_rows(w["embed.weight"], ctx.tokens)  # [S, D]
        x = mx.broadcast_to(e[:, None, :], (ctx.length, cfg.hc_mult, cfg.hidden_size))
        for i, ratio in enumerate(cfg.ratios):
            x = self.layer(x, ctx, f"layers.{i}.", state.layers[i], ratio, cfg.is_hash_layer(i))
        state.last_streams = x[-1]
        hs = x if all_logits else x[-1:]
        y = rms(self.hc_head(hs, ""), w["norm.weight"], cfg.rms_norm_eps)
        logits = linear(y, w["head.weight"])  # [S or 1, vocab]
        state.logits = logits[-1]
        return logits if all_logits else logits[-1]

    # ------------------------------------------------------------------ MTP (§2.6)

    def has_mtp(self) -> bool:
        return "mtp.0.e_proj.weight" in self.w

    def mtp_step(
        self, streams: mx.array, token: int, position: int, mtp_state: LayerState
    ) -> tuple[mx.array, mx.array]:
        """One MTP draft step: main-model streams [hc, D] of position-1, the token at
        `position` → (draft logits [vocab] for position+1, the block's output streams [hc, D]).

        The pairing convention is the one ds4 uses (spec §2.6, open question 8: unverified).
        `mtp_state` holds the block's own raw window.
        """
        cfg, w = self.cfg, self.w
        p = "mtp.0."
        ctx = self.make_ctx(position, [token], self.numerics)
        e = rms(embed_rows(w["embed.weight"], ctx.tokens), w[p + "enorm.weight"], cfg.rms_norm_eps)
        hn = rms(streams[None], w[p + "hnorm.weight"], cfg.rms_norm_eps)  # [1, hc, D]
        x = linear(e, w[p + "e_proj.weight"])[:, None, :] + linear(hn, w[p + "h_proj.weight"])
        x = self.layer(x, ctx, p, mtp_state, 0, False)
        y = rms(self.hc_head(x, p), w[p + "norm.weight"], cfg.rms_norm_eps)
        return linear(y, w["head.weight"])[0], x[0]
