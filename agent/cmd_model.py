"""`ds4-agent model …`: download, convert, inspect and manage installed models.

    ds4-agent model download q2|q4|lossless|mtp [--from official|gguf] [--dir DIR] [--name NAME]
    ds4-agent model list
    ds4-agent model default NAME
    ds4-agent model remove NAME [--delete-files]
    ds4-agent model convert …     (agent/model_convert.py)
    ds4-agent model info …        (agent/model_convert.py)

`download` is the only ds4-agent command that uses the network. It fetches the files
(resumable: rerun the same command after an interruption), verifies them against the sizes and
checksums the Hub publishes, converts them into the requested MLX tier, checks that the result
loads, and registers it as an installed model (the default one if it is the first).

Layout of an installed model directory (`--dir`, default `<data dir>/models/<name>`):
`download/` holds the fetched source files, `mlx/` the converted model the engine runs. The
source is deleted after a successful conversion unless `--keep-source` is given.
"""

from __future__ import annotations

import argparse
import contextlib
import shutil
import sys
from pathlib import Path
from typing import Any

from ds4_agent.agent.cmd_common import fail

WHATS = ("q2", "q4", "lossless", "mtp")
GIB = 1 << 30
# Converted size ≈ ratio × downloaded size, for the free-disk check made before downloading
# (the exact size is only known once the source can be planned). From the Flash figures:
# GGUF q2 80.8 GiB → MLX affine-2 ≈ 88.7 GiB; Q4_K 4.5 bpw → fp16-scaled affine-4 5 bpw;
# official 148.7 GiB → lossless ≈ 150, q3 ≈ 125, q2 ≈ 92 (with 5 % slack each).
OUTPUT_RATIO = {
    ("gguf", "q2"): 1.15,
    ("gguf", "q3"): 1.5,
    ("gguf", "q4"): 1.17,
    ("official", "q2"): 0.66,
    ("official", "q3"): 0.89,
    ("official", "q4"): 1.06,
    ("official", "lossless"): 1.06,
}


def _gib(n: float) -> str:
    return f"{n / GIB:.2f} GiB"


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------
# download
# --------------------------------------------------------------------------------------------


def run_download(args: argparse.Namespace) -> int:
    from ds4_agent.engine import download as dl
    from ds4_agent.engine import model_registry as mr

    what: str = args.what
    source = args.source or dl.default_source(what)
    tier = args.tier or ("q4" if what == "mtp" else what)
    label = "mtp" if what == "mtp" else tier
    name = args.name or f"flash-{label}" + (
        "" if source == dl.default_source(what) else f"-{source}"
    )
    root = Path(args.dir).expanduser() if args.dir else mr.models_dir() / name
    fetch_dir, model_dir = root / "download", root / "mlx"
    if what != "mtp" and not args.no_convert and _complete(model_dir, tier):
        # Finished earlier (the source may be gone): nothing to fetch again.
        reg = mr.load_registry()
        if name not in reg.models:
            mr.register_model(
                mr.ModelEntry(
                    name=name,
                    path=str(model_dir),
                    tier=tier,
                    source=source,
                    size_bytes=mr.dir_size(model_dir),
                ),
                make_default=True if args.default else None,
            )
        print(
            f"{name} is already installed at {model_dir} "
            f"(`ds4-agent model remove {name} --delete-files` to download it again)"
        )
        return 0
    try:
        plan = dl.plan_download(
            what, source, repo=args.repo, revision=args.revision, token=args.token
        )
        convert = what != "mtp" and not args.no_convert
        out_bytes = int(plan.total_bytes * OUTPUT_RATIO.get((source, tier), 1.2)) if convert else 0
        if convert and (model_dir / "config.json").is_file():
            out_bytes = 0  # already converted: a rerun only re-verifies
        _say(
            f"{plan.repo}@{plan.revision[:12]}: {len(plan.files)} file(s), "
            f"{_gib(plan.total_bytes)} to download into {fetch_dir}"
            + (f", ≈ {_gib(out_bytes)} after conversion" if out_bytes else "")
        )
        fetched = dl.download(
            plan, fetch_dir, token=args.token, extra_bytes=out_bytes, quiet=args.quiet, log=_say
        )
        checks = ", ".join(sorted(set(fetched.checks.values())))
        _say(f"verified {len(fetched.paths)} file(s) ({checks})")
    except dl.DownloadError as e:
        return fail(str(e))
    if what == "mtp":
        gguf_path = fetched.paths[0]
        mr.register_model(
            mr.ModelEntry(
                name=name,
                path=str(gguf_path),
                tier="mtp",
                source=source,
                repo=plan.repo,
                revision=plan.revision,
                kind="mtp",
                size_bytes=gguf_path.stat().st_size,
            )
        )
        _say(f"MTP weights installed as {name!r}: {gguf_path}")
        return 0
    if args.no_convert:
        _say(f"downloaded to {fetch_dir}; convert with `ds4-agent model convert … --tier {tier}`")
        return 0
    try:
        _convert(source, fetch_dir, fetched.paths, model_dir, tier, args)
        _check_loads(model_dir)
    except Exception as e:  # noqa: BLE001 - converter/loader errors become one line
        from ds4_agent.engine.mlx_format import ConvertError

        if isinstance(e, (ConvertError, ValueError, OSError)):
            return fail(f"{e} (rerun the same command to resume)")
        raise
    entry = mr.ModelEntry(
        name=name,
        path=str(model_dir),
        tier=tier,
        source=source,
        repo=plan.repo,
        revision=plan.revision,
        size_bytes=mr.dir_size(model_dir),
    )
    reg = mr.register_model(entry, make_default=True if args.default else None)
    if not args.keep_source:
        freed = mr.dir_size(fetch_dir)
        shutil.rmtree(fetch_dir, ignore_errors=True)
        _say(f"removed the downloaded source ({_gib(freed)}); --keep-source keeps it")
    default = " (default)" if reg.default == name else f"; run it with --model {name}"
    print(
        f"installed {name}: {tier} from {source}, {_gib(entry.size_bytes)} at {model_dir}{default}"
    )
    return 0


