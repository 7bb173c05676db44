"""Plot `bench_flash.py` CSVs (optionally against an earlier run) into one PNG.

Several CSVs (sections of one benchmark taken in separate runs) are merged; where two hold
the same row, the first one given wins.

    python tests/bench/plot_flash.py docs/bench_flash_h200_prefill_snapshot.csv \
        docs/bench_flash_h200_decode.csv docs/bench_flash_h200_paths.csv \
        docs/bench_flash_h200_peer.csv \
        --before docs/bench_flash_h200.csv --png docs/benchmarks.png
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

NAIVE_BASELINE = 12.0  # tok/s, perf.md §7 (naive compiled MLX step, H100, 43 layers)
TARGET = 36.0


def load(path: str) -> dict[tuple[str, str], float]:
    with open(path, encoding="utf-8") as f:
        return {(r["section"], r["name"]): float(r["value"]) for r in csv.DictReader(f)}


def series(rows: dict, section: str, prefix: str) -> tuple[list[int], list[float]]:
    pts = sorted(
        (int(name.split("@")[1]), v)
        for (sec, name), v in rows.items()
        if sec == section and name.startswith(prefix + "@")
    )
    return [p for p, _ in pts], [v for _, v in pts]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("csv", nargs="+")
    ap.add_argument("--before")
    ap.add_argument("--png", default="benchmarks.png")
    args = ap.parse_args()
    now: dict[tuple[str, str], float] = {}
    for path in args.csv:
        now = {**load(path), **now}
    fig, ax = plt.subplots(2, 2, figsize=(12, 8.5))

    a = ax[0][0]
    x, y = series(now, "decode", "tok_s")
    a.plot(x, y, "o-", label="this engine (fast decode step, bf16 numerics)")
    if args.before:
        xb, yb = series(load(args.before), "decode", "tok_s")
        a.plot(xb, yb, "s--", color="grey", label="before (reference path, official numerics)")
    a.axhline(NAIVE_BASELINE, color="tab:red", ls=":", label="naive baseline (perf.md §7)")
    a.axhline(TARGET, color="tab:green", ls=":", label="target 3× baseline")
    a.set_xscale("log", base=2)
    a.set_xlabel("context (tokens)")
    a.set_ylabel("decode tok/s")
    a.set_title("Whole-model decode, 43 layers, q2")
    a.legend(fontsize=8)

    a = ax[0][1]
    kinds = ["swa", "csa", "hca"]
    parts = [
        ("mHC (2 sites)", lambda k: 2 * now.get(("component", f"{k}_mhc_site"), 0)),
        ("compressor", lambda k: now.get(("component", f"{k}_compressor"), 0)),
        ("indexer", lambda k: now.get(("component", f"{k}_indexer"), 0)),
        (
            "attention (rest)",
            lambda k: (
                now.get(("component", f"{k}_attention_total"), 0)
                - now.get(("component", f"{k}_compressor"), 0)
                - now.get(("component", f"{k}_indexer"), 0)
            ),
        ),
        ("MoE", lambda k: now.get(("component", f"{k}_moe"), 0)),
    ]
    bottom = [0.0] * 3
    for label, fn in parts:
        vals = [fn(k) for k in kinds]
        a.bar([k.upper() for k in kinds], vals, bottom=bottom, label=label)
        bottom = [b + v for b, v in zip(bottom, vals, strict=True)]
    whole = [now.get(("layer", f"{k}_layer"), 0) for k in kinds]
    a.plot([k.upper() for k in kinds], whole, "kD", label="whole layer, reference path")
    fast = [now.get(("layer", f"{k}_layer_fast"), 0) for k in kinds]
    if any(fast):
        a.plot([k.upper() for k in kinds], fast, "r*", ms=12, label="whole layer, fast step")
    a.set_ylabel("ms (each part synchronised on its own)")
    a.set_title("Decode time per layer kind, ctx 1k")
    a.legend(fontsize=8)

    a = ax[1][0]
    xo, yo = series(now, "ours_slice", "prefill_tok_s")
    xp, yp = series(now, "peer", "prefill_tok_s")
    a.plot(xo, yo, "o-", label="this engine, 4 layers q2")
    a.plot(xp, yp, "s-", label="transformers bf16, 4 layers")
    a.set_yscale("log")
    a.set_xlabel("prompt tokens")
    a.set_ylabel("prefill tok/s")
    a.set_title("Prefill, same 4 layers (peer at 16k: 8k chunks via its cache)")
    a.legend(fontsize=8)

    a = ax[1][1]
    ctx = 65536
    vals = {
        "prefill (est.)": now.get(("prefill", f"estimated_s@{ctx}"), 0),
        "export+save": now.get(("snapshot", f"export@{ctx}"), 0)
        + now.get(("snapshot", f"save@{ctx}"), 0),
        "restore (load+import)": now.get(("snapshot", f"restore@{ctx}"), 0),
    }
    a.bar(list(vals), list(vals.values()), color=["tab:red", "tab:blue", "tab:green"])
    a.set_yscale("log")
    a.set_ylabel("seconds")
    a.set_title("64k tokens: snapshot vs prefill")
    fig.suptitle("DeepSeek V4 Flash shapes, random q2 weights, MLX on one NVIDIA H200")
    fig.tight_layout()
    out = Path(args.png)
    fig.savefig(out, dpi=110)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
