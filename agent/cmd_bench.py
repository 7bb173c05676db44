"""`ds4-agent bench`: prefill/decode speed, peak memory and achieved weight bandwidth.

    ds4-agent bench --model DIR [--ctx 512 4096 …] [--decode 32] [--chunk 256]
    ds4-agent bench --synthetic mid          # random mid-size model, no download (CI smoke)
    ds4-agent bench --synthetic flash --tier q2 [--layers N]   # real Flash shapes (GPU-sized)

For each context length: prefill that many random tokens (timed), then decode `--decode`
tokens (timed). "weights/token" counts the bytes one decoded token reads (all dense weights,
k of n routed experts, one embedding row); GB/s = that × decode tokens/s.
"""

from __future__ import annotations

import argparse
import csv
import io
import time

from ds4_agent.agent.cmd_common import add_numerics_option, fail
from ds4_agent.engine.atomic_io import PRIVATE_MODE, atomic_write_text

FIELDS = [
    "ctx",
    "prefill_tokens",
    "prefill_s",
    "prefill_tok_s",
    "decode_tokens",
    "decode_s",
    "decode_tok_s",
    "weight_bytes_per_token",
    "achieved_gb_s",
    "peak_memory_bytes",
]


def register(p: argparse.ArgumentParser) -> None:
    src = p.add_mutually_exclusive_group()
    src.add_argument("--model", metavar="DIR", help="model directory (official or converted)")
    src.add_argument(
        "--synthetic",
        choices=["mid", "flash"],
        metavar="SIZE",
        help="benchmark a random in-memory model instead (SIZE: mid, or flash = the real shapes)",
    )
    p.add_argument(
        "--tier", choices=["q2", "q4"], default="q2", help="--synthetic flash: converted tier"
    )
    p.add_argument(
        "--layers", type=int, metavar="N", help="--synthetic flash: first N layers (default all)"
    )
    p.add_argument("--ctx", type=int, nargs="+", default=[512], metavar="N", help="context lengths")
    p.add_argument("--decode", type=int, default=32, metavar="N", help="tokens to decode")
    p.add_argument("--chunk", type=int, default=256, metavar="N", help="prefill chunk size")
    add_numerics_option(p)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--csv", metavar="FILE", help="also write the results as CSV")
    p.set_defaults(func=cmd_bench)


def _write_csv(path: str, rows: list[dict]) -> None:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=FIELDS)
    w.writeheader()
    w.writerows(rows)
    # PRIVATE_MODE and no parent creation: as this file was always written.
    atomic_write_text(path, buf.getvalue(), mode=PRIVATE_MODE, parents=False)


def cmd_bench(args: argparse.Namespace) -> int:
    if not args.model and not args.synthetic:
        return fail("bench needs --model DIR or --synthetic mid|flash")
    if any(n <= 0 for n in args.ctx) or args.decode < 0 or args.chunk <= 0:
        return fail("--ctx and --chunk must be positive, --decode non-negative")
    import mlx.core as mx
    import numpy as np
    from ds4_agent.engine.config import ConfigError
    from ds4_agent.engine.generate import Engine
    from ds4_agent.engine.synthetic import (
        active_weight_bytes,
        flash_config,
        synthetic_config,
        synthetic_weights,
        tier_weights,
    )

    try:
        if args.synthetic == "flash":
            # Full tests/bench/bench_flash.py also measures components, kernels, snapshots.
            cfg = flash_config(args.layers)
            engine = Engine(cfg, tier_weights(cfg, args.tier, seed=args.seed), args.numerics)
            label = f"synthetic-flash-{args.tier}-{cfg.num_hidden_layers}L"
        elif args.synthetic:
            cfg = synthetic_config(args.synthetic)
            engine = Engine(cfg, synthetic_weights(cfg, seed=args.seed), args.numerics)
            label = f"synthetic-{args.synthetic}"
        else:
            engine = Engine.load(args.model, numerics=args.numerics)
            label = str(args.model)
    except (ValueError, ConfigError, FileNotFoundError, KeyError) as e:
        return fail(str(e).strip("'\""))
    cfg = engine.config
    wbytes = active_weight_bytes(cfg, engine.model.w)
    rng = np.random.default_rng(args.seed)
    rows = []
    print(f"bench {label} numerics={args.numerics} chunk={args.chunk}")
    print(
        f"{'ctx':>8} {'prefill tok/s':>14} {'decode tok/s':>13} "
        f"{'weights/token':>14} {'GB/s':>8} {'peak memory':>12}"
    )
    for ctx in args.ctx:
        ids = [int(t) for t in rng.integers(2, cfg.vocab_size, size=ctx)]
        mx.reset_peak_memory()
        state = engine.new_state()
        t0 = time.perf_counter()
        logits = engine.prefill(state, ids, chunk_size=args.chunk)
        t1 = time.perf_counter()
        for _ in range(args.decode):
            logits = engine.decode(state, int(np.argmax(np.asarray(logits))))
        t2 = time.perf_counter()
        peak = int(mx.get_peak_memory())
        p_s, d_s = t1 - t0, t2 - t1
        d_tps = args.decode / d_s if args.decode and d_s > 0 else 0.0
        row = {
            "ctx": ctx,
            "prefill_tokens": ctx,
            "prefill_s": round(p_s, 4),
            "prefill_tok_s": round(ctx / p_s, 2) if p_s > 0 else 0.0,
            "decode_tokens": args.decode,
            "decode_s": round(d_s, 4),
            "decode_tok_s": round(d_tps, 2),
            "weight_bytes_per_token": wbytes,
            "achieved_gb_s": round(wbytes * d_tps / 1e9, 3),
            "peak_memory_bytes": peak,
        }
        rows.append(row)
        print(
            f"{ctx:>8} {row['prefill_tok_s']:>14.1f} {row['decode_tok_s']:>13.2f} "
            f"{wbytes / 1e6:>12.1f}MB {row['achieved_gb_s']:>8.3f} {peak / 2**20:>10.1f}MiB"
        )
    if args.csv:
        _write_csv(args.csv, rows)
        print(f"wrote {args.csv}")
    return 0