def _complete(model_dir: Path, tier: str) -> bool:
    from ds4_agent.engine.mlx_format import ConvertError, read_converted_config

    if not (model_dir / "config.json").is_file():
        return False
    try:
        return read_converted_config(model_dir)["ds4_mlx"].get("tier") == tier
    except ConvertError:
        return False


def _convert(
    source: str, fetch_dir: Path, paths: list[Path], out: Path, tier: str, args: Any
) -> None:
    from ds4_agent.agent.model_convert import _with_progress
    from rich.console import Console

    console = Console(stderr=True, quiet=args.quiet)
    if source == "gguf":
        from ds4_agent.engine.gguf_convert import convert_gguf, planned_bytes
        from ds4_agent.engine.gguf_source import GGUFSource

        gguf = next(p for p in paths if p.suffix == ".gguf")
        src = GGUFSource(gguf)
        _say(f"converting {gguf.name} → {tier}: {_gib(planned_bytes(src, tier))}")
        _with_progress(console, lambda prog: convert_gguf(src, out, tier, progress=prog))
        _say_gguf_errors(out)
        return
    from ds4_agent.engine import convert as cv

    conv = cv.OfficialConverter(fetch_dir, cv.ConvertOptions(tier=tier))
    conv.resolve_group_size(_say)
    _say(f"converting the official checkpoint → {tier}: {_gib(cv.plan_bytes(conv.plan()))}")
    _with_progress(console, lambda prog: conv.run(out, progress=prog))


def _say_gguf_errors(out: Path) -> None:
    """Per tensor class: exact, or the relative error the MLX form adds to the GGUF values."""
    import json

    report = json.loads((out / "config.json").read_text())["ds4_mlx"].get("report", {})
    for cls, e in sorted(report.get("gguf", {}).items()):
        how = (
            "exact"
            if e["exact"]
            else f"rel. error {e['rel_error']:.4f} (max |Δ| {e['max_abs_error']:.3g})"
        )
        _say(f"  {cls:<20} {how}")


def _check_loads(model_dir: Path) -> None:
    """Open the converted model the way the engine does (lazily: every tensor must resolve)."""
    from ds4_agent.engine.config import ModelConfig
    from ds4_agent.engine.mlx_format import load_converted

    ModelConfig.from_dir(model_dir)
    weights = load_converted(model_dir)
    _say(f"checked: {len(weights)} tensors load from {model_dir}")


# --------------------------------------------------------------------------------------------
# list / default / remove
# --------------------------------------------------------------------------------------------


