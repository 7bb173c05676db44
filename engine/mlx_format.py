"""The converted-model directory ("MLX tier") format: writer, resume manifest and loader.

Layout of a converted directory:

    config.json                      official config keys + a `ds4_mlx` section (below)
    model-00001-of-000NN.safetensors MLX arrays, keyed `<official name>` (the weight: packed
                                     uint32 when quantized, else the float/int array),
                                     `<name>.scales`, `<name>.biases` (affine only)
    model.safetensors.index.json     weight_map over all keys
    tokenizer.json, …                copied from the source
    .ds4-convert.json                resume manifest (finished shards with size + xxh3-128)

`config.json["ds4_mlx"]` = {format_version, tier, fingerprint, source, tensors: {name:
{"mode", "bits", "group_size"} or {"dtype"}}, classes: {class: {params, bytes, bits_per_weight}},
report: {…}}. `config.json` is written last, so its presence with a `ds4_mlx` section marks a
complete conversion.

Writing (`write_tier`) is driven by a *plan*: the ordered list of output tensors with their
exact output byte sizes. Shards are assigned from the plan alone, so a rerun after an
interruption knows which shards it already has (each verified against the manifest's size and
hash) and produces only the missing ones, calling `produce(name)` for their tensors. Any source
(official checkpoint, ds4 GGUF) plugs in by supplying a plan and a `produce` function that
returns the engine's `Weight` (`mx.array` or `QuantizedTensor`) for one official name.

Peak memory of the writer: one shard's arrays (≤ `shard_bytes`, or the single tensor if larger)
plus whatever `produce` needs for one tensor; independent of the model size.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import shutil
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import mlx.core as mx
import xxhash
from ds4_agent.engine.atomic_io import PRIVATE_MODE, atomic_path, atomic_write_text
from ds4_agent.engine.atomic_io import atomic_write_bytes as _atomic_write_bytes
from ds4_agent.engine.qtensor import QuantizedTensor, Weight

FORMAT_VERSION = 1
MANIFEST = ".ds4-convert.json"
INDEX_FILE = "model.safetensors.index.json"
DEFAULT_SHARD_BYTES = 2 << 30
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "generation_config.json",
)


class ConvertError(RuntimeError):
    """A conversion cannot proceed; the message says why and what to do."""


# --------------------------------------------------------------------------------------------
# Atomic file helpers
# --------------------------------------------------------------------------------------------


def atomic_write_bytes(path: Path, data: bytes) -> None:
    _atomic_write_bytes(path, data, mode=PRIVATE_MODE)


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=1) + "\n", mode=PRIVATE_MODE)


def file_digest(path: Path, chunk: int = 16 << 20) -> str:
    h = xxhash.xxh3_128()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


# --------------------------------------------------------------------------------------------
# Plan and per-tensor description
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TensorFormat:
    """How one output tensor is stored: quantized (mode/bits/group) or plain (dtype)."""

    mode: str | None = None  # "affine" | "mxfp4" | "mxfp8"; None → plain array
    bits: int = 0
    group_size: int = 0
    dtype: str = ""  # plain arrays: "bfloat16" | "float16" | "float32" | "int32"
    scale_dtype: str = "float16"  # affine scales/biases

    def to_json(self) -> dict[str, Any]:
        if self.mode is None:
            return {"dtype": self.dtype}
        d: dict[str, Any] = {"mode": self.mode, "bits": self.bits, "group_size": self.group_size}
        if self.mode == "affine":
            d["scale_dtype"] = self.scale_dtype
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> TensorFormat:
        if "mode" in d:
            return cls(
                d["mode"], int(d["bits"]), int(d["group_size"]), "", d.get("scale_dtype", "")
            )
        return cls(dtype=d["dtype"])

    @property
    def label(self) -> str:
        if self.mode is None:
            return self.dtype
        if self.mode == "affine":
            return f"affine{self.bits}-g{self.group_size}"
        return self.mode


_DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4, "int32": 4, "uint8": 1}


def stored_bytes(shape: tuple[int, ...], fmt: TensorFormat) -> int:
    """Exact bytes of the stored arrays for a logical shape [..., out, in]."""
    n = 1
    for s in shape:
        n *= s
    if fmt.mode is None:
        return n * _DTYPE_BYTES[fmt.dtype]
    groups = n // fmt.group_size
    weight = n * fmt.bits // 8
    if fmt.mode == "affine":
        return weight + 2 * groups * _DTYPE_BYTES[fmt.scale_dtype]
    return weight + groups  # e8m0 scales


@dataclass(frozen=True)
class PlannedTensor:
    name: str  # official name (experts stacked: layers.L.ffn.experts.w1.weight)
    shape: tuple[int, ...]  # logical shape
    fmt: TensorFormat
    tensor_class: str

    @property
    def nbytes(self) -> int:
        return stored_bytes(self.shape, self.fmt)

    @property
    def params(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n


def assign_shards(plan: list[PlannedTensor], shard_bytes: int) -> list[list[PlannedTensor]]:
    """Greedy, order-preserving packing; deterministic in the plan, so resumable."""
    shards: list[list[PlannedTensor]] = []
    cur: list[PlannedTensor] = []
    size = 0
    for t in plan:
        if cur and size + t.nbytes > shard_bytes:
            shards.append(cur)
            cur, size = [], 0
        cur.append(t)
        size += t.nbytes
    if cur:
        shards.append(cur)
    return shards


def shard_name(i: int, n: int) -> str:
    return f"model-{i + 1:05d}-of-{n:05d}.safetensors"


def plan_fingerprint(
    plan: list[PlannedTensor], config: dict[str, Any], tier: str, source: dict[str, Any]
) -> str:
    """Identity of the output: changes when the source, the tier or any tensor format does."""
    h = hashlib.sha256()
    h.update(json.dumps([FORMAT_VERSION, tier, source], sort_keys=True).encode())
    h.update(
        json.dumps({k: v for k, v in config.items() if k != "ds4_mlx"}, sort_keys=True).encode()
    )
    for t in plan:
        h.update(json.dumps([t.name, list(t.shape), t.fmt.to_json()], sort_keys=True).encode())
    return h.hexdigest()[:32]


# --------------------------------------------------------------------------------------------
# Arrays of one Weight, under their stored keys
# --------------------------------------------------------------------------------------------


def weight_arrays(name: str, w: Weight, fmt: TensorFormat) -> dict[str, mx.array]:
    """The safetensors entries of one output tensor, checked against its planned format."""
    if fmt.mode is None:
        if isinstance(w, QuantizedTensor):
            raise ConvertError(f"{name}: planned as plain {fmt.dtype} but produced quantized")
        want = getattr(mx, fmt.dtype)
        return {name: w if w.dtype == want else w.astype(want)}
    if not isinstance(w, QuantizedTensor):
        raise ConvertError(f"{name}: planned as {fmt.label} but produced a plain array")
    if (w.mode, w.bits, w.group_size) != (fmt.mode, fmt.bits, fmt.group_size):
        raise ConvertError(
            f"{name}: planned as {fmt.label} but produced {w.mode}{w.bits}-g{w.group_size}"
        )
    out = {name: w.weight, f"{name}.scales": w.scales}
    if fmt.mode == "affine":
        if w.biases is None:
            raise ConvertError(f"{name}: affine tensor without biases")
        sd = getattr(mx, fmt.scale_dtype)
        out[f"{name}.scales"] = w.scales.astype(sd)
        out[f"{name}.biases"] = w.biases.astype(sd)
    return out


# --------------------------------------------------------------------------------------------
# Writer
# --------------------------------------------------------------------------------------------


@dataclass
class WriteReport:
    out_dir: Path
    shards_total: int
    shards_reused: int
    bytes_written: int
    fingerprint: str
    extra: dict[str, Any] = field(default_factory=dict)


ProgressFn = Callable[[str, int, int], None]  # (tensor name, bytes done, bytes total)


def _read_manifest(out_dir: Path) -> dict[str, Any] | None:
    p = out_dir / MANIFEST
    if not p.is_file():
        return None
    try:
        return json.loads(p.read_text())
    except json.JSONDecodeError:
        return None


def existing_fingerprint(out_dir: Path) -> str | None:
    """Fingerprint of the (finished or interrupted) conversion in `out_dir`, if any."""
    manifest = _read_manifest(Path(out_dir))
    if manifest is not None and manifest.get("fingerprint"):
        return str(manifest["fingerprint"])
    cfg = Path(out_dir) / "config.json"
    with contextlib.suppress(OSError, json.JSONDecodeError, KeyError, TypeError):
        return str(json.loads(cfg.read_text())["ds4_mlx"]["fingerprint"])
    return None


def prepare_output_dir(
    out_dir: Path, fingerprint: str, *, overwrite: bool = False
) -> dict[str, Any]:
    """Create `out_dir` or reopen it for resuming; refuse a directory holding something else.

    Returns the manifest to continue from ({"fingerprint", "shards": {file: {size, xxh3}}}).
    """
    out_dir = Path(out_dir)
    fresh = {"format_version": FORMAT_VERSION, "fingerprint": fingerprint, "shards": {}}
    if not out_dir.exists():
        out_dir.mkdir(parents=True)
        return fresh
    if not out_dir.is_dir():
        raise ConvertError(f"{out_dir} exists and is not a directory; choose another -o path")
    entries = [p for p in out_dir.iterdir() if not p.name.startswith(".")]
    manifest = _read_manifest(out_dir)
    cfg_path = out_dir / "config.json"
    existing_fp = None
    if cfg_path.is_file():
        with contextlib.suppress(json.JSONDecodeError, KeyError, TypeError):
            existing_fp = json.loads(cfg_path.read_text())["ds4_mlx"]["fingerprint"]
    if manifest is not None:
        existing_fp = existing_fp or manifest.get("fingerprint")
    if not entries and manifest is None:
        return fresh
    if existing_fp == fingerprint and manifest is not None:
        return manifest
    if overwrite and (existing_fp is not None or manifest is not None):
        for p in out_dir.iterdir():
            if p.is_file() and (
                p.suffix in (".safetensors", ".json", ".tmp") or p.name == MANIFEST
            ):
                p.unlink()
        return fresh
    if existing_fp is None:
        raise ConvertError(
            f"{out_dir} is not empty and is not a ds4-agent conversion; choose an empty or new -o path"
        )
    raise ConvertError(
        f"{out_dir} holds a different conversion (other source, tier or options); "
        "choose another -o path or pass --overwrite to replace it"
    )


def _verify_shard(path: Path, rec: dict[str, Any]) -> bool:
    return (
        path.is_file()
        and path.stat().st_size == rec.get("size")
        and file_digest(path) == rec.get("xxh3")
    )


def check_free_disk(out_dir: Path, needed: int) -> None:
    free = shutil.disk_usage(out_dir).free
    margin = 256 << 20
    if free < needed + margin:
        raise ConvertError(
            f"not enough free disk at {out_dir}: the conversion needs {needed / 2**30:.1f} GiB more, "
            f"{free / 2**30:.1f} GiB are free; free space or choose another -o path"
        )


def write_tier(
    out_dir: str | Path,
    plan: list[PlannedTensor],
    produce: Callable[[str], Weight],
    *,
    config: dict[str, Any],
    tier: str,
    source: dict[str, Any],
    copy_files: Iterable[Path] = (),
    extra_files: dict[str, bytes] | None = None,
    shard_bytes: int = DEFAULT_SHARD_BYTES,
    overwrite: bool = False,
    progress: ProgressFn | None = None,
    report: Callable[[], dict[str, Any]] | None = None,
    tensor_stats: Callable[[str], dict[str, Any] | None] | None = None,
    stats_report: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
) -> WriteReport:
    """Write (or finish) a converted directory. See the module docstring for the contract.

    `config`: the official config keys (the `ds4_mlx` section is added here). `source`: a
    JSON-able identity of the input (recorded and part of the fingerprint). `copy_files`:
    tokenizer and similar files copied verbatim; `extra_files`: name → bytes written as is
    (e.g. a tokenizer.json rebuilt from GGUF metadata). `report()` is called at the end and its
    dict stored under `ds4_mlx.report`. For reports that must survive a resume: `tensor_stats(
    name)`, called right after `produce(name)`, may return a JSON-able dict (e.g. error sums);
    it is kept in the manifest with its shard, and `stats_report(stats_by_name)` receives all
    of them (reused shards included) at the end; its dict is merged into `ds4_mlx.report`.
    """
    out_dir = Path(out_dir)
    names = [t.name for t in plan]
    if len(set(names)) != len(names):
        raise ConvertError("conversion plan lists a tensor twice")
    fingerprint = plan_fingerprint(plan, config, tier, source)
    manifest = prepare_output_dir(out_dir, fingerprint, overwrite=overwrite)
    shards = assign_shards(plan, shard_bytes)
    n = len(shards)
    done: dict[str, Any] = manifest.setdefault("shards", {})
    reused = 0
    todo: list[int] = []
    for i in range(n):
        fname = shard_name(i, n)
        rec = done.get(fname)
        if rec is not None and _verify_shard(out_dir / fname, rec):
            reused += 1
        else:
            done.pop(fname, None)
            todo.append(i)
    for stale in out_dir.glob(".*.tmp*"):
        stale.unlink()
    total = sum(t.nbytes for t in plan)
    remaining = sum(t.nbytes for i in todo for t in shards[i])
    check_free_disk(out_dir, remaining)
    atomic_write_json(out_dir / MANIFEST, manifest)
    done_bytes = total - remaining
    if progress:
        progress("", done_bytes, total)
    weight_map: dict[str, str] = {}
    for i, shard in enumerate(shards):
        for t in shard:
            for key in _stored_keys(t):
                weight_map[key] = shard_name(i, n)
    written = 0
    for i in todo:
        fname = shard_name(i, n)
        arrays: dict[str, mx.array] = {}
        shard_stats: dict[str, Any] = {}
        for t in shards[i]:
            w = produce(t.name)
            st = tensor_stats(t.name) if tensor_stats else None
            if st is not None:
                shard_stats[t.name] = st
            got = _logical_shape(w)
            if tuple(got) != tuple(t.shape):
                raise ConvertError(f"{t.name}: produced shape {got}, planned {t.shape}")
            arrays.update(weight_arrays(t.name, w, t.fmt))
            mx.eval(list(arrays.values()))
            del w
            mx.clear_cache()  # freed temporaries would otherwise stay in MLX's buffer cache
            done_bytes += t.nbytes
            if progress:
                progress(t.name, done_bytes, total)
        # The temp name must end in .safetensors, or mx.save_safetensors appends the suffix.
        with atomic_path(out_dir / fname, suffix=".tmp.safetensors", mode=PRIVATE_MODE) as tmp:
            mx.save_safetensors(str(tmp), arrays, metadata={"format": "mlx"})
        del arrays
        mx.clear_cache()
        path = out_dir / fname
        done[fname] = {"size": path.stat().st_size, "xxh3": file_digest(path), "stats": shard_stats}
        written += path.stat().st_size
        atomic_write_json(out_dir / MANIFEST, manifest)
    # Remove shards of an older shard count (e.g. a rerun with another --shard-size).
    wanted = {shard_name(i, n) for i in range(n)}
    for p in out_dir.glob("model-*-of-*.safetensors"):
        if p.name not in wanted:
            p.unlink()
    atomic_write_json(
        out_dir / INDEX_FILE, {"metadata": {"total_size": total}, "weight_map": weight_map}
    )
    for src in copy_files:
        src = Path(src)
        if src.is_file():
            atomic_write_bytes(out_dir / src.name, src.read_bytes())
    for name, data in (extra_files or {}).items():
        atomic_write_bytes(out_dir / name, data)
    all_stats: dict[str, Any] = {}
    for rec in done.values():
        all_stats.update(rec.get("stats") or {})
    cfg = {k: v for k, v in config.items() if k != "ds4_mlx"}
    cfg["ds4_mlx"] = {
        "format_version": FORMAT_VERSION,
        "tier": tier,
        "fingerprint": fingerprint,
        "source": source,
        "classes": class_summary(plan),
        "report": {
            **(report() if report else {}),
            **(stats_report(all_stats) if stats_report else {}),
        },
        "tensors": {t.name: t.fmt.to_json() for t in plan},
    }
    atomic_write_json(out_dir / "config.json", cfg)
    return WriteReport(out_dir, n, reused, written, fingerprint)


def _stored_keys(t: PlannedTensor) -> list[str]:
    if t.fmt.mode is None:
        return [t.name]
    keys = [t.name, f"{t.name}.scales"]
    if t.fmt.mode == "affine":
        keys.append(f"{t.name}.biases")
    return keys


def _logical_shape(w: Weight) -> tuple[int, ...]:
    return tuple(w.shape)


def class_summary(plan: Iterable[PlannedTensor]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for t in plan:
        c = out.setdefault(t.tensor_class, {"params": 0, "bytes": 0, "formats": []})
        c["params"] += t.params
        c["bytes"] += t.nbytes
        if t.fmt.label not in c["formats"]:
            c["formats"].append(t.fmt.label)
    for c in out.values():
        c["bits_per_weight"] = round(8 * c["bytes"] / max(c["params"], 1), 4)
    return out


# --------------------------------------------------------------------------------------------
# Loader
# --------------------------------------------------------------------------------------------


def read_converted_config(model_dir: str | Path) -> dict[str, Any]:
    path = Path(model_dir) / "config.json"
    try:
        cfg = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ConvertError(f"{path}: cannot read ({e})") from e
    meta = cfg.get("ds4_mlx")
    if not isinstance(meta, dict) or "tensors" not in meta:
        raise ConvertError(f"{path}: not a converted ds4-agent model (no ds4_mlx section)")
    if meta.get("format_version") != FORMAT_VERSION:
        raise ConvertError(
            f"{path}: converted with format version {meta.get('format_version')}, this build reads "
            f"{FORMAT_VERSION}; re-run `ds4-agent model convert`"
        )
    return cfg


def load_converted(model_dir: str | Path) -> dict[str, Weight]:
    """A converted directory → lazy `dict[str, Weight]` (official names, stacked experts)."""
    model_dir = Path(model_dir)
    cfg = read_converted_config(model_dir)
    index_path = model_dir / INDEX_FILE
    try:
        weight_map: dict[str, str] = json.loads(index_path.read_text())["weight_map"]
    except (OSError, json.JSONDecodeError, KeyError) as e:
        raise ConvertError(f"{index_path}: missing or corrupt ({e}); re-run the conversion") from e
    lazy: dict[str, mx.array] = {}
    for shard in sorted(set(weight_map.values())):
        path = model_dir / shard
        if not path.is_file():
            raise ConvertError(
                f"{path}: shard missing; re-run `ds4-agent model convert` to finish it"
            )
        lazy.update(mx.load(str(path)))  # type: ignore[arg-type]
    out: dict[str, Weight] = {}
    for name, spec in cfg["ds4_mlx"]["tensors"].items():
        fmt = TensorFormat.from_json(spec)
        if name not in lazy:
            raise ConvertError(f"{model_dir}: tensor {name} missing from the shards; re-convert")
        if fmt.mode is None:
            out[name] = lazy[name]
        else:
            out[name] = QuantizedTensor(
                weight=lazy[name],
                scales=lazy[f"{name}.scales"],
                biases=lazy.get(f"{name}.biases") if fmt.mode == "affine" else None,
                mode=fmt.mode,
                bits=fmt.bits,
                group_size=fmt.group_size,
            )
    return out


def plan_to_json(plan: list[PlannedTensor]) -> list[dict[str, Any]]:
    return [
        {"name": t.name, "shape": list(t.shape), "class": t.tensor_class, **asdict(t.fmt)}
        for t in plan
    ]
