"""Benchmark the KV snapshot store at real DeepSeek V4 Flash shapes (synthetic state).

Prints, for T tokens (default 32,768): save time (cold store, every segment new), re-save time
(nothing new), restore time, bytes per token on disk, and restore bandwidth next to a plain
sequential read of the same files in the same run, both from the page cache ("warm") and with
the files dropped from it first ("cold", posix_fadvise DONTNEED; plain read and restore
alternate, best of --repeat each).

"Restore" is `SnapshotStore.load`: from the files on disk to the StateExport the engine
imports, every checksum verified before a byte is used, every row decoded to float32. The
plain read reads the same files start to end into a reused buffer and checks nothing. A
restore writes about 4x the bytes it reads (float32 rows from FP8/FP4 codes), so warm it is
bound by memory and CPU, not by the read; the CPU seconds are printed next to the times, with
the load average, because other processes on a small machine take cores from the decoders.
The warm bound is printed too: writing the restore's float32 output into fresh memory once,
with nothing read or decoded (about 3x the warm plain read), next to the warm restore. Cold
ratios are given for the best run of each and for the medians.

Then the fork experiment (a 10k-token session forked twice, +1k tokens each) with a breakdown
of what the forks added, and, with --prefill N, the prefill time of the tiny CPU test engine
(tests/tiny_model.py) for N tokens, scaled to T. Writes a CSV.

    python tests/bench/bench_snapshot.py [--tokens 32768] [--csv bench-snapshot.csv] [--prefill 256]
"""

from __future__ import annotations

import argparse
import csv
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from ds4_agent.sessions import codec
from ds4_agent.sessions.snapshot_format import MAGIC_SNAPSHOT, read_container
from ds4_agent.sessions.snapshot_synth import SynthConfig, exports_equal, synth_export
from ds4_agent.sessions.snapshots import SnapshotStore

FP = "bench-fingerprint"


def store_files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file() and p.suffix in (".snap", ".seg"))


def drop_cache(files: list[Path]) -> bool:
    if not hasattr(os, "posix_fadvise"):
        return False
    for p in files:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    return True


def plain_read(files: list[Path], reuse: bool = False) -> int:
    """Read every file start to end into a fresh buffer (the reference from the start), or
    into one reused buffer (`reuse`: a stronger bar, printed beside it); decode and check
    nothing."""
    total = 0
    shared = np.empty(max(p.stat().st_size for p in files), dtype=np.uint8) if reuse else None
    for p in files:
        size = p.stat().st_size
        buf = shared if shared is not None else np.empty(size, dtype=np.uint8)
        with open(p, "rb", buffering=0) as f:
            view = memoryview(buf)
            n = 0
            while n < size:
                n += f.readinto(view[n : min(size, n + (16 << 20))])
        total += size
    return total


