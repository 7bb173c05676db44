"""Converter throughput: importance-weighted affine re-quantization of one Flash-sized expert
matrix (2048×4096) per bit width / group size, and the exact FP4 → mxfp4 mapping.

    python tests/bench/bench_convert.py [--out bench_convert.csv] [--repeats 3]

Prints one line per case and writes a CSV (case, bits, group, seconds, MB/s of float32 input,
weighted rel. error). Multiply the 2-bit time by 256 experts × 3 projections × 44 layers for a
full q2 conversion estimate on this machine.
"""

from __future__ import annotations

import argparse
import csv
import time

import mlx.core as mx
import numpy as np
from ds4_agent.engine import quant
from ds4_agent.engine.convert_quant import affine_quantize


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="bench_convert.csv")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    w = (rng.standard_normal((2048, 4096)) * 0.02).astype(np.float32)
    packed, scales = quant.fp4_row_quantize(w)
    wf = quant.fp4_row_dequantize(packed, scales)
    rows = []
    for bits, group, search in [(2, 64, True), (2, 64, False), (3, 64, True), (8, 64, True)]:
        best = float("inf")
        err = 0.0
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            r = affine_quantize(mx.array(wf), bits, group, search=search)
            best = min(best, time.perf_counter() - t0)
            err = (r.wsq_err / r.wsq_ref) ** 0.5
        case = f"affine{bits}-g{group}{'' if search else '-rtn'}"
        rows.append([case, bits, group, best, wf.nbytes / best / 1e6, err])
    t0 = time.perf_counter()
    for _ in range(args.repeats):
        mx.eval(mx.array(packed.view(np.uint32)), mx.array(scales))
    dt = (time.perf_counter() - t0) / args.repeats
    rows.append(["mxfp4-map", 4, 32, dt, wf.nbytes / dt / 1e6, 0.0])
    for row in rows:
        print(f"{row[0]:<16} {row[3] * 1e3:8.1f} ms  {row[4]:8.0f} MB/s  err {row[5]:.4f}")
    with open(args.out, "w", newline="") as f:
        out = csv.writer(f)
        out.writerow(["case", "bits", "group", "seconds", "mb_per_s", "weighted_rel_err"])
        out.writerows(rows)


if __name__ == "__main__":
    main()
