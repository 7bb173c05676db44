"""Convert the official DeepSeek V4 checkpoint into an MLX tier directory (see `mlx_format`).

Tiers (what each tensor class becomes; the official formats are FP4 routed experts, FP8
attention/shared/indexer-q/MTP projections, BF16 rest, F32 keep-outs):

| class              | lossless / q4          | q3                         | q2                         |
|--------------------|------------------------|----------------------------|----------------------------|
| routed experts     | mxfp4 (byte-exact)     | affine 3-bit, group g      | affine 2-bit, group g      |
| FP8 matrices       | mxfp8 (exact)          | mxfp8 (exact)              | mxfp8 (exact)              |
| head (BF16)        | BF16                   | affine 8-bit g64           | affine 8-bit g64           |
| other BF16 / F32   | kept                   | kept                       | kept                       |
| tid2eid (I64)      | int32                  | int32                      | int32                      |

For the official source, q4 equals lossless: its experts already are 4-bit (e2m1), and mxfp4
holds them exactly. The q2/q3 group size g is chosen by measurement (`choose_group_size`):
sampled expert matrices are quantized with g ∈ {32, 64, 128}, and the lowest-error g whose
full-model size meets the tier target wins (for the real Flash shapes that is g = 64 for q2:
g = 32 would need ≈ 96 GiB). Re-quantization is importance-weighted (`convert_quant`).

Calibration file (optional, `--calibration FILE`): a safetensors file whose keys are official
weight names as the loader returns them (`layers.L.ffn.experts.w1.weight`, `head.weight`, …)
and whose values are float32 mean squared input activations, shape [in] (shared by all
experts) or [n_experts, in]. Missing entries fall back to the weight's column energy.

Peak memory: one output shard (≤ 2 GiB, or one tensor when larger: an mxfp4 expert stack of
Flash is 1.07 GiB) + the tensor being produced (the output stack plus one expert in float32,
32 MiB) + the source pages the OS maps in — about 4.5 GiB for Flash, whatever its total size.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np
from ds4_agent.engine import quant
from ds4_agent.engine.convert_quant import affine_quantize, stack_quantized
from ds4_agent.engine.convert_sizes import GIB, TIER_TARGET_GIB
from ds4_agent.engine.mlx_format import (
    DEFAULT_SHARD_BYTES,
    TOKENIZER_FILES,
    ConvertError,
    PlannedTensor,
    TensorFormat,
    WriteReport,
    existing_fingerprint,
    plan_fingerprint,
    write_tier,
)
from ds4_agent.engine.qtensor import QuantizedTensor, Weight
from ds4_agent.engine.weights import (
    Checkpoint,
    TensorEntry,
    bf16_bits_to_f32,
    read_numpy,
)

TIERS = ("q2", "q3", "q4", "lossless")
EXPERT_BITS = {"q2": 2, "q3": 3}
GROUP_CANDIDATES = (32, 64, 128)
HEAD_FORMAT = TensorFormat("affine", 8, 64)
_EXPERT = re.compile(r"^(?P<prefix>.*\.ffn\.experts)\.(?P<e>\d+)\.(?P<w>w[123])\.weight$")
_PLAIN_DTYPE = {
    "BF16": "bfloat16",
    "F16": "float16",
    "F32": "float32",
    "I64": "int32",
    "I32": "int32",
}


def tensor_class(name: str) -> str:
    """Coarse class for reports and quantization rules."""
    if ".ffn.experts." in name:
        return "routed_experts"
    if ".ffn.shared_experts." in name:
        return "shared_experts"
    if name == "embed.weight":
        return "embed"
    if name == "head.weight":
        return "head"
    if ".compressor." in name or ".indexer." in name:
        return "compressor_indexer"
    if re.search(r"\.attn\.w(q_a|q_b|kv|o_a|o_b)\.weight$", name) or name.endswith(
        ("e_proj.weight", "h_proj.weight")
    ):
        return "attention"
    if name.endswith(("gate.weight", "gate.bias", "tid2eid")):
        return "router"
    return "norms_mhc"


# --------------------------------------------------------------------------------------------
# Source view: logical output tensors of an official checkpoint
# --------------------------------------------------------------------------------------------


@dataclass
class SourceTensor:
    name: str  # output name (experts stacked)
    kind: str  # "fp8" | "fp4" | "float" | "int"
    dtype: str  # source safetensors dtype of the weight
    shape: tuple[int, ...]  # logical shape
    entries: list[TensorEntry]  # one per expert for stacks, else one
    scales: list[TensorEntry] = field(default_factory=list)


def _natural_key(name: str) -> list[Any]:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def source_tensors(entries: dict[str, TensorEntry]) -> list[SourceTensor]:
    """Official entries → logical tensors in a stable, layer-major order."""
    out: dict[str, SourceTensor] = {}
    experts: dict[str, dict[int, TensorEntry]] = {}
    for name, e in entries.items():
        if e.dtype == "F8_E8M0":
            continue
        m = _EXPERT.match(name)
        if m:
            experts.setdefault(f"{m['prefix']}.{m['w']}.weight", {})[int(m["e"])] = e
            continue
        out[name] = _single(name, e, entries)
    for key, parts in experts.items():
        n = max(parts) + 1
        if sorted(parts) != list(range(n)):
            raise ConvertError(
                f"{key}: the checkpoint lacks some experts (has {len(parts)} of {n})"
            )
        first = _single(key, parts[0], entries, scale_of=parts[0].name)
        ents = [parts[i] for i in range(n)]
        scales = [entries[_scale_name(p.name)] for p in ents] if first.scales else []
        out[key] = SourceTensor(key, first.kind, first.dtype, (n, *first.shape), ents, scales)
    return [out[k] for k in sorted(out, key=_order_key)]


def _order_key(name: str) -> list[Any]:
    # embed first, then layers and MTP in numeric order, then the final norm/head/hc_head.
    if name == "embed.weight":
        rank = 0
    elif name.startswith("layers."):
        rank = 1
    elif name.startswith("mtp."):
        rank = 2
    else:
        rank = 3
    return [rank, *_natural_key(name)]


def _scale_name(name: str) -> str:
    return name[: -len(".weight")] + ".scale"


def _single(
    name: str, e: TensorEntry, entries: dict[str, TensorEntry], scale_of: str | None = None
) -> SourceTensor:
    sname = _scale_name(scale_of or name) if (scale_of or name).endswith(".weight") else None
    scale = entries.get(sname) if sname else None
    if e.dtype == "F8_E4M3":
        if scale is None:
            raise ConvertError(f"FP8 tensor {e.name} has no {sname}")
        return SourceTensor(name, "fp8", e.dtype, e.shape, [e], [scale])
    if e.dtype in ("I8", "U8") and scale is not None:
        rows, packed = e.shape
        return SourceTensor(name, "fp4", e.dtype, (rows, packed * 2), [e], [scale])
    if e.dtype in ("I64", "I32"):
        return SourceTensor(name, "int", e.dtype, e.shape, [e])
    if e.dtype in ("BF16", "F16", "F32"):
        return SourceTensor(name, "float", e.dtype, e.shape, [e])
    raise ConvertError(f"tensor {e.name} has dtype {e.dtype}, which the converter does not handle")


def target_format(t: SourceTensor, tier: str, group_size: int) -> TensorFormat:
    cls = tensor_class(t.name)
    if tier not in TIERS:
        raise ConvertError(f"unknown tier {tier!r}; choose one of {', '.join(TIERS)}")
    if t.kind == "int":
        return TensorFormat(dtype="int32")
    if t.kind == "fp8":
        return TensorFormat("mxfp8", 8, 32)
    if cls == "routed_experts":
        if tier in EXPERT_BITS:
            return TensorFormat("affine", EXPERT_BITS[tier], group_size)
        if t.kind == "fp4":
            return TensorFormat("mxfp4", 4, 32)
        return (
            TensorFormat("affine", 4, 64)
            if tier == "q4"
            else TensorFormat(dtype=_PLAIN_DTYPE[t.dtype])
        )
    if t.kind == "fp4":  # FP4 outside the experts does not occur in the release; keep it exact
        return TensorFormat("mxfp4", 4, 32)
    if tier in EXPERT_BITS and (cls == "head" or cls in ("attention", "shared_experts")):
        # BF16 head (and FP32/BF16 attention of unquantized checkpoints) → 8-bit class.
        return HEAD_FORMAT
    return TensorFormat(dtype=_PLAIN_DTYPE[t.dtype])


def build_plan(tensors: list[SourceTensor], tier: str, group_size: int) -> list[PlannedTensor]:
    return [
        PlannedTensor(t.name, t.shape, target_format(t, tier, group_size), tensor_class(t.name))
        for t in tensors
    ]


def plan_bytes(plan: list[PlannedTensor]) -> int:
    return sum(t.nbytes for t in plan)


def peak_ram_bound(plan: list[PlannedTensor], shard_bytes: int = DEFAULT_SHARD_BYTES) -> int:
    """Upper bound of the converter's working memory (page cache of the source excluded):
    the shard being assembled (≤ shard_bytes, or one tensor when larger), the tensor being
    produced twice over (per-expert parts + their stack) and ~16 float32 temporaries of the
    largest matrix (or row block) the re-quantizer works on (measured: ≈ 12 on CPU)."""
    largest = max((t.nbytes for t in plan), default=0)
    work = 0
    for t in plan:
        if t.fmt.mode != "affine":
            continue  # exact mappings only copy bytes
        rows, cols = t.shape[-2:] if len(t.shape) >= 2 else (1, t.shape[0])
        work = max(work, min(rows, CHUNK_ROWS) * cols * 4)
    return max(shard_bytes, largest) + 2 * largest + 16 * work


# --------------------------------------------------------------------------------------------
# Reading source tensors
# --------------------------------------------------------------------------------------------


def read_float(t: SourceTensor, index: int = 0) -> np.ndarray:
    """One source matrix (or expert `index` of a stack) as float32, dequantized exactly."""
    e = t.entries[index]
    raw = read_numpy(e)
    if t.kind == "fp8":
        return quant.fp8_block_dequantize(raw, read_numpy(t.scales[index]))
    if t.kind == "fp4":
        return quant.fp4_row_dequantize(np.asarray(raw).view(np.uint8), read_numpy(t.scales[index]))
    if e.dtype == "BF16":
        return bf16_bits_to_f32(raw)
    return np.asarray(raw, dtype=np.float32)


CHUNK_ROWS = 4096  # re-quantize big matrices (the 129 280-row head) in row blocks


def read_float_rows(t: SourceTensor, index: int, r0: int, r1: int) -> np.ndarray:
    """Rows [r0, r1) of a float source matrix as float32, without reading the rest."""
    e = t.entries[index]
    if t.kind != "float":
        return read_float(t, index)[r0:r1]
    raw = read_numpy(e)[r0:r1]
    if e.dtype == "BF16":
        return bf16_bits_to_f32(raw)
    return np.asarray(raw, dtype=np.float32)


def _exact_mx(t: SourceTensor, index: int, fmt: TensorFormat) -> Weight:
    """Bit-preserving mappings (no float round trip)."""
    e = t.entries[index]
    raw = np.ascontiguousarray(read_numpy(e))
    if fmt.mode == "mxfp4":
        return QuantizedTensor(
            mx.array(raw.view(np.uint8).view(np.uint32)),
            mx.array(np.ascontiguousarray(read_numpy(t.scales[index]))),
            None,
            "mxfp4",
            4,
            32,
        )
    if fmt.mode == "mxfp8":
        rows, cols = raw.shape
        s = np.asarray(read_numpy(t.scales[index]))
        s = np.repeat(np.repeat(s, 128, axis=0)[:rows], 4, axis=1)[:, : cols // 32]
        return QuantizedTensor(
            mx.array(raw.view(np.uint32)), mx.array(np.ascontiguousarray(s)), None, "mxfp8", 8, 32
        )
    if e.dtype == "BF16" and fmt.dtype == "bfloat16":
        return mx.view(mx.array(raw), mx.bfloat16)
    if t.kind == "int":
        return mx.array(raw.astype(np.int32))
    return mx.array(np.asarray(raw)).astype(getattr(mx, fmt.dtype))


# --------------------------------------------------------------------------------------------
# Error accounting
# --------------------------------------------------------------------------------------------


@dataclass
class ErrorAccumulator:
    sq_err: float = 0.0
    sq_ref: float = 0.0
    wsq_err: float = 0.0
    wsq_ref: float = 0.0
    max_abs: float = 0.0

    def add(self, r: Any) -> None:
        self.sq_err += r.sq_err
        self.sq_ref += r.sq_ref
        self.wsq_err += r.wsq_err
        self.wsq_ref += r.wsq_ref
        self.max_abs = max(self.max_abs, r.max_abs)

    def to_json(self) -> dict[str, float]:
        return {
            "sq_err": self.sq_err,
            "sq_ref": self.sq_ref,
            "wsq_err": self.wsq_err,
            "wsq_ref": self.wsq_ref,
            "max_abs": self.max_abs,
        }

    @classmethod
    def from_json(cls, d: dict[str, float]) -> ErrorAccumulator:
        return cls(**{k: float(d.get(k, 0.0)) for k in cls().to_json()})

    @property
    def rel(self) -> float:
        return (self.sq_err / self.sq_ref) ** 0.5 if self.sq_ref else 0.0

    @property
    def weighted_rel(self) -> float:
        return (self.wsq_err / self.wsq_ref) ** 0.5 if self.wsq_ref else 0.0


def summarize_errors(
    plan: list[PlannedTensor], stats: dict[str, dict[str, float]]
) -> dict[str, dict[str, Any]]:
    """Per tensor class: relative Frobenius error (plain and importance-weighted)."""
    by_class: dict[str, ErrorAccumulator] = {}
    exact: dict[str, bool] = {}
    for t in plan:
        acc = by_class.setdefault(t.tensor_class, ErrorAccumulator())
        s = stats.get(t.name)
        if s is None:
            exact.setdefault(t.tensor_class, True)
            continue
        exact[t.tensor_class] = False
        acc.add(ErrorAccumulator.from_json(s))
    return {
        c: {
            "exact": exact.get(c, True),
            "rel_err": acc.rel,
            "weighted_rel_err": acc.weighted_rel,
            "max_abs_err": acc.max_abs,
        }
        for c, acc in by_class.items()
    }


# --------------------------------------------------------------------------------------------
# Calibration and group-size choice
# --------------------------------------------------------------------------------------------


class Calibration:
    """Input-activation energies per weight (see module docstring for the file format)."""

    def __init__(self, path: str | Path | None = None) -> None:
        self.path = Path(path) if path else None
        self.stats: dict[str, mx.array] = {}
        if self.path is not None:
            if not self.path.is_file():
                raise ConvertError(f"calibration file {self.path} does not exist")
            try:
                self.stats = dict(mx.load(str(self.path)))  # type: ignore[arg-type]
            except (RuntimeError, ValueError) as e:
                raise ConvertError(f"{self.path}: not a safetensors calibration file ({e})") from e

    def importance(self, name: str, expert: int | None, cols: int) -> mx.array | None:
        a = self.stats.get(name)
        if a is None:
            return None
        if a.ndim == 2 and expert is not None:
            a = a[expert]
        if a.shape != (cols,):
            raise ConvertError(
                f"{self.path}: entry {name} has shape {a.shape}, expected ({cols},) or (n_experts, {cols})"
            )
        return a.astype(mx.float32)


def measure_groups(
    tensors: list[SourceTensor],
    bits: int,
    calibration: Calibration,
    samples_per_tensor: int = 2,
    max_tensors: int = 6,
) -> dict[int, float]:
    """Weighted relative error of affine `bits` quantization per candidate group size, on a
    sample of expert matrices spread over the depth of the model."""
    stacks = [t for t in tensors if tensor_class(t.name) == "routed_experts"]
    if not stacks:
        return {}
    pick = [
        stacks[round(i * (len(stacks) - 1) / max(max_tensors - 1, 1))] for i in range(max_tensors)
    ]
    pick = list({t.name: t for t in pick}.values())
    errs: dict[int, ErrorAccumulator] = {}
    for t in pick:
        n = len(t.entries)
        for e in sorted(
            {round(i * (n - 1) / max(samples_per_tensor - 1, 1)) for i in range(samples_per_tensor)}
        ):
            w = mx.array(read_float(t, e))
            imp = calibration.importance(t.name, e, w.shape[1])
            for g in GROUP_CANDIDATES:
                if w.shape[1] % g:
                    continue
                errs.setdefault(g, ErrorAccumulator()).add(affine_quantize(w, bits, g, imp))
    return {g: acc.weighted_rel for g, acc in sorted(errs.items())}


def choose_group_size(
    tensors: list[SourceTensor], tier: str, measured: dict[int, float]
) -> tuple[int, dict[int, dict[str, float]]]:
    """Lowest measured error among the group sizes whose output meets the tier's size target."""
    table: dict[int, dict[str, float]] = {}
    target = TIER_TARGET_GIB[tier] * GIB
    best = None
    for g in GROUP_CANDIDATES:
        if g not in measured and measured:
            continue
        size = plan_bytes(build_plan(tensors, tier, g))
        table[g] = {"size_gib": size / GIB, "weighted_rel_err": measured.get(g, float("nan"))}
        if size <= target:
            key = (measured.get(g, 0.0), -g) if measured else (g > 64, g)
            if best is None or key < best[0]:
                best = (key, g)
    if best is None:
        sizes = ", ".join(f"g{g}: {v['size_gib']:.1f} GiB" for g, v in table.items())
        raise ConvertError(
            f"no group size brings tier {tier} under its {TIER_TARGET_GIB[tier]:.0f} GiB target ({sizes})"
        )
    return best[1], table


