"""Real-scale benchmark: DeepSeek V4 Flash shapes, random weights in a converted tier, on the
default MLX device (meant for an NVIDIA GPU through mlx-cuda; `--shape mid` runs on a CPU).

One run measures, and writes to `--out` (CSV rows `section,name,value,unit,note` + a JSON copy):
- ceilings: device copy bandwidth (bytes read + written) and the bf16 matmul rate;
- decode tokens/s at each `--decode-ctx` (the state is synthesised at that length: decode cost
  depends on row counts, not on how the rows were computed), weight bytes per token, GB/s —
  for each `--decode-path` (`fast`: the compiled single-token step, section `decode`;
  `reference`: the general chunk path, section `decode_reference`);
- prefill tokens/s and achieved TFLOP/s: from empty up to each `--prefill` length in
  `--chunk`-token chunks, plus one chunk on top of a synthesised `--far-ctx` state (the rate
  at that depth, used to estimate a prefill of that many tokens);
- per layer kind (SWA, CSA, HCA) and per component (mHC, attention, compressor, indexer, MoE)
  decode time, each synchronised on its own (so they include one launch/sync gap each);
- primitives per decoded token (from the lazy graph, `mx.export_to_dot`), per decode path, in
  total and per layer kind (the fast path also for the step that completes a compressor
  window);
- snapshot export + save and load + import at `--far-ctx`, against the prefill estimate;
- optionally (`--peer-layers N`) the same first N layers through transformers'
  DeepseekV4ForCausalLM in bf16 on the same GPU, against this engine on the same N layers.

    python tests/bench/bench_flash.py --tier q2 --layers 43 --out DIR
    python tests/bench/bench_flash.py --shape mid --layers 5 --out DIR   # CPU smoke
"""

from __future__ import annotations

import argparse
import csv
import gc
import io
import json
import statistics
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import mlx.core as mx
import numpy as np
from ds4_agent.engine.config import ModelConfig
from ds4_agent.engine.generate import Engine
from ds4_agent.engine.state_export import LayerExport, StateExport
from ds4_agent.engine.synthetic import (
    active_weight_bytes,
    flash_config,
    synthetic_config,
    tier_weights,
)
from ds4_agent.sessions.snapshot_synth import SynthConfig, index_rows, kv_rows
from ds4_agent.sessions.snapshots import SnapshotStore

ROWS: list[dict] = []
OUT: list[Path] = []  # where record() keeps the CSV current (a killed run still leaves it)
KIND = {0: "swa", 4: "csa", 128: "hca"}
VIEW_OPS = {"Broadcast", "Reshape", "Squeeze", "ExpandDims", "Transpose", "Slice", "AsStrided"}


def record(section: str, name: str, value: float, unit: str, note: str = "") -> None:
    ROWS.append({"section": section, "name": name, "value": value, "unit": unit, "note": note})
    print(f"{section:>9} {name:<34} {value:>14.4g} {unit:<8} {note}", flush=True)
    if OUT:
        _write_csv(OUT[0])


def sync_time(fn, reps: int = 5, warm: int = 2) -> float:
    """Median seconds of fn() (which must return arrays to evaluate) over `reps` runs."""
    for _ in range(warm):
        mx.eval(fn())
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        mx.eval(fn())
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


# ------------------------------------------------------------------------------ ceilings


def ceilings(small: bool) -> dict[str, float]:
    n = (1 << 20) if small else (1 << 30)  # bf16 elements: 2 GiB on the GPU
    x = mx.random.normal((n,)).astype(mx.bfloat16)
    mx.eval(x)
    t = sync_time(lambda: x + 1, reps=10)
    bw = 2 * x.nbytes / t
    record("ceiling", "copy_bandwidth", bw / 1e9, "GB/s", "x+1 over 2 GiB bf16, read+write")
    m = 1024 if small else 8192
    a = mx.random.normal((m, m)).astype(mx.bfloat16)
    b = mx.random.normal((m, m)).astype(mx.bfloat16)
    mx.eval(a, b)
    t = sync_time(lambda: a @ b, reps=10)
    rate = 2 * m**3 / t
    record("ceiling", "bf16_matmul", rate / 1e12, "TFLOP/s", f"{m}^3 random bf16")
    mx.clear_cache()
    return {"bw": bw, "tflops": rate}


# ------------------------------------------------------------------------------ FLOPs


