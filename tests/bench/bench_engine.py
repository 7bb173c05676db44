"""Benchmark the engine on the synthetic mid-size model (no checkpoint needed).

For each numerics mode and prefill chunk size: prefill `--ctx` random tokens (tokens/s), then
decode `--decode` tokens (tokens/s, weight bytes per token, achieved GB/s), peak memory.
Also the cost of a state export + import at that context. Prints a table and writes a CSV.

    python tests/bench/bench_engine.py [--ctx 512] [--decode 16] [--chunks 32 128 512]
        [--csv bench_engine.csv]
"""

from __future__ import annotations

import argparse
import csv
import time

import mlx.core as mx
import numpy as np
from ds4_agent.engine.generate import Engine
from ds4_agent.engine.synthetic import active_weight_bytes, synthetic_config, synthetic_weights


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--decode", type=int, default=16)
    ap.add_argument("--chunks", type=int, nargs="+", default=[32, 128, 512])
    ap.add_argument("--csv", default="bench_engine.csv")
    args = ap.parse_args()

    cfg = synthetic_config("mid")
    weights = synthetic_weights(cfg, seed=0)
    ids = [int(t) for t in np.random.default_rng(0).integers(2, cfg.vocab_size, size=args.ctx)]
    rows = []
    print(f"device {mx.default_device()}, synthetic mid, ctx {args.ctx}")
    hdr = f"{'numerics':>9} {'chunk':>6} {'prefill t/s':>12} {'decode t/s':>11} {'GB/s':>7}"
    print(hdr + f" {'export+import s':>16} {'peak MiB':>9}")
    for numerics in ("official", "exact"):
        eng = Engine(cfg, weights, numerics)
        wbytes = active_weight_bytes(cfg, eng.model.w)
        for chunk in args.chunks:
            mx.reset_peak_memory()
            st = eng.new_state()
            t0 = time.perf_counter()
            logits = eng.prefill(st, ids, chunk_size=chunk)
            t1 = time.perf_counter()
            for _ in range(args.decode):
                logits = eng.decode(st, int(np.argmax(np.asarray(logits))))
            t2 = time.perf_counter()
            eng.import_state(st.export())
            t3 = time.perf_counter()
            dec = args.decode / (t2 - t1) if args.decode else 0.0
            row = {
                "numerics": numerics,
                "chunk": chunk,
                "ctx": args.ctx,
                "prefill_tok_s": round(args.ctx / (t1 - t0), 2),
                "decode_tok_s": round(dec, 2),
                "weight_bytes_per_token": wbytes,
                "achieved_gb_s": round(wbytes * dec / 1e9, 3),
                "export_import_s": round(t3 - t2, 4),
                "peak_memory_bytes": int(mx.get_peak_memory()),
            }
            rows.append(row)
            print(
                f"{numerics:>9} {chunk:>6} {row['prefill_tok_s']:>12.1f} "
                f"{row['decode_tok_s']:>11.2f} {row['achieved_gb_s']:>7.3f} "
                f"{row['export_import_s']:>16.3f} {row['peak_memory_bytes'] / 2**20:>9.1f}"
            )
    with open(args.csv, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    print(f"wrote {args.csv}")


if __name__ == "__main__":
    main()