# --------------------------------------------------------------------------------------------
# Conversion
# --------------------------------------------------------------------------------------------


def source_identity(src: Path, ckpt: Checkpoint) -> dict[str, Any]:
    """Cheap identity of a checkpoint: shard names and sizes + the config (no full hashing)."""
    shards = {p.name: p.stat().st_size for p in ckpt.shards}
    cfg = src / "config.json"
    return {
        "kind": "official",
        "shards": shards,
        "config_xxh3": _xxh(cfg.read_bytes()) if cfg.is_file() else None,
    }


def _xxh(b: bytes) -> str:
    import xxhash

    return xxhash.xxh3_128_hexdigest(b)


@dataclass
class ConvertOptions:
    tier: str
    group_size: int | None = None  # q2/q3 only; None = choose by measurement
    calibration: str | Path | None = None
    shard_bytes: int = DEFAULT_SHARD_BYTES
    overwrite: bool = False
    search: bool = True  # importance-weighted scale search (False: plain round-to-nearest)
    include_mtp: bool = True  # the MTP block (≈ 2 GiB at q2) is optional for plain decoding


@dataclass
class ConvertResult:
    write: WriteReport
    plan: list[PlannedTensor]
    group_size: int | None
    group_table: dict[int, dict[str, float]]
    errors: dict[str, dict[str, Any]]
    seconds: float


