"""`ds4-agent model convert` and `ds4-agent model info`.

`register_convert(sub)` / `register_info(sub)` add the two commands to the `model` group's
subparsers (`sub` is what `ArgumentParser.add_subparsers()` returns). Heavy modules (MLX, the
converter) are imported inside the handlers so `--help` stays instant.

    ds4-agent model convert SRC -o DIR --tier q2|q3|q4|lossless [--group-size 32|64|128]
        [--calibration FILE] [--shard-size GIB] [--no-mtp] [--no-search] [--overwrite]
    ds4-agent model convert [SRC|flash] --tier T --dry-run     # sizes only, no data read
    ds4-agent model info DIR|FILE
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from ds4_agent.agent.cmd_common import fail

TIERS = ("q2", "q3", "q4", "lossless")


def register_convert(sub: Any) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "convert",
        help="convert an official checkpoint or a ds4 GGUF into an MLX tier",
        description=(
            "Convert the official DeepSeek V4 Flash checkpoint directory (or a ds4 .gguf file) "
            "into an MLX tier directory. Interrupted conversions resume when rerun with the "
            "same arguments."
        ),
    )
    p.add_argument(
        "src",
        nargs="?",
        help="official checkpoint directory or ds4 .gguf file ('flash' with --dry-run: the "
        "published Flash shapes)",
    )
    p.add_argument("-o", "--output", metavar="DIR", help="output directory")
    p.add_argument("--tier", choices=TIERS, required=True, help="target tier")
    p.add_argument("--group-size", type=int, choices=(32, 64, 128), help="q2/q3 expert group size")
    p.add_argument("--calibration", metavar="FILE", help="activation statistics (safetensors)")
    p.add_argument("--shard-size", type=float, default=2.0, metavar="GIB", help="shard size")
    p.add_argument("--no-mtp", action="store_true", help="leave out the MTP block (saves ~2 GiB)")
    p.add_argument(
        "--no-search", action="store_true", help="plain round-to-nearest re-quantization"
    )
    p.add_argument(
        "--overwrite", action="store_true", help="replace a different earlier conversion"
    )
    p.add_argument("--dry-run", action="store_true", help="print sizes and memory bounds only")
    p.set_defaults(func=run_convert)
    return p


def register_info(sub: Any) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "info",
        help="architecture, size, bits per tensor class and which Macs a model fits",
    )
    p.add_argument(
        "path", metavar="DIR|FILE", help="model directory (official or converted) or .gguf"
    )
    p.set_defaults(func=run_info)
    return p


# --------------------------------------------------------------------------------------------
# convert
# --------------------------------------------------------------------------------------------


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


def _smallest_mac(fits: dict) -> str:
    for gb, f in fits.items():
        if f.fits:
            return f"{gb} GB ({f.label.removeprefix('yes, ')})"
    return "none"


def _print_sizes(
    console: Any,
    entries: dict,
    title: str,
    tier: str,
    shard_bytes: int,
    no_mtp: bool,
    config: dict | None = None,
):
    from ds4_agent.engine import convert as cv
    from ds4_agent.engine.convert_sizes import FLASH_CONFIG, TIER_TARGET_GIB, mac_fits
    from rich.table import Table

    tensors = cv.source_tensors(entries)
    if no_mtp:
        tensors = [t for t in tensors if not t.name.startswith("mtp.")]
    table = Table(title=title)
    cols = (
        "tier",
        "expert group",
        "output size",
        "target",
        "meets target",
        "peak RAM",
        "smallest Mac",
    )
    for col in cols:
        table.add_column(col)
    for t in cv.TIERS:
        groups = cv.GROUP_CANDIDATES if t in cv.EXPERT_BITS else (32,)
        for g in groups:
            plan = cv.build_plan(tensors, t, g)
            size = cv.plan_bytes(plan)
            target = TIER_TARGET_GIB[t]
            table.add_row(
                t + (" ←" if t == tier else ""),
                str(g) if t in cv.EXPERT_BITS else "-",
                _gib(size),
                f"≤ {target:.0f} GiB",
                "yes" if size <= target * 2**30 else "no",
                _gib(cv.peak_ram_bound(plan, shard_bytes)),
                _smallest_mac(mac_fits(size, config or FLASH_CONFIG)),
            )
    console.print(table)
    return tensors


def run_convert(args: argparse.Namespace) -> int:
    from ds4_agent.engine import convert as cv
    from ds4_agent.engine.convert_sizes import flash_entries
    from ds4_agent.engine.mlx_format import ConvertError
    from ds4_agent.engine.weights import Checkpoint, WeightsError
    from rich.console import Console

    console = Console(stderr=True)
    shard_bytes = int(args.shard_size * 2**30)
    if shard_bytes <= 0:
        return fail("--shard-size must be positive")
    src = args.src
    try:
        if args.dry_run:
            if src in (None, "flash"):
                entries, title = flash_entries(), "DeepSeek V4 Flash (published shapes, no data)"
                config = None
            elif str(src).endswith(".gguf"):
                return fail(
                    "--dry-run reads official checkpoints or 'flash'; run `model info` on GGUF files"
                )
            else:
                entries, title = Checkpoint(src).entries, f"{src} (shapes only)"
                cfg_path = Path(src) / "config.json"
                config = json.loads(cfg_path.read_text()) if cfg_path.is_file() else None
            tensors = _print_sizes(
                console, entries, title, args.tier, shard_bytes, args.no_mtp, config
            )
            if args.tier in cv.EXPERT_BITS and not args.group_size:
                g, _ = cv.choose_group_size(tensors, args.tier, {})
                console.print(
                    f"{args.tier}: group size {g} would be used (smallest group meeting the target; "
                    "a real conversion picks it by measured error among those that meet it)"
                )
            return 0
        if src is None or args.output is None:
            return fail("model convert needs SRC and -o DIR (or --dry-run)")
        if str(src).endswith(".gguf"):
            return _convert_gguf(console, args, shard_bytes)
        opts = cv.ConvertOptions(
            tier=args.tier,
            group_size=args.group_size,
            calibration=args.calibration,
            shard_bytes=shard_bytes,
            overwrite=args.overwrite,
            search=not args.no_search,
            include_mtp=not args.no_mtp,
        )
        conv = cv.OfficialConverter(src, opts)
        _print_sizes(
            console,
            flash_entries(),
            "Target sizes for the full Flash model",
            args.tier,
            shard_bytes,
            args.no_mtp,
        )
        conv.resolve_group_size(lambda s: console.print(s), args.output)
        if conv.group_table:
            for g, row in conv.group_table.items():
                console.print(
                    f"  group {g}: weighted rel. error {row['weighted_rel_err']:.4f}, "
                    f"output {row['size_gib']:.2f} GiB"
                )
            console.print(f"  → group size {conv.group_size}")
        plan = conv.plan()
        console.print(
            f"converting {src} → {args.output} ({args.tier}): {_gib(cv.plan_bytes(plan))}, "
            f"peak RAM ≤ {_gib(cv.peak_ram_bound(plan, shard_bytes))}"
        )
        result = _with_progress(console, lambda prog: conv.run(args.output, progress=prog))
    except (ConvertError, WeightsError) as e:
        return fail(str(e))
    _print_result(console, result)
    return 0


def _with_progress(console: Any, run: Any) -> Any:
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    with Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        DownloadColumn(binary_units=True),
        TransferSpeedColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=False,
    ) as progress:
        task = progress.add_task("converting", total=None)

        def cb(name: str, done: int, total: int) -> None:
            desc = name.rsplit(".", 2)[0][-40:] if name else "resuming"
            progress.update(task, completed=done, total=total, description=desc)

        return run(cb)


def _print_result(console: Any, result: Any) -> None:
    from rich.table import Table

    w = result.write
    console.print(
        f"done in {result.seconds:.0f} s: {w.shards_total} shards "
        f"({w.shards_reused} reused from an earlier run), {_gib(w.bytes_written)} written"
    )
    table = Table(title="reconstruction error per tensor class (relative Frobenius)")
    for col in ("class", "exact", "rel. error", "importance-weighted", "max |Δ|"):
        table.add_column(col)
    for cls, e in sorted(result.errors.items()):
        table.add_row(
            cls,
            "yes" if e["exact"] else "no",
            f"{e['rel_err']:.4f}",
            f"{e['weighted_rel_err']:.4f}",
            f"{e['max_abs_err']:.3g}",
        )
    console.print(table)


def _convert_gguf(console: Any, args: argparse.Namespace, shard_bytes: int) -> int:
    from ds4_agent.engine import gguf_convert

    t0 = time.monotonic()
    kwargs: dict[str, Any] = {"overwrite": args.overwrite, "shard_bytes": shard_bytes}
    if args.group_size:
        kwargs["requant_group"] = args.group_size
    report = _with_progress(
        console,
        lambda prog: gguf_convert.convert_gguf(
            args.src, args.output, args.tier, progress=prog, **kwargs
        ),
    )
    console.print(
        f"done in {time.monotonic() - t0:.0f} s: {report.shards_total} shards "
        f"({report.shards_reused} reused)"
    )
    return 0


# --------------------------------------------------------------------------------------------
# info
# --------------------------------------------------------------------------------------------


def run_info(args: argparse.Namespace) -> int:
    from ds4_agent.engine.convert_info import ModelInfoError, describe
    from ds4_agent.engine.convert_sizes import mac_fits
    from ds4_agent.engine.mlx_format import ConvertError
    from rich.console import Console
    from rich.table import Table

    console = Console()
    try:
        info = describe(Path(args.path))
    except (ModelInfoError, ConvertError, OSError, ValueError) as e:
        return fail(str(e))
    cfg = info.config
    console.print(f"[bold]{args.path}[/bold]  ({info.kind})")
    console.print(
        f"architecture: {cfg.get('model_type')}, {cfg.get('num_hidden_layers')} layers "
        f"(+{cfg.get('num_nextn_predict_layers', 0)} MTP), hidden {cfg.get('hidden_size')}, "
        f"{cfg.get('n_routed_experts')} routed experts (top-{cfg.get('num_experts_per_tok')}), "
        f"vocab {cfg.get('vocab_size')}"
    )
    if info.tier:
        console.print(f"tier: {info.tier}")
    console.print(
        f"parameters: {info.params / 1e9:.2f} B · size on disk: {_gib(info.disk_bytes)} · "
        f"weights: {_gib(info.weight_bytes)}"
    )
    table = Table(title="bits per tensor class")
    for col in ("class", "params", "bytes", "bits/weight", "formats"):
        table.add_column(col)
    for cls, c in sorted(info.classes.items()):
        table.add_row(
            cls,
            f"{c['params'] / 1e9:.3f} B",
            _gib(c["bytes"]),
            f"{c['bits_per_weight']:.2f}",
            ", ".join(c["formats"]),
        )
    console.print(table)
    fits = Table(
        title="Mac memory tiers (usable ≈ RAM − max(8 GiB, RAM/8), with iogpu.wired_limit_mb raised)"
    )
    fits.add_column("Mac")
    fits.add_column("fits")
    for gb, f in mac_fits(info.weight_bytes, cfg).items():
        fits.add_row(f"{gb} GB", f.label)
    console.print(fits)
    return 0
