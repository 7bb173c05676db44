"""GGUF conversion numbers: dequantization throughput per ggml type, the exact MLX maps, and the
error added by re-quantizing ds4's 2-bit types into MLX affine formats.

    python tests/bench/bench_gguf.py [--rows 2048] [--cols 4096] [--csv out.csv]

One matrix of the real routed-expert shape (2048 × 4096 by default) per type. Blocks are random
valid blocks (`gguf_fixture.kquant_blocks`), the worst case for a re-quantizer: real weights are
smoother, so the errors printed are upper-end figures. The extrapolated time converts the
whole real file's routed experts (43 layers × 3 projections × 256 experts) at this speed.
"""

from __future__ import annotations

import argparse
import csv
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ds4_agent.engine import gguf_quants as gq  # noqa: E402
from gguf_fixture import kquant_blocks  # noqa: E402

N_EXPERT_MATRICES = 43 * 3 * 256


def _timed(fn, repeat: int = 3):
    best, out = float("inf"), None
    for _ in range(repeat):
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
    return best, out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=2048)
    ap.add_argument("--cols", type=int, default=4096)
    ap.add_argument("--csv", type=Path, default=Path("bench_gguf.csv"))
    args = ap.parse_args()
    shape = (args.rows, args.cols)
    rng = np.random.default_rng(0)
    rows = []

    def record(kind: str, qtype: str, target: str, seconds: float, rel: float | None) -> None:
        n = shape[0] * shape[1]
        row = {
            "kind": kind,
            "type": qtype,
            "target": target,
            "ms_per_matrix": round(seconds * 1e3, 2),
            "mvalues_per_s": round(n / seconds / 1e6, 1),
            "rel_error": "" if rel is None else f"{rel:.5f}",
            "experts_minutes": round(seconds * N_EXPERT_MATRICES / 60, 1),
        }
        rows.append(row)
        print(
            f"{kind:<12} {qtype:<8} → {target:<22} {row['ms_per_matrix']:>8} ms "
            f"{row['mvalues_per_s']:>8} Mval/s  rel.err {row['rel_error'] or '-':>8}  "
            f"all experts ≈ {row['experts_minutes']} min"
        )

    raws = {q: kquant_blocks(rng, q, shape) for q in ("Q4_K", "Q2_K", "IQ2_XXS")}
    import gguf

    f = (rng.standard_normal(shape) * 0.02).astype(np.float32)
    raws["Q8_0"] = gguf.quants.quantize(f, gguf.GGMLQuantizationType.Q8_0)
    for q, raw in raws.items():
        sec, _ = _timed(lambda q=q, raw=raw: gq.dequantize(raw, q, shape))
        record("dequantize", q, "float32", sec, None)
    sec, a = _timed(lambda: gq.q8_0_to_affine(raws["Q8_0"], shape))
    record("exact map", "Q8_0", "affine8 g32 fp16", sec, 0.0)
    for dt, name in ((np.float32, "fp32"), (np.float16, "fp16")):
        sec, a = _timed(lambda dt=dt: gq.q4_k_to_affine(raws["Q4_K"], shape, dt))
        st = gq.ErrorStats()
        st.add(gq.dequantize(raws["Q4_K"], "Q4_K", shape), gq.affine_dequantize(a))
        record(
            "exact map" if dt is np.float32 else "near map",
            "Q4_K",
            f"affine4 g32 {name}",
            sec,
            st.rel,
        )
    for q in ("IQ2_XXS", "Q2_K"):
        ref = gq.dequantize(raws[q], q, shape)
        for bits, group in ((2, 32), (2, 64), (3, 64), (4, 64)):
            sec, a = _timed(
                lambda bits=bits, group=group, ref=ref: gq.rtn_quantize(ref, bits, group), 1
            )
            st = gq.ErrorStats()
            st.add(ref, gq.affine_dequantize(a))
            record("requantize", q, f"affine{bits} g{group} fp16", sec, st.rel)
    with open(args.csv, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    print(f"wrote {args.csv}")


if __name__ == "__main__":
    main()