def matmul_params_per_token(cfg: ModelConfig) -> float:
    """Weights one token multiplies by (k of n experts, no embedding): FLOPs = 2 × this."""
    d, h, hd, q = cfg.hidden_size, cfg.num_attention_heads, cfg.head_dim, cfg.q_lora_rank
    inter, k = cfg.moe_intermediate_size, cfg.num_experts_per_tok
    hc, mix = cfg.hc_mult, (2 + cfg.hc_mult) * cfg.hc_mult
    di, hi = cfg.index_head_dim, cfg.index_n_heads
    total = d * cfg.vocab_size + hc * d * hc
    for r in cfg.ratios:
        total += (
            q * d + h * hd * q + hd * d + cfg.o_groups * cfg.o_lora_rank * (h * hd // cfg.o_groups)
        )
        total += d * cfg.o_groups * cfg.o_lora_rank
        total += 2 * mix * hc * d + cfg.n_routed_experts * d + (k + 1) * 3 * d * inter
        if r:
            total += 2 * (2 * hd if r == 4 else hd) * d
        if r == 4:
            total += hi * di * q + hi * d + 2 * 2 * di * d
    return float(total)


def attention_flops(cfg: ModelConfig, pos: int) -> float:
    """Score + value FLOPs of one query at position `pos` (all layers)."""
    h, hd, w = cfg.num_attention_heads, cfg.head_dim, cfg.sliding_window
    f = 0.0
    for r in cfg.ratios:
        keys = min(pos + 1, w)
        if r == 4:
            n = (pos + 1) // 4
            keys += min(n, cfg.index_topk)
            f += 2 * cfg.index_n_heads * cfg.index_head_dim * n  # indexer scoring
        elif r == 128:
            keys += (pos + 1) // 128
        f += 4 * h * hd * keys
    return f


def chunk_flops(cfg: ModelConfig, start: int, n: int) -> float:
    mid = start + n // 2
    return n * (2 * matmul_params_per_token(cfg) + attention_flops(cfg, mid))


# ------------------------------------------------------------------------------ states


def synthetic_state(engine: Engine, n_tokens: int, seed: int = 0):
    """A decode state of `n_tokens` with random rows (shapes exactly as a prefill leaves them).

    Outside `exact` numerics the rows lie on the FP8 / FP4 / BF16 grids a real prefill leaves
    (so the snapshot store meets the same compact encoding), and the compressor frontiers hold
    data only in the slots a real state at this length fills (the rest canonical 0 / −inf)."""
    cfg = engine.config
    rng = np.random.default_rng(seed)
    hd, di, w = cfg.head_dim, cfg.index_head_dim, cfg.sliding_window
    scfg = SynthConfig(
        ratios=tuple(cfg.ratios),
        head_dim=hd,
        rope_dim=cfg.qk_rope_head_dim,
        index_dim=di,
        window=w,
        vocab=cfg.vocab_size,
    )
    rounding = "official" if engine.numerics != "exact" else "exact"

    def rnd(*shape):
        return rng.standard_normal(shape, dtype=np.float32)

    def frontier(slots: int, width: int, filled: range) -> tuple[np.ndarray, np.ndarray]:
        kv = np.zeros((slots, width), np.float32)
        sc = np.full((slots, width), -np.inf, np.float32)
        for i in filled:
            kv[i], sc[i] = rnd(width), rnd(width)
        return kv, sc

    layers = []
    for r in cfg.ratios:
        front = {}
        if r == 4:
            # slots 0..3: the previous complete window; 4..: the current window's rows so far
            filled = range(0, 4 + n_tokens % 4) if n_tokens >= 4 else range(4, 4 + n_tokens)
            for p, width in (("", 2 * hd), ("idx_", 2 * di)):
                front[p + "kv_state"], front[p + "score_state"] = frontier(8, width, filled)
        elif r == 128:
            front["kv_state"], front["score_state"] = frontier(128, hd, range(n_tokens % 128))
        layers.append(
            LayerExport(
                kind=KIND[r],
                ratio=r,
                raw=kv_rows(rng, min(n_tokens, w), scfg, rounding),
                comp=kv_rows(rng, n_tokens // r, scfg, rounding) if r else None,
                index=index_rows(rng, n_tokens // 4, scfg, rounding) if r == 4 else None,
                frontiers=front,
            )
        )
    ex = StateExport(
        n_tokens=n_tokens,
        tokens=rng.integers(2, cfg.vocab_size, size=n_tokens).astype(np.int32),
        layers=layers,
        numerics=engine.numerics,
        logits=rnd(cfg.vocab_size),
    )
    return engine.import_state(ex)


# ------------------------------------------------------------------------------ decode


def _section(path: str) -> str:
    return "decode" if path == "fast" else f"decode_{path}"


def bench_decode(
    engine: Engine,
    ctx: int,
    steps: int,
    wbytes: int,
    bw: float,
    path: str = "fast",
    section: str | None = None,
) -> float:
    engine.decode_path = path
    st = synthetic_state(engine, ctx)
    tok = 5
    # 8 warm-up tokens: they cross a ratio-4 window twice, so the fast path's "completes a
    # window" variants and the grown row blocks (a synthesised state's blocks are full) are
    # compiled before timing.
    for i in range(8):
        engine.decode(st, tok + i)
    # Three timed rounds; the median is reported (the lent machines' host CPUs make single
    # rounds of a host-sensitive step vary by tens of percent), the rounds in the note.
    rounds = []
    for _ in range(3):
        t0 = time.perf_counter()
        for i in range(steps):
            lg = engine.decode(st, tok + i)
        mx.eval(lg)
        rounds.append((time.perf_counter() - t0) / steps)
    dt = statistics.median(rounds)
    tps = 1 / dt
    sec = section or _section(path)
    each = ", ".join(f"{1 / r:.1f}" for r in rounds)
    record(
        sec,
        f"tok_s@{ctx}",
        tps,
        "tok/s",
        f"{dt * 1e3:.2f} ms/token, median of 3 rounds of {steps} tokens ({each} tok/s), {path}",
    )
    record(
        sec,
        f"weight_GB_s@{ctx}",
        wbytes * tps / 1e9,
        "GB/s",
        f"{100 * wbytes * tps / bw:.1f}% of copy bandwidth",
    )
    del st
    return tps


def bench_decode_async(engine: Engine, ctx: int, steps: int, path: str = "fast") -> float:
    """Teacher-forced decode with the next step's graph built while the GPU runs the current
    one (`mx.async_eval`, the mlx-lm pattern): what asynchronous evaluation would buy."""
    st = synthetic_state(engine, ctx)
    model = engine.model

    def step(tok: int) -> mx.array:
        if path == "fast":
            lg = engine.fast_decoder.step(st, tok)
        else:
            lg = model.forward(st, [tok])
        st.tokens.append(tok)
        mx.async_eval(lg, *st.arrays())
        return lg

    for i in range(8):
        mx.eval(step(5 + i))
    t0 = time.perf_counter()
    for i in range(steps):
        lg = step(13 + i)
    mx.eval(lg)
    dt = (time.perf_counter() - t0) / steps
    record(
        _section(path),
        f"async_tok_s@{ctx}",
        1 / dt,
        "tok/s",
        f"{dt * 1e3:.2f} ms/token, async_eval, {path}",
    )
    return 1 / dt


def _kernels(*arrays: mx.array) -> list[str]:
    """Primitives of the lazy graph behind `arrays`, views excluded (what launches kernels)."""
    f = io.StringIO()
    mx.export_to_dot(f, *arrays)
    labels = [
        ln.split('label ="')[1].split('"')[0]
        for ln in f.getvalue().splitlines()
        if "shape=rectangle" in ln
    ]
    return labels


@contextmanager
def one_launch_sinkhorn(engine: Engine):
    """Count what is one launch on CUDA as one launch on backends that run array expressions
    instead (the CPU), so CPU counts predict GPU counts: the mHC Sinkhorn (engine/fused.py,
    ~80 ops as arrays), and in the fast path `mx.fast.rms_norm` (3 ops on the CPU) and the
    verified FP8/FP4 rounding kernels (engine/decode_kernels.py, ~12-15 ops as arrays)."""
    from ds4_agent.engine import decode_step
    from ds4_agent.engine.decode_kernels import Rounders
    from ds4_agent.engine.fused import use_cuda

    if use_cuda():
        yield "CUDA kernels as they run"
        return
    model = engine.model
    fd = engine.fast_decoder
    saved = model._sinkhorn, fd.sinkhorn, fd._fns, fd.rounders, decode_step._rms

    def one(x, *_):  # a single primitive standing in for a one-launch kernel
        return mx.negative(x)

    model._sinkhorn = fd.sinkhorn = lambda c: mx.softmax(c, axis=-1)
    fd.rounders = Rounders(one, one, "stand-in")
    decode_step._rms = lambda x, w, eps: one(x)
    fd._fns = {}
    try:
        yield "Sinkhorn, rms_norm and rounding kernels counted as one launch, as on CUDA"
    finally:
        model._sinkhorn, fd.sinkhorn, fd._fns, fd.rounders, decode_step._rms = saved


def count_ops(engine: Engine, ctx: int, paths: list[str]) -> None:
    cfg = engine.config
    n_layers = len(cfg.ratios)
    with one_launch_sinkhorn(engine) as how_all:
        for path in paths:
            how = how_all
            st = synthetic_state(engine, ctx).clone()
            if path == "fast":
                logits = engine.fast_decoder.step(st, 7)
            else:
                logits = engine.model.forward(st, [7])
            labels = _kernels(logits, *st.arrays())
            compute = [x for x in labels if x not in VIEW_OPS]
            sec = "ops" if path == "reference" else f"ops_{path}"
            if path == "reference" and "rms_norm" in how:  # only the Sinkhorn is shared
                how = "Sinkhorn counted as one launch, as on CUDA"
            record(sec, "primitives_per_token", len(labels), "ops", f"all graph nodes, {how}")
            record(
                sec,
                "kernels_per_token",
                len(compute),
                "ops",
                f"excluding views; {len(compute) / n_layers:.0f} per layer; {how}",
            )
            hist: dict[str, int] = {}
            for x in compute:
                hist[x] = hist.get(x, 0) + 1
            top = sorted(hist.items(), key=lambda kv: -kv[1])[:12]
            record(sec, "top_primitives", 0, "", "; ".join(f"{k} {v}" for k, v in top))
            del st
            _count_layers(engine, ctx, path, sec, how)


def _count_layers(engine: Engine, ctx: int, path: str, sec: str, how: str) -> None:
    """Kernels of one layer of each kind on its own (inputs evaluated first)."""
    cfg, model = engine.config, engine.model
    base = synthetic_state(engine, ctx)
    rng = np.random.default_rng(2)
    x = mx.array(rng.standard_normal((1, cfg.hc_mult, cfg.hidden_size), dtype=np.float32))
    seen = set()
    for i, r in enumerate(cfg.ratios):
        if KIND[r] in seen:
            continue
        seen.add(KIND[r])
        if path == "fast":
            fd = engine.fast_decoder
            for complete in (False, True) if r else (False,):
                st = base.clone()
                if complete:  # advance the position to the last token of a window
                    st.tokens += [5] * ((r - 1 - st.n_tokens % r) % r)
                T = fd.step_arrays(st, 9)
                mx.eval(T)
                ls = st.layers[i]
                S = {"raw": ls.raw, **ls.front}
                if ls.comp is not None:
                    S["comp"] = ls.comp.data
                if ls.index is not None:
                    S["index"] = ls.index.data
                y, S2 = fd.layer_fn(i, complete)(x, fd.layers[i][1], S, T)
                n = len([v for v in _kernels(y, *S2.values()) if v not in VIEW_OPS])
                name = f"{KIND[r]}_layer" + ("_completing_window" if complete else "")
                record(sec, name, n, "ops", f"layer {i}, ctx {ctx}; {how}")
        else:
            ctxo = model.make_ctx(ctx, [9], model.numerics)
            mx.eval(*[a for t in ctxo.rope.values() for a in t])
            ls = base.clone().layers[i]
            y = model.layer(x, ctxo, f"layers.{i}.", ls, r, cfg.is_hash_layer(i))
            arrs = [ls.raw, *ls.front.values()]
            arrs += [b.data for b in (ls.comp, ls.index) if b is not None]
            n = len([v for v in _kernels(y, *arrs) if v not in VIEW_OPS])
            record(sec, f"{KIND[r]}_layer", n, "ops", f"layer {i}, ctx {ctx}; {how}")


def profile_components(engine: Engine, ctx: int) -> None:
    """Decode-time cost of each layer kind and component, each evaluated on its own."""
    cfg = engine.config
    base = synthetic_state(engine, ctx)
    seen = set()
    for i, r in enumerate(cfg.ratios):
        if KIND[r] not in seen:
            seen.add(KIND[r])
            _profile_layer(engine, base, ctx, i, r)


def _profile_layer(engine: Engine, base, ctx: int, i: int, r: int) -> None:
    model, cfg = engine.model, engine.config
    rng = np.random.default_rng(1)
    x = mx.array(rng.standard_normal((1, cfg.hc_mult, cfg.hidden_size), dtype=np.float32))
    a0 = x[:, 0]
    tok = mx.array([11], dtype=mx.int32)
    hashed = cfg.is_hash_layer(i)
    p = f"layers.{i}."
    ctxo = model.make_ctx(ctx, [11], model.numerics)

    def fresh():
        return base.clone(copy_tokens=False).layers[i]

    t_layer = sync_time(lambda: model.layer(x, ctxo, p, fresh(), r, hashed))
    fd = engine.fast_decoder
    st = base.clone(copy_tokens=False)
    T = fd.step_arrays(st, 11)
    mx.eval(T)
    ls = st.layers[i]
    S = {"raw": ls.raw, **ls.front}
    S.update({k: b.data for k, b in (("comp", ls.comp), ("index", ls.index)) if b is not None})
    t_fast = sync_time(lambda: fd.layer_fn(i, False)(x, fd.layers[i][1], S, T))
    t_hc = sync_time(lambda: model.hc_post(a0, x, *model.hc_pre(x, p + "hc_attn")[1:]))
    t_attn = sync_time(
        lambda: model.attention(a0, ctxo, p + "attn.", fresh(), r, cfg.sliding_window)
    )
    t_moe = sync_time(lambda: model.moe(a0, tok, p + "ffn.", hashed))
    note = f"layer {i}, ctx {ctx}"
    record("layer", f"{KIND[r]}_layer", t_layer * 1e3, "ms", note + ", reference path")
    record("layer", f"{KIND[r]}_layer_fast", t_fast * 1e3, "ms", note + ", fast path")
    record("component", f"{KIND[r]}_mhc_site", t_hc * 1e3, "ms", note + " (x2 per layer)")
    record("component", f"{KIND[r]}_attention_total", t_attn * 1e3, "ms", note)
    record(
        "component", f"{KIND[r]}_moe", t_moe * 1e3, "ms", note + (" hash-routed" if hashed else "")
    )
    if r:
        t_c = sync_time(
            lambda: model._compress(
                a0, ctxo, p + "attn.compressor.", r, cfg.head_dim, dict(fresh().front), ""
            )
        )
        record("component", f"{KIND[r]}_compressor", t_c * 1e3, "ms", note)
    if r == 4:
        q_lat = mx.array(rng.standard_normal((1, cfg.q_lora_rank), dtype=np.float32))
        thr = np.array([(ctx + 1) // 4])
        ls = base.layers[i]
        t_i = sync_time(lambda: model.indexer(a0, q_lat, ctxo, p + "attn.", ls, thr))
        record("component", f"{KIND[r]}_indexer", t_i * 1e3, "ms", note + " (scoring+top-k)")


def check_sinkhorn(cfg: ModelConfig) -> None:
    """The fused Sinkhorn kernel against the array expression, on fresh random inputs."""
    from ds4_agent.engine.fused import make_sinkhorn, use_cuda

    if not use_cuda():
        record("check", "sinkhorn_fused", 0, "", "no CUDA: the engine runs the array expression")
        return
    fused = make_sinkhorn(cfg.hc_sinkhorn_iters, cfg.hc_eps, fused=True)
    ref = make_sinkhorn(cfg.hc_sinkhorn_iters, cfg.hc_eps, fused=False)
    worst = 0.0
    for seed, s in ((0, 1), (1, 7), (2, 2048)):
        c = mx.random.normal((s, cfg.hc_mult, cfg.hc_mult), key=mx.random.key(seed)) * 4
        a, b = fused(c), ref(c)
        worst = max(worst, float(mx.abs(a - b).max() / mx.abs(b).max()))
    record("check", "sinkhorn_fused_max_rel_err", worst, "", "vs array expression, float32")
    c = mx.random.normal((1, cfg.hc_mult, cfg.hc_mult))
    record(
        "check", "sinkhorn_fused_us", sync_time(lambda: fused(c), reps=50) * 1e6, "us", "one site"
    )
    record("check", "sinkhorn_ref_us", sync_time(lambda: ref(c), reps=50) * 1e6, "us", "one site")


# ------------------------------------------------------------------------------ prefill


def bench_prefill(engine: Engine, lengths: list[int], chunk: int, far: int, tflops: float):
    cfg = engine.config
    rng = np.random.default_rng(3)
    chunk_times: list[tuple[int, float]] = []  # (start, seconds per chunk)
    longest = max(lengths)
    # Warm-up: compile/JIT the chunk shapes once.
    st = engine.new_state()
    engine.prefill(st, [int(t) for t in rng.integers(2, cfg.vocab_size, size=chunk)], chunk)
    del st
    for n in sorted(lengths):
        ids = [int(t) for t in rng.integers(2, cfg.vocab_size, size=n)]
        st = engine.new_state()
        done, t_all, flops = 0, 0.0, 0.0
        while done < n:
            c = ids[done : done + chunk]
            t0 = time.perf_counter()
            engine.prefill(st, c, chunk_size=chunk)
            dt = time.perf_counter() - t0
            if n == longest:
                chunk_times.append((done, dt))
            flops += chunk_flops(cfg, done, len(c))
            t_all += dt
            done += len(c)
        record("prefill", f"tok_s@{n}", n / t_all, "tok/s", f"{t_all:.2f} s, chunk {chunk}")
        record(
            "prefill",
            f"TFLOP_s@{n}",
            flops / t_all / 1e12,
            "TFLOP/s",
            f"{100 * flops / t_all / tflops:.1f}% of measured bf16 matmul",
        )
        del st
        mx.clear_cache()
    far_dt = None
    if far:
        st = synthetic_state(engine, far - chunk)
        ids = [int(t) for t in rng.integers(2, cfg.vocab_size, size=chunk)]
        t0 = time.perf_counter()
        engine.prefill(st, ids, chunk_size=chunk)
        far_dt = time.perf_counter() - t0
        record(
            "prefill",
            f"chunk_tok_s@{far}",
            chunk / far_dt,
            "tok/s",
            f"one {chunk}-token chunk on top of a {far - chunk}-token state",
        )
        chunk_times.append((far - chunk, far_dt))
        del st
        mx.clear_cache()
    return chunk_times


def estimate_prefill(chunk_times: list[tuple[int, float]], total: int, chunk: int) -> float:
    xs = np.array([s for s, _ in chunk_times], dtype=np.float64)
    ys = np.array([t for _, t in chunk_times], dtype=np.float64)
    starts = np.arange(0, total, chunk, dtype=np.float64)
    return float(np.interp(starts, xs, ys).sum())


def bench_snapshot(engine: Engine, ctx: int, prefill_s: float | None) -> None:
    """Save the state at `ctx` tokens into the session snapshot store (compact segments,
    checksums, fsync + rename) and restore it into the engine, against the prefill time."""
    st = synthetic_state(engine, ctx)
    with tempfile.TemporaryDirectory() as d:
        store = SnapshotStore(Path(d) / "kv")
        # The codec's numba kernels are compiled on first use and then come from numba's
        # on-disk cache (an installed agent pays this once, not per restore): time that first
        # use separately, on a small state, before the measured save / restore.
        small = synthetic_state(engine, 2048)
        t0 = time.perf_counter()
        warm = store.save(small.export(), engine.fingerprint)
        store.load(warm, engine.fingerprint)
        record(
            "snapshot",
            "codec_first_use",
            time.perf_counter() - t0,
            "s",
            "save + load of a 2k-token state in a fresh process (codec compile or cache load)",
        )
        del small
        t0 = time.perf_counter()
        ex = st.export()
        t1 = time.perf_counter()
        ref = store.save(ex, engine.fingerprint)
        t2 = time.perf_counter()
        size = sum(f.stat().st_size for f in Path(d).rglob("*") if f.is_file())
        del ex
        t3 = time.perf_counter()
        ex2 = store.load(ref, engine.fingerprint)
        t4 = time.perf_counter()
        st2 = engine.import_state(ex2)
        t5 = time.perf_counter()
    record("snapshot", f"export@{ctx}", t1 - t0, "s", "device → numpy")
    record(
        "snapshot",
        f"save@{ctx}",
        t2 - t1,
        "s",
        f"snapshot store, {size / 1e6:.0f} MB on disk ({size / ctx:.0f} B/token), fsync + rename",
    )
    record("snapshot", f"load@{ctx}", t4 - t3, "s", "store → numpy, checksums verified (warm)")
    record("snapshot", f"import@{ctx}", t5 - t4, "s", "numpy → device state")
    restore = t5 - t3
    record("snapshot", f"restore@{ctx}", restore, "s", "load + import")
    if prefill_s:
        record(
            "snapshot",
            f"prefill_over_restore@{ctx}",
            prefill_s / restore,
            "x",
            f"prefill estimate {prefill_s:.1f} s",
        )
    del st, st2


# ------------------------------------------------------------------------------ peer


def peer(n_layers: int, lengths: list[int], decode_ctx: int, steps: int) -> None:
    import torch
    from ds4_agent.engine.convert_sizes import FLASH_CONFIG
    from transformers import DeepseekV4Config, DeepseekV4ForCausalLM

    data = dict(FLASH_CONFIG)
    data["num_hidden_layers"] = n_layers
    data["compress_ratios"] = list(FLASH_CONFIG["compress_ratios"][:n_layers]) + [0]
    data["num_nextn_predict_layers"] = 0
    cfg = DeepseekV4Config(**data)
    torch.set_default_dtype(torch.bfloat16)
    with torch.device("cuda"):
        model = DeepseekV4ForCausalLM(cfg).eval()
    torch.set_default_dtype(torch.float32)
    gen = torch.Generator(device="cuda").manual_seed(0)

    def ids(n):
        return torch.randint(2, 129000, (1, n), device="cuda", generator=gen)

    with torch.inference_mode():
        model(ids(256))
        out = model(ids(decode_ctx), use_cache=True, logits_to_keep=1)
        pkv = out.past_key_values
        nxt = ids(1)
        for _ in range(2):
            out = model(nxt, past_key_values=pkv, use_cache=True)
            pkv = out.past_key_values
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(steps):
            out = model(nxt, past_key_values=pkv, use_cache=True)
            pkv = out.past_key_values
        torch.cuda.synchronize()
        dt = (time.perf_counter() - t0) / steps
        record(
            "peer",
            f"decode_tok_s@{decode_ctx}",
            1 / dt,
            "tok/s",
            f"transformers bf16, {n_layers} layers, {dt * 1e3:.1f} ms/token",
        )
        for n in lengths:
            # One forward where it fits; else chunks of n/2, n/4 … through the model's cache
            # (its eager attention materialises [heads, chunk, keys] scores: 32 GiB at 16k).
            chunk = n
            while chunk >= 1024:
                try:
                    x = ids(n)
                    torch.cuda.synchronize()
                    t0 = time.perf_counter()
                    pkv = None
                    for a in range(0, n, chunk):
                        out = model(
                            x[:, a : a + chunk],
                            past_key_values=pkv,
                            use_cache=chunk < n,
                            logits_to_keep=1,
                        )
                        pkv = out.past_key_values if chunk < n else None
                    torch.cuda.synchronize()
                    dt = time.perf_counter() - t0
                    break
                except torch.OutOfMemoryError:
                    out = pkv = None
                    gc.collect()
                    torch.cuda.empty_cache()
                    chunk //= 2
            else:
                record("peer", f"prefill_tok_s@{n}", 0, "tok/s", "out of memory down to 1k chunks")
                continue
            how = "one forward" if chunk == n else f"{chunk}-token chunks with its cache"
            record(
                "peer",
                f"prefill_tok_s@{n}",
                n / dt,
                "tok/s",
                f"transformers bf16, {n_layers} layers, {how}",
            )
            out = pkv = None
            torch.cuda.empty_cache()
    del model
    gc.collect()
    torch.cuda.empty_cache()


# ------------------------------------------------------------------------------ main


def build(args, n_layers: int) -> tuple[Engine, int]:
    t0 = time.perf_counter()
    if args.shape == "mid":
        base = synthetic_config("mid").model_dump()
        base["num_hidden_layers"] = min(n_layers, 4)
        cfg = ModelConfig.from_dict(base, source="mid")
    else:
        cfg = flash_config(n_layers)
    weights = tier_weights(cfg, args.tier, seed=args.seed)
    paths = _paths(args)
    engine = Engine(
        cfg,
        weights,
        args.numerics,
        decode_path=paths[0],
        fuse_experts=args.fuse_experts,
        upcast_scales=args.upcast_scales,
    )
    del weights
    wbytes = active_weight_bytes(cfg, engine.model.w)
    total = sum(
        sum(
            a.nbytes
            for a in ((w.weight, w.scales, w.biases) if hasattr(w, "scales") else (w,))
            if a is not None
        )
        for w in engine.model.w.values()
    )
    record(
        "model",
        f"build_{n_layers}_layers",
        time.perf_counter() - t0,
        "s",
        f"{args.shape} {args.tier}, {total / 2**30:.1f} GiB resident",
    )
    record(
        "model",
        f"weight_bytes_per_token_{n_layers}",
        wbytes / 1e9,
        "GB",
        "as the engine reads them",
    )
    return engine, wbytes


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", choices=["flash", "mid"], default="flash")
    ap.add_argument("--tier", choices=["q2", "q4"], default="q2")
    ap.add_argument("--layers", type=int, default=43)
    ap.add_argument("--numerics", choices=["official", "exact", "bf16"], default="official")
    ap.add_argument(
        "--decode-path",
        choices=["fast", "reference", "both"],
        default="both",
        help="decode path(s) to time and count (fast: compiled single-token step)",
    )
    ap.add_argument(
        "--upcast-scales",
        action="store_true",
        help="store affine scales/biases float32 at load (no per-token cast of expert stacks)",
    )
    ap.add_argument(
        "--fuse-experts",
        action="store_true",
        help="stack routed w1|w3 at load so one gather computes both (fast path)",
    )
    ap.add_argument("--decode-ctx", type=int, nargs="*", default=[1024, 16384, 65536])
    ap.add_argument("--decode-steps", type=int, default=16)
    ap.add_argument("--prefill", type=int, nargs="*", default=[2048, 16384])
    ap.add_argument("--chunk", type=int, default=2048)
    ap.add_argument("--far-ctx", type=int, default=65536)
    ap.add_argument("--profile-ctx", type=int, default=1024)
    ap.add_argument("--peer-layers", type=int, default=0)
    ap.add_argument("--peer-prefill", type=int, nargs="*", default=[2048, 16384])
    ap.add_argument("--skip", nargs="*", default=[], help="sections to skip")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="bench_flash_out")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    OUT.append(out)
    record("machine", "device", 0, "", str(mx.default_device()))
    record("machine", "date", 0, "", time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()))
    try:
        _run(args, out)
    finally:
        _write(out, args)


def _run(args, out: Path) -> None:
    small = args.shape == "mid"
    ceil = ceilings(small)
    engine, wbytes = build(args, args.layers)
    chunk_times = []
    paths = _paths(args)
    if "decode" not in args.skip:
        for path in paths:
            # Warm-up: the first decode steps JIT-compile kernels for each new shape.
            engine.decode_path = path
            st = synthetic_state(engine, 1024)
            for i in range(12):
                engine.decode(st, 5 + i)
            del st
            for c in args.decode_ctx:
                bench_decode(engine, c, args.decode_steps, wbytes, ceil["bw"], path)
            if "async" not in args.skip:
                bench_decode_async(engine, args.decode_ctx[0], args.decode_steps, path)
            if path == "fast" and "async" not in args.skip:
                # The engine's own decode with the device started every layer
                # (DS4_DECODE_ASYNC_LAYERS=1): host graph building overlaps device work.
                fd = engine.fast_decoder
                saved, fd.async_layers = fd.async_layers, 1
                bench_decode(
                    engine,
                    args.decode_ctx[0],
                    args.decode_steps,
                    wbytes,
                    ceil["bw"],
                    path,
                    section="decode_async_layers",
                )
                fd.async_layers = saved
        engine.decode_path = paths[0]
    check_sinkhorn(engine.config)
    if "fast" in paths:
        fd = engine.fast_decoder
        record("check", "fast_path_sinkhorn", 0, "", fd.sinkhorn_how)
        record("check", "fast_path_rounding", 0, "", fd.rounders.how)
        record("check", "fast_path_rope", 0, "", fd.rope_how)
        record("check", "fast_path_wo_a", 0, "", fd.wo_a_how)
    if "ops" not in args.skip:
        count_ops(engine, args.profile_ctx, paths)
    if "profile" not in args.skip:
        profile_components(engine, args.profile_ctx)
    if "prefill" not in args.skip:
        chunk_times = bench_prefill(engine, args.prefill, args.chunk, args.far_ctx, ceil["tflops"])
    est = None
    if chunk_times and args.far_ctx:
        est = estimate_prefill(chunk_times, args.far_ctx, args.chunk)
        record(
            "prefill",
            f"estimated_s@{args.far_ctx}",
            est,
            "s",
            "sum of chunk times interpolated between measured chunk depths",
        )
    if "snapshot" not in args.skip and args.far_ctx:
        bench_snapshot(engine, args.far_ctx, est)
    _write(out, args)
    if args.peer_layers:
        del engine
        gc.collect()
        mx.clear_cache()
        eng_p, wb = build(args, args.peer_layers)
        for n in args.peer_prefill:
            rng = np.random.default_rng(5)
            ids = [int(t) for t in rng.integers(2, eng_p.config.vocab_size, size=n)]
            st = eng_p.new_state()
            eng_p.prefill(st, ids[: args.chunk], chunk_size=args.chunk)  # warm
            st = eng_p.new_state()
            t0 = time.perf_counter()
            eng_p.prefill(st, ids, chunk_size=args.chunk)
            dt = time.perf_counter() - t0
            record(
                "ours_slice",
                f"prefill_tok_s@{n}",
                n / dt,
                "tok/s",
                f"this engine, first {args.peer_layers} layers",
            )
            del st
        bench_decode(eng_p, args.profile_ctx, args.decode_steps, wb, ceil["bw"], paths[0])
        ROWS[-2]["section"] = ROWS[-1]["section"] = "ours_slice"
        del eng_p
        gc.collect()
        mx.clear_cache()
        _write(out, args)
        try:
            peer(args.peer_layers, args.peer_prefill, args.profile_ctx, args.decode_steps)
        except Exception as e:  # the peer is optional: report why it did not run
            record("peer", "error", 0, "", f"{type(e).__name__}: {str(e)[:300]}")


def _paths(args) -> list[str]:
    return ["fast", "reference"] if args.decode_path == "both" else [args.decode_path]


def _write_csv(out: Path) -> None:
    with open(out / "bench_flash.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=["section", "name", "value", "unit", "note"])
        w.writeheader()
        w.writerows(ROWS)


def _write(out: Path, args) -> None:
    _write_csv(out)
    (out / "bench_flash.json").write_text(json.dumps({"args": vars(args), "rows": ROWS}, indent=1))


if __name__ == "__main__":
    main()
