"""Benchmark the tools on a synthetic repository: search (ripgrep vs the Python fallback), edit
matching on a large file, and shell output handling. Prints a table and writes a CSV.

    python tests/bench/bench_tools.py [--files 2000] [--csv bench-tools.csv]
"""

from __future__ import annotations

import argparse
import csv
import os
import statistics
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

from ds4_agent.tools import search
from ds4_agent.tools.context import ToolContext
from ds4_agent.tools.permissions import PermissionPolicy
from ds4_agent.tools.registry import ToolRegistry


def make_repo(root: Path, n_files: int) -> None:
    subprocess.run(["git", "init", "-q"], cwd=root, check=True)
    (root / ".gitignore").write_text("generated/\n")
    for i in range(n_files):
        d = root / ("generated" if i % 4 == 0 else f"src/pkg{i % 37}")
        d.mkdir(parents=True, exist_ok=True)
        body = "".join(
            f"def func_{i}_{k}(x):\n    return x + {k}  # value {i * k}\n" for k in range(100)
        )
        (d / f"mod_{i}.py").write_text(body)
    big = "".join(f"line {k}: some text with value {k * 7}\n" for k in range(20000))
    (root / "big.txt").write_text(big)


def timed(fn, repeat: int) -> tuple[float, float]:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), min(times)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--files", type=int, default=2000)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--csv", default="bench-tools.csv")
    args = ap.parse_args()
    rows: list[dict[str, object]] = []
    with tempfile.TemporaryDirectory() as d:
        root = Path(os.path.realpath(d))
        make_repo(root, args.files)
        reg = ToolRegistry.from_data(root, policy=PermissionPolicy(mode="full-auto", root=root))
        ctx = ToolContext()

        def call(name: str, **a):
            res = reg.call(name, a, ctx)
            assert not res.is_error, res.text[:300]
            return res

        for backend in ("rg", "python"):
            os.environ["DS4_AGENT_RG"] = "" if backend == "python" else (search.find_rg() or "")
            search.find_rg.cache_clear()
            if backend == "rg" and not search.find_rg():
                continue
            cases = {
                "grep files_with_matches": lambda: call("Grep", pattern=r"value 4242\b"),
                "grep content glob": lambda: call(
                    "Grep", pattern="func_7_9", glob="*.py", output_mode="content"
                ),
                "glob **/*.py": lambda: call("Glob", pattern="**/*.py"),
            }
            for name, fn in cases.items():
                med, best = timed(fn, args.repeat)
                rows.append(
                    {
                        "case": name,
                        "backend": backend,
                        "median_ms": round(med * 1000, 2),
                        "min_ms": round(best * 1000, 2),
                        "files": args.files,
                    }
                )
        os.environ.pop("DS4_AGENT_RG", None)
        search.find_rg.cache_clear()

        call("Read", file_path="big.txt")
        counter = iter(range(10**9))

        def edit_exact():
            k = next(counter)
            old = (
                f"line 10000: some text with value {70000 + k}"
                if k
                else "line 10000: some text with value 70000"
            )
            call(
                "Edit",
                file_path="big.txt",
                old_string=old,
                new_string=f"line 10000: some text with value {70000 + k + 1}",
            )

        def edit_miss():
            res = reg.call(
                "Edit",
                {
                    "file_path": "big.txt",
                    "old_string": "line 12345: some text with valeu 86415\nline 12346",
                    "new_string": "x",
                },
                ctx,
            )
            assert res.is_error and "Closest match" in res.text

        for name, fn in (
            ("edit exact 20k-line file", edit_exact),
            ("edit miss + closest match 20k lines", edit_miss),
        ):
            med, best = timed(fn, args.repeat)
            rows.append(
                {
                    "case": name,
                    "backend": "-",
                    "median_ms": round(med * 1000, 2),
                    "min_ms": round(best * 1000, 2),
                    "files": 1,
                }
            )

        med, best = timed(lambda: call("Bash", command="echo hi"), args.repeat)
        rows.append(
            {
                "case": "bash echo (spawn overhead)",
                "backend": "-",
                "median_ms": round(med * 1000, 2),
                "min_ms": round(best * 1000, 2),
                "files": 0,
            }
        )
        tracemalloc.start()
        t0 = time.perf_counter()
        reg.call(
            "Bash", {"command": "yes 0123456789abcdefghijklmnopqrstuvwxyz | head -c 104857600"}, ctx
        )
        dt = time.perf_counter() - t0
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        rows.append(
            {
                "case": f"bash 100 MiB output ({100 / dt:.0f} MiB/s, peak {peak / 2**20:.1f} MiB)",
                "backend": "-",
                "median_ms": round(dt * 1000, 2),
                "min_ms": round(dt * 1000, 2),
                "files": 0,
            }
        )
        reg.close()

    width = max(len(str(r["case"])) for r in rows)
    print(f"{'case':<{width}}  {'backend':<7}  {'median ms':>10}  {'min ms':>10}")
    for r in rows:
        print(f"{r['case']:<{width}}  {r['backend']:<7}  {r['median_ms']:>10}  {r['min_ms']:>10}")
    with open(args.csv, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    print(f"wrote {args.csv}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