class OfficialConverter:
    """Official checkpoint directory → MLX tier. Use `plan()` to inspect, `run()` to convert."""

    def __init__(self, src: str | Path, options: ConvertOptions) -> None:
        self.src = Path(src)
        if options.tier not in TIERS:
            raise ConvertError(f"unknown tier {options.tier!r}; choose one of {', '.join(TIERS)}")
        self.options = options
        self.ckpt = Checkpoint(self.src)
        cfg_path = self.src / "config.json"
        if not cfg_path.is_file():
            raise ConvertError(f"{self.src}: no config.json; point at the checkpoint directory")
        self.config = json.loads(cfg_path.read_text())
        if "ds4_mlx" in self.config:
            raise ConvertError(
                f"{self.src} is already a converted MLX tier ({self.config['ds4_mlx'].get('tier')}); "
                "convert from the official checkpoint or a ds4 .gguf file"
            )
        if self.config.get("model_type") != "deepseek_v4":
            raise ConvertError(
                f"{cfg_path}: model_type {self.config.get('model_type')!r} is not deepseek_v4"
            )
        self.tensors = source_tensors(self.ckpt.entries)
        if not options.include_mtp:
            self.tensors = [t for t in self.tensors if not t.name.startswith("mtp.")]
            self.config = {**self.config, "num_nextn_predict_layers": 0}
        self.by_name = {t.name: t for t in self.tensors}
        self.calibration = Calibration(options.calibration)
        self.group_size: int | None = None
        self.group_table: dict[int, dict[str, float]] = {}
        self.stats: dict[str, dict[str, float]] = {}

    def resolve_group_size(
        self, log: Callable[[str], None] = lambda s: None, out_dir: str | Path | None = None
    ) -> int:
        """The q2/q3 expert group size: forced by the options, else measured (once). When
        `out_dir` holds an interrupted conversion made with one of the candidates, that one is
        kept so the run resumes instead of being refused as a different conversion."""
        tier = self.options.tier
        if tier not in EXPERT_BITS:
            return 32
        if self.group_size is not None:
            return self.group_size
        if self.options.group_size:
            g = self.options.group_size
            if g not in GROUP_CANDIDATES:
                raise ConvertError(f"--group-size must be one of {GROUP_CANDIDATES}")
            self.group_size = g
            return g
        log("measuring the re-quantization error per group size on sampled experts…")
        measured = measure_groups(self.tensors, EXPERT_BITS[tier], self.calibration)
        g, self.group_table = choose_group_size(self.tensors, tier, measured)
        previous = existing_fingerprint(Path(out_dir)) if out_dir is not None else None
        if previous is not None:
            for cand in self.group_table:
                self.group_size = cand
                if plan_fingerprint(self.plan(), self.config, tier, self.source()) == previous:
                    if cand != g:
                        log(
                            f"resuming the earlier conversion's group size {cand} (measured best: {g})"
                        )
                    g = cand
                    break
        self.group_size = g
        return g

    def source(self) -> dict[str, Any]:
        """JSON identity of the input and of every option that changes the output."""
        src = source_identity(self.src, self.ckpt)
        cal = self.options.calibration
        src["calibration"] = _xxh(Path(cal).read_bytes()) if cal else None
        src["search"] = self.options.search
        src["mtp"] = self.options.include_mtp
        return src

    def plan(self) -> list[PlannedTensor]:
        return build_plan(self.tensors, self.options.tier, self.group_size or 64)

    def produce(self, name: str) -> Weight:
        t = self.by_name[name]
        fmt = target_format(t, self.options.tier, self.group_size or 64)
        stacked = tensor_class(name) == "routed_experts" and len(t.shape) == 3
        indices = range(len(t.entries)) if stacked else [0]
        if fmt.mode is None:
            parts: list[Weight] = [
                _exact_mx(t, i, fmt) if t.kind == "int" else _plain_mx(t, i, fmt) for i in indices
            ]
            return _stack(parts) if stacked else parts[0]
        if fmt.mode in ("mxfp4", "mxfp8"):
            want = {"mxfp4": "fp4", "mxfp8": "fp8"}[fmt.mode]
            if t.kind != want:
                raise ConvertError(f"{name}: cannot map {t.kind} to {fmt.label} exactly")
            parts = [_exact_mx(t, i, fmt) for i in indices]
            return _stack(parts) if stacked else parts[0]
        # affine re-quantization (q2/q3 experts, 8-bit head)
        acc = ErrorAccumulator()
        outs: list[QuantizedTensor] = []
        for i in indices:
            q = self._quantize_one(t, i if stacked else None, fmt, acc)
            outs.append(q)
        self.stats[name] = acc.to_json()
        return stack_quantized(outs) if stacked else outs[0]

    def _quantize_one(
        self, t: SourceTensor, expert: int | None, fmt: TensorFormat, acc: ErrorAccumulator
    ) -> QuantizedTensor:
        index = expert or 0
        rows, cols = t.shape[-2:]
        imp = self.calibration.importance(t.name, expert, cols)
        if rows <= CHUNK_ROWS:
            r = affine_quantize(
                mx.array(read_float(t, index)),
                fmt.bits,
                fmt.group_size,
                imp,
                search=self.options.search,
            )
            acc.add(r)
            return r.tensor
        # Big matrix: one pass for the column-energy importance, then row blocks. Per-group
        # quantization is row-local, so the blocks give the same result as the whole matrix.
        if imp is None:
            energy = np.zeros(cols, dtype=np.float64)
            for r0 in range(0, rows, CHUNK_ROWS):
                blk = read_float_rows(t, index, r0, min(r0 + CHUNK_ROWS, rows))
                energy += np.square(blk, dtype=np.float64).sum(0)
            imp = mx.array(energy.astype(np.float32))
        parts = []
        for r0 in range(0, rows, CHUNK_ROWS):
            blk = mx.array(read_float_rows(t, index, r0, min(r0 + CHUNK_ROWS, rows)))
            r = affine_quantize(blk, fmt.bits, fmt.group_size, imp, search=self.options.search)
            acc.add(r)
            parts.append(r.tensor)
        return QuantizedTensor(
            mx.concatenate([p.weight for p in parts]),
            mx.concatenate([p.scales for p in parts]),
            mx.concatenate([p.biases for p in parts]),  # type: ignore[misc]
            "affine",
            fmt.bits,
            fmt.group_size,
        )

    def run(
        self,
        out_dir: str | Path,
        progress: Callable[[str, int, int], None] | None = None,
        log: Callable[[str], None] = lambda s: None,
    ) -> ConvertResult:
        t0 = time.monotonic()
        self.resolve_group_size(log, out_dir)
        plan = self.plan()
        source = self.source()
        copy = [self.src / f for f in TOKENIZER_FILES if (self.src / f).is_file()]
        all_stats: dict[str, dict[str, float]] = {}

        def report(stats: dict[str, dict[str, float]]) -> dict[str, Any]:
            all_stats.update(stats)
            return {
                "group_size": self.group_size,
                "group_measurement": {str(g): v for g, v in self.group_table.items()},
                "errors": summarize_errors(plan, stats),
            }

        wr = write_tier(
            out_dir,
            plan,
            self.produce,
            config=self.config,
            tier=self.options.tier,
            source=source,
            copy_files=copy,
            shard_bytes=self.options.shard_bytes,
            overwrite=self.options.overwrite,
            progress=progress,
            tensor_stats=lambda name: self.stats.pop(name, None),
            stats_report=report,
        )
        return ConvertResult(
            wr,
            plan,
            self.group_size,
            self.group_table,
            summarize_errors(plan, all_stats),
            time.monotonic() - t0,
        )


def _plain_mx(t: SourceTensor, index: int, fmt: TensorFormat) -> mx.array:
    e = t.entries[index]
    raw = np.ascontiguousarray(read_numpy(e))
    if e.dtype == "BF16":
        arr = mx.view(mx.array(raw), mx.bfloat16)
    else:
        arr = mx.array(raw)
    want = getattr(mx, fmt.dtype)
    return arr if arr.dtype == want else arr.astype(want)


def _stack(parts: list[Weight]) -> Weight:
    if isinstance(parts[0], QuantizedTensor):
        return stack_quantized(parts)  # type: ignore[arg-type]
    return mx.stack(parts)  # type: ignore[arg-type]