def write_fresh(nbytes: int) -> None:
    """Write `nbytes` of float32 into freshly allocated memory: what a restore must do at
    least once for its output (page faults included), whatever it reads."""
    np.empty(nbytes // 4, dtype=np.float32).fill(1.0)


def best_of(fn, repeat: int) -> float:
    return timed(fn, repeat)[0]


def timed(fn, repeat: int) -> tuple[float, float]:
    """Best wall time and the CPU time of that run (all threads of this process)."""
    best = (float("inf"), 0.0)
    for _ in range(repeat):
        c0, t0 = time.process_time(), time.perf_counter()
        fn()
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        best = min(best, (wall, cpu))
    return best


def snapshot_parts(path: Path) -> dict[str, int]:
    """Bytes of a snapshot file by what they hold (section names: see sessions/store.py)."""
    c = read_container(path, MAGIC_SNAPSHOT)
    parts = {"raw windows": 0, "frontiers": 0, "rows after the last chunk": 0, "other": 0}
    for sec in c.header.sections:
        if ".f." in sec.name:
            key = "frontiers"
        elif sec.name.startswith("r"):
            key = "raw windows"
        elif sec.name.startswith("t") and sec.name != "tokens":
            key = "rows after the last chunk"
        else:
            key = "other"  # token ids, logits
        parts[key] += sec.nbytes
    parts["other"] += path.stat().st_size - sum(parts.values())  # header, padding
    return parts


def fork_rows(cfg: SynthConfig, ids: np.ndarray, args, base: Path, out) -> None:
    """A 10k-token session forked twice, each fork continued by 1k tokens."""
    fs = SnapshotStore(base / "forks", segment_tokens=args.segment_tokens)
    b_ids = ids[:10_000] if len(ids) >= 10_000 else np.resize(ids, 10_000)
    fs.save(synth_export(cfg, b_ids, args.numerics), FP)
    u0 = fs.usage()
    refs = []
    for seed in (1, 2):
        more = np.random.default_rng(seed).integers(2, cfg.vocab, 1000).astype(np.int32)
        refs.append(fs.save(synth_export(cfg, np.concatenate([b_ids, more]), args.numerics), FP))
    u2 = fs.usage()
    growth = u2.total_bytes - u0.total_bytes
    # A delta: the compact rows of 1,000 new tokens, at the store's segment bytes per token.
    delta = 1000 * u0.segment_bytes / (10_000 // 128 * 128)
    alone = SnapshotStore(base / "fork-alone", segment_tokens=args.segment_tokens)
    alone.save(synth_export(cfg, np.concatenate([b_ids, b_ids[:1000]]), args.numerics), FP)
    copy = alone.usage().total_bytes
    out("fork: 10k-token session", u0.total_bytes / 2**20, "MiB")
    out("fork: growth for 2 forks +1k each", growth / 2**20, "MiB")
    out("fork: two deltas (rows of 2 x 1k tokens)", 2 * delta / 2**20, "MiB")
    out(
        "fork: growth / two row deltas",
        growth / (2 * delta),
        "x",
        "each fork also writes its own end state (below), ~14 MiB at this length",
    )
    out("fork: two full copies would add", 2 * copy / 2**20, "MiB", "(2 x 11k-token store)")
    out("fork: new segment files", (u2.segment_bytes - u0.segment_bytes) / 2**20, "MiB")
    parts = {k: 0 for k in snapshot_parts(fs._snap_path(refs[0].id))}
    for r in refs:
        for k, v in snapshot_parts(fs._snap_path(r.id)).items():
            parts[k] += v
    for k, v in parts.items():
        out(f"fork: snapshot files, {k}", v / 2**20, "MiB", "both forks")
    fixed = parts["raw windows"] + parts["frontiers"] + parts["other"]
    out(
        "fork: growth / (deltas + fixed state)",
        growth / (2 * delta + fixed),
        "x",
        "fixed state: raw windows, frontiers, logits, token ids of each fork; 1 = only new data",
    )
    out("fork: growth / two full copies", growth / (2 * copy), "x", "what sharing saves")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, default=32768)
    ap.add_argument("--segment-tokens", type=int, default=1024)
    ap.add_argument("--numerics", choices=["official", "exact"], default="official")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--dir", help="where to put the store (default: a temp dir on the same disk)")
    ap.add_argument("--csv", default="bench-snapshot.csv")
    ap.add_argument("--prefill", type=int, default=0, metavar="N", help="also time the engine")
    ap.add_argument("--no-fork", action="store_true")
    args = ap.parse_args()

    cfg = SynthConfig()
    t = args.tokens
    rows: list[tuple[str, float, str]] = []

    def out(name: str, value: float, unit: str, note: str = "") -> None:
        rows.append((name, value, unit))
        print(f"{name:<38} {value:>12,.3f} {unit:<8} {note}")

    base = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="bench-snap-", dir="."))
    root = base / "store"
    try:
        print(f"synthetic Flash state: {len(cfg.ratios)} layers, head_dim {cfg.head_dim}, T={t:,}")
        print(
            f"codec: {codec.backend()}, {SnapshotStore(root).threads + 1} restore workers "
            f"(each reads, verifies and decodes whole segments), {os.cpu_count()} CPUs"
        )
        ids = np.random.default_rng(0).integers(2, cfg.vocab, t).astype(np.int32)
        ex = synth_export(cfg, ids, args.numerics)
        store = SnapshotStore(root, segment_tokens=args.segment_tokens)

        t0 = time.perf_counter()
        ref = store.save(ex, FP)
        out("save (all segments new)", time.perf_counter() - t0, "s")
        out("re-save (nothing new)", best_of(lambda: store.save(ex, FP), args.repeat), "s")
        usage = store.usage()
        out("bytes on disk", usage.total_bytes / 2**20, "MiB", f"{usage.n_segments} segments")
        out("bytes/token (all files)", usage.total_bytes / t, "B")
        out(
            "bytes/token (segments)",
            usage.segment_bytes / (t // args.segment_tokens * args.segment_tokens),
            "B",
        )
        out(
            "fixed part (snapshot file)",
            ref.bytes / 2**20,
            "MiB",
            "raw windows, frontiers, tail rows, logits",
        )
        f32 = sum(
            le.raw.nbytes
            + (le.comp.nbytes if le.comp is not None else 0)
            + (le.index.nbytes if le.index is not None else 0)
            for le in ex.layers
        )
        out("float32 rows (ds4-style)", f32 / t, "B/token")

        back = store.load(ref, FP)
        assert exports_equal(back, ex) is None, "round trip is not exact"
        files = store_files(root)
        nbytes = sum(p.stat().st_size for p in files)

        out_bytes = sum(
            le.raw.nbytes
            + sum(a.nbytes for a in (le.comp, le.index) if a is not None)
            + sum(v.nbytes for v in le.frontiers.values())
            for le in back.layers
        )
        del back
        warm_read, read_cpu = timed(lambda: plain_read(files), args.repeat)
        write_f32, _ = timed(lambda: write_fresh(out_bytes), args.repeat)
        warm_reuse, _ = timed(lambda: plain_read(files, reuse=True), args.repeat)
        warm_load, load_cpu = timed(lambda: store.load(ref, FP), args.repeat)
        out(
            "plain read, warm",
            nbytes / warm_read / 1e9,
            "GB/s",
            f"{warm_read:.3f} s, CPU {read_cpu:.3f} s",
        )
        out(
            "plain read, warm, reused buffer",
            nbytes / warm_reuse / 1e9,
            "GB/s",
            f"{warm_reuse:.3f} s; restore reaches {100 * warm_reuse / warm_load:.0f} % of it",
        )
        out(
            "restore, warm",
            nbytes / warm_load / 1e9,
            "GB/s",
            f"{warm_load:.3f} s, CPU {load_cpu:.3f} s",
        )
        out("restore/read bandwidth, warm", 100 * warm_read / warm_load, "%")
        out(
            "float32 output write (bound)",
            write_f32,
            "s",
            f"{out_bytes / 2**20:,.0f} MiB of fresh float32, the restore's output: "
            f"{write_f32 / warm_read:.1f}x the warm plain read",
        )
        out(
            "restore warm / float32 write bound",
            100 * write_f32 / warm_load,
            "%",
            "warm restore cannot beat writing its output",
        )
        out(
            "restore CPU throughput",
            nbytes / load_cpu / 1e9,
            "GB/s",
            "file bytes per CPU-second: above the cold read rate means disk-bound when idle",
        )
        vstore = SnapshotStore(root, segment_tokens=args.segment_tokens, verify_decoded=True)
        out(
            "restore + re-hash decoded rows, warm",
            best_of(lambda: vstore.load(ref, FP), args.repeat),
            "s",
        )
        if drop_cache(files):
            # Cold: the plain read and the restore alternate, each after dropping the files
            # from the page cache; best of --repeat each (other processes on a small machine
            # inflate single runs).
            cold_reads, cold_reuses, cold_loads = [], [], []
            cold_load = cold_cpu = float("inf")
            for _ in range(args.repeat):
                drop_cache(files)
                cold_reads.append(timed(lambda: plain_read(files), 1)[0])
                drop_cache(files)
                cold_reuses.append(timed(lambda: plain_read(files, reuse=True), 1)[0])
                drop_cache(files)
                wall, cpu = timed(lambda: store.load(ref, FP), 1)
                cold_loads.append(wall)
                if wall < cold_load:
                    cold_load, cold_cpu = wall, cpu
            cold_read, cold_reuse = min(cold_reads), min(cold_reuses)
            med_read, med_load = statistics.median(cold_reads), statistics.median(cold_loads)
            out("plain read, cold", nbytes / cold_read / 1e9, "GB/s", f"{cold_read:.3f} s")
            out(
                "plain read, cold, reused buffer",
                nbytes / cold_reuse / 1e9,
                "GB/s",
                f"{cold_reuse:.3f} s; restore reaches {100 * cold_reuse / cold_load:.0f} % of it",
            )
            out(
                "restore, cold",
                nbytes / cold_load / 1e9,
                "GB/s",
                f"{cold_load:.3f} s, CPU {cold_cpu:.3f} s",
            )
            out("restore/read bandwidth, cold", 100 * cold_read / cold_load, "%", "best of each")
            out(
                "restore/read bandwidth, cold, median",
                100 * med_read / med_load,
                "%",
                f"median of each: read {med_read:.3f} s, restore {med_load:.3f} s",
            )
            out(
                "restore gap to 70 % of plain read, cold",
                max(0.0, cold_load - cold_read / 0.7),
                "s",
                "0 = target met",
            )
        try:
            load1 = os.getloadavg()[0]
            out(
                "load average (1 min)",
                load1,
                "",
                f"on {os.cpu_count()} CPUs: wall times inflate above 1 per CPU",
            )
        except OSError:
            pass

        if not args.no_fork:
            fork_rows(cfg, ids, args, base, out)

        if args.prefill:
            sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
            import tiny_model as tm
            from ds4_agent.engine.generate import Engine

            model = tm.build_tiny_model("flash")
            eng = Engine.load(model, numerics=args.numerics)
            toks = tm.random_tokens(args.prefill, 512, seed=1)
            eng.prefill(eng.new_state(), toks[:64])  # warm up kernels
            state = eng.new_state()
            t0 = time.perf_counter()
            eng.prefill(state, toks, chunk_size=256)
            dt = time.perf_counter() - t0
            out(
                f"prefill tiny engine, {args.prefill} tok",
                dt,
                "s",
                f"{args.prefill / dt:.1f} tok/s",
            )
            out(
                "prefill scaled to T (linear)",
                dt * t / args.prefill,
                "s",
                "lower bound: attention grows",
            )
            st2 = SnapshotStore(base / "engine", segment_tokens=128)
            eref = st2.save(state.export(), eng.fingerprint)
            out(
                "tiny engine state restore",
                best_of(lambda: eng.import_state(st2.load(eref, eng.fingerprint)), args.repeat),
                "s",
            )
    finally:
        if not args.dir:
            shutil.rmtree(base, ignore_errors=True)

    with open(args.csv, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["metric", "value", "unit", "tokens"])
        for name, value, unit in rows:
            w.writerow([name, f"{value:.6g}", unit, t])
    print(f"wrote {args.csv}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