def run_list(args: argparse.Namespace) -> int:
    from ds4_agent.engine import model_registry as mr

    try:
        reg = mr.load_registry()
    except mr.RegistryError as e:
        return fail(str(e))
    if not reg.models:
        print(mr.no_model_message())
        return 0
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"installed models ({mr.registry_path()})")
    for col in ("", "name", "tier", "source", "size", "path"):
        table.add_column(col)
    for n, e in sorted(reg.models.items()):
        missing = "" if Path(e.path).exists() else " [red](missing)[/red]"
        table.add_row(
            "*" if reg.default == n else "",
            n,
            e.tier,
            e.source + (f" {e.repo}" if e.repo else ""),
            _gib(e.size_bytes),
            e.path + missing,
        )
    Console().print(table)
    return 0


def run_default(args: argparse.Namespace) -> int:
    from ds4_agent.engine import model_registry as mr

    try:
        mr.set_default(args.model_name)
    except mr.RegistryError as e:
        return fail(str(e))
    print(f"default model: {args.model_name}")
    return 0


def run_remove(args: argparse.Namespace) -> int:
    from ds4_agent.engine import model_registry as mr

    try:
        entry = mr.load_registry().models.get(args.model_name)
        mr.unregister_model(args.model_name)
    except mr.RegistryError as e:
        return fail(str(e))
    assert entry is not None
    if args.delete_files:
        # Only what `download` created: the model (mlx/ or the MTP file), the download/
        # staging next to it, then the install root if that left it empty.
        p = Path(entry.path)
        root = p.parent.parent if entry.kind == "mtp" else p.parent
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
        shutil.rmtree(root / "download", ignore_errors=True)
        with contextlib.suppress(OSError):
            root.rmdir()
        print(f"removed {args.model_name} and deleted {p}")
    else:
        print(f"removed {args.model_name} from the registry (files kept at {entry.path})")
    return 0


# --------------------------------------------------------------------------------------------
# parser
# --------------------------------------------------------------------------------------------


def register(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="cmd", metavar="COMMAND")
    d = sub.add_parser(
        "download",
        help="download, verify, convert and install a model tier",
        description=(
            "Download DeepSeek V4 Flash from the Hugging Face Hub, verify it, convert it into an "
            "MLX tier and install it. Rerun the same command to resume an interrupted download "
            "or conversion. q2 and mtp come from antirez's ds4 GGUF files by default (about half "
            "the download), q4 and lossless from the official checkpoint (exact FP4 experts)."
        ),
    )
    d.add_argument("what", choices=WHATS, help="q2 (128 GB Macs), q4 / lossless (256 GB+), mtp")
    d.add_argument(
        "--from",
        dest="source",
        choices=("official", "gguf"),
        help="official checkpoint or ds4's GGUF files (default: gguf for q2/mtp, else official)",
    )
    d.add_argument("--dir", metavar="DIR", help="install here (default: the ds4-agent data dir)")
    d.add_argument("--name", help="registry name (default: flash-<tier>)")
    d.add_argument("--tier", choices=("q2", "q3", "q4", "lossless"), help="convert to this tier")
    d.add_argument("--repo", metavar="OWNER/NAME", help="download from another repository")
    d.add_argument("--revision", default="main", help="branch, tag or commit (default: main)")
    d.add_argument("--token", help="Hugging Face token (default: HF_TOKEN or `hf auth login`)")
    d.add_argument("--no-convert", action="store_true", help="download and verify only")
    d.add_argument("--keep-source", action="store_true", help="keep the downloaded files")
    d.add_argument("--default", action="store_true", help="make it the default model")
    d.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    d.set_defaults(func=run_download)

    from ds4_agent.agent import model_convert

    model_convert.register_convert(sub)
    model_convert.register_info(sub)

    ls = sub.add_parser("list", help="list installed models (* = default)")
    ls.set_defaults(func=run_list)
    df = sub.add_parser("default", help="make an installed model the default")
    df.add_argument("model_name", metavar="NAME")
    df.set_defaults(func=run_default)
    rm = sub.add_parser("remove", help="forget an installed model")
    rm.add_argument("model_name", metavar="NAME")
    rm.add_argument("--delete-files", action="store_true", help="also delete its files")
    rm.set_defaults(func=run_remove)
