"""`ds4-agent sessions gc`: clean the KV snapshot store and report what was removed.

Wired into the `sessions` command group with `register_gc(subparsers)`.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ds4_agent.sessions.snapshot_errors import SnapshotError
from ds4_agent.sessions.snapshot_model import GcReport


def register_gc(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "gc",
        help="clean the KV snapshot store: crash leftovers, damaged files, over-budget snapshots",
        description=(
            "Remove temp files of interrupted saves, unreferenced segments and damaged "
            "snapshots, then evict unpinned snapshots (least reused and least recent first) "
            "until the store fits --kv-disk-space-mb. Snapshots of named sessions are kept."
        ),
    )
    p.add_argument("--dir", metavar="DIR", help="snapshot store (default: the user cache dir)")
    p.add_argument(
        "--kv-disk-space-mb",
        type=int,
        metavar="N",
        help="disk budget in MiB; without it nothing is evicted, only garbage is removed",
    )
    p.add_argument(
        "--verify", action="store_true", help="read every file in full and drop damaged ones"
    )
    p.add_argument("--format", choices=["text", "json"], default="text")
    p.set_defaults(func=run_gc)
    return p


def _mb(n: int) -> str:
    return f"{n / 2**20:,.1f} MiB"


def format_report(report: GcReport, root: Path) -> str:
    lines = []
    for r in report.removed:
        why = {"budget": "over budget", "damaged": "damaged"}.get(r.reason, r.reason)
        lines.append(
            f"removed snapshot {r.id[:12]}  {r.n_tokens:>9,} tokens  {_mb(r.bytes):>12}  ({why})"
        )
    lines.append(
        f"removed {len(report.removed)} snapshots, {report.removed_segments} unreferenced segments, "
        f"{report.removed_temp_files} temp files; freed {_mb(report.freed_bytes)}"
    )
    budget = "no budget" if report.budget_bytes is None else f"budget {_mb(report.budget_bytes)}"
    lines.append(f"{root}: {_mb(report.usage_before)} → {_mb(report.usage_after)} ({budget})")
    if report.over_budget:
        lines.append(
            f"still over budget: {_mb(report.pinned_bytes)} belong to named sessions; remove "
            "sessions with `ds4-agent sessions rm` or raise --kv-disk-space-mb"
        )
    return "\n".join(lines)


def run_gc(args: argparse.Namespace) -> int:
    from ds4_agent.sessions.store import SnapshotStore

    if args.dir:
        root = Path(args.dir).expanduser()
    else:
        from ds4_agent.agent.paths import snapshots_dir

        root = snapshots_dir()
    if args.kv_disk_space_mb is not None and args.kv_disk_space_mb < 0:
        print("ds4-agent: --kv-disk-space-mb must be 0 or more", file=sys.stderr)
        return 2
    if not root.is_dir():
        print(f"ds4-agent: no snapshot store at {root} (nothing to clean)", file=sys.stderr)
        return 0
    store = SnapshotStore(root, budget_mb=args.kv_disk_space_mb)
    try:
        report = store.gc(verify=args.verify)
    except SnapshotError as e:
        print(f"ds4-agent: {e}", file=sys.stderr)
        return 1
    if args.format == "json":
        print(json.dumps(report.model_dump(mode="json"), indent=1))
    else:
        print(format_report(report, root))
    return 0
