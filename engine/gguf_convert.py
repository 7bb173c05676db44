"""Convert a ds4 GGUF file into an MLX tier directory through the shared tier writer.

`convert_gguf(path, out_dir, tier)` plans every tensor of the file (official names, formats
from `gguf_source.default_target`), then lets `mlx_format.write_tier` produce the shards —
resumable, atomic, with the free-disk check — calling back here for one tensor at a time.
Peak memory: one packed tensor (for expert stacks: the packed stack plus one float32 expert
matrix), never the model. The tokenizer is rebuilt from the GGUF metadata.

Added error is measured on every non-exact tensor and stored per tensor class in the
converted `config.json` (`ds4_mlx.report.gguf`): relative Frobenius error ‖Ŵ − W‖/‖W‖ of the
MLX weights against the GGUF's own dequantized values, and the max absolute error.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ds4_agent.engine import gguf_quants as gq
from ds4_agent.engine.gguf_source import (
    REQUANT_GROUP,
    GGUFSource,
    TargetSpec,
    default_target,
    tensor_class,
)


def _fmt(target: TargetSpec) -> Any:
    from ds4_agent.engine.mlx_format import TensorFormat

    if target.kind == "plain":
        return TensorFormat(dtype=target.dtype)
    return TensorFormat("affine", target.bits, target.group_size, scale_dtype=target.scale_dtype)


def gguf_plan(
    src: GGUFSource, tier: str, requant_group: int = REQUANT_GROUP
) -> tuple[list[Any], dict[str, TargetSpec]]:
    """(writer plan, official name → target) for every tensor of the file."""
    from ds4_agent.engine.mlx_format import PlannedTensor

    plan, targets = [], {}
    for t in src.tensors():
        target = default_target(t, tier, requant_group)
        targets[t.name] = target
        plan.append(PlannedTensor(t.name, t.shape, _fmt(target), tensor_class(t.name)))
    return plan, targets


def convert_gguf(
    path: str | Path | GGUFSource,
    out_dir: str | Path,
    tier: str,
    *,
    requant_group: int = REQUANT_GROUP,
    quantizer: gq.Quantizer | None = None,
    overwrite: bool = False,
    progress: Callable[[str, int, int], None] | None = None,
    shard_bytes: int | None = None,
) -> Any:
    """Write (or resume) the MLX tier; returns the writer's `WriteReport`."""
    import mlx.core as mx
    from ds4_agent.engine import mlx_format

    # An open source can be passed in: opening parses all metadata (≈ 257k tokenizer
    # strings in ds4's files), which takes seconds.
    src = path if isinstance(path, GGUFSource) else GGUFSource(path)
    path = src.path
    plan, targets = gguf_plan(src, tier, requant_group)
    stats: dict[str, dict[str, Any]] = {}

    def produce(name: str) -> Any:
        # Buffers MLX freed since the last tensor (the previous shard's arrays) would
        # otherwise stay in its cache and add up; release them.
        mx.clear_cache()
        c = src.convert(name, targets[name], quantizer=quantizer)
        e = c.error
        stats[name] = {
            "class": tensor_class(name),
            "exact": c.exact,
            "sq_err": e.sq_err,
            "sq_ref": e.sq_ref,
            "max_abs": e.max_abs,
        }
        return c.to_weight()

    def report(per_tensor: dict[str, Any]) -> dict[str, Any]:
        # The writer keeps each tensor's stats with its shard, so a resumed conversion still
        # reports every tensor, including those of shards written by an earlier run.
        by_class: dict[str, tuple[gq.ErrorStats, bool]] = {}
        for st in per_tensor.values():
            acc, exact = by_class.get(st["class"], (gq.ErrorStats(), True))
            acc.merge(gq.ErrorStats(st["sq_err"], st["sq_ref"], st["max_abs"]))
            by_class[st["class"]] = (acc, exact and st["exact"])
        return {
            "gguf": {
                cls: {"exact": ex, "rel_error": acc.rel, "max_abs_error": acc.max_abs}
                for cls, (acc, ex) in sorted(by_class.items())
            }
        }

    tok = src.tokenizer_files()
    source = {
        "format": "gguf",
        "file": Path(path).name,
        "size": Path(path).stat().st_size,
        "requant_group": requant_group,
    }
    kwargs: dict[str, Any] = {}
    if shard_bytes is not None:
        kwargs["shard_bytes"] = shard_bytes
    sources = {name: (src.info(name).qtype, tg) for name, tg in targets.items()}
    bound = peak_ram_bound(plan, sources, shard_bytes, src.threads)
    report_ = mlx_format.write_tier(
        out_dir,
        plan,
        produce,
        config=src.config(),
        tier=tier,
        source=source,
        extra_files={k: json.dumps(v, ensure_ascii=False).encode() for k, v in tok.items()},
        overwrite=overwrite,
        progress=progress,
        tensor_stats=lambda name: stats.pop(name, None),
        stats_report=report,
        **kwargs,
    )
    report_.extra["peak_ram_bound"] = bound
    return report_


def dry_run(
    path: str | Path | GGUFSource,
    tier: str,
    requant_group: int = REQUANT_GROUP,
    shard_bytes: int | None = None,
) -> dict[str, Any]:
    """Sizes of converting an actual GGUF file (shapes only): output bytes, per-class summary
    and the converter's peak-RAM bound."""
    from ds4_agent.engine.mlx_format import class_summary

    src = path if isinstance(path, GGUFSource) else GGUFSource(path)
    plan, targets = gguf_plan(src, tier, requant_group)
    sources = {name: (src.info(name).qtype, tg) for name, tg in targets.items()}
    return {
        "gguf_bytes": sum(t.nbytes for t in src.tensors()),
        "mlx_bytes": sum(t.nbytes for t in plan),
        "classes": class_summary(plan),
        "peak_ram": peak_ram_bound(plan, sources, shard_bytes, src.threads),
    }


def planned_bytes(
    path: str | Path | GGUFSource, tier: str, requant_group: int = REQUANT_GROUP
) -> int:
    """Output size of a tier from this file (shapes only, nothing is read)."""
    src = path if isinstance(path, GGUFSource) else GGUFSource(path)
    plan, _ = gguf_plan(src, tier, requant_group)
    return sum(t.nbytes for t in plan)


# ds4's per-tensor ggml types (engine-spec §4.1); experts depend on the file.
_DS4_FLOAT_TYPES = (
    (".ffn.shared_experts.", "Q8_0"),
    (".attn.wq_a.", "Q8_0"),
    (".attn.wq_b.", "Q8_0"),
    (".attn.wkv.", "Q8_0"),
    (".attn.wo_a.", "Q8_0"),
    (".attn.wo_b.", "Q8_0"),
    ("head.weight", "Q8_0"),
)


def peak_ram_bound(
    plan: list[Any],
    sources: dict[str, tuple[str, TargetSpec]],
    shard_bytes: int | None = None,
    threads: int = 4,
) -> int:
    """Upper bound of the GGUF converter's working memory (the memory-mapped source's page
    cache excluded), independent of the number of layers or experts:

    - the shard being assembled (≤ shard_bytes, or one tensor when larger);
    - the tensor being produced twice over (numpy arrays + their MLX copy);
    - decoding temporaries of the costliest tensor: per item (one expert of a stack, `threads`
      at once, or a whole other matrix) ~4 B/value for the exact Q8_0/Q4_K maps, ~24 B/value
      (six float32 copies) when values are dequantized for re-quantization or measurement,
      plus ~32 B/value for the one item the calling thread re-quantizes and measures in MLX.
    `sources`: official name → (ggml type, target).
    """
    from ds4_agent.engine.mlx_format import DEFAULT_SHARD_BYTES

    shard = DEFAULT_SHARD_BYTES if shard_bytes is None else shard_bytes
    largest = max((t.nbytes for t in plan), default=0)
    work = 0
    for t in plan:
        qtype, target = sources[t.name]
        if target.kind == "plain" and (qtype, target.dtype) in (
            ("F32", "float32"),
            ("F16", "float16"),
            ("I32", "int32"),
        ):
            continue  # copied as stored
        stacked = ".ffn.experts." in t.name
        item = 1
        for d in t.shape[1:] if stacked else t.shape:
            item *= d
        exact_map = (
            target.kind == "affine"
            and (
                (qtype == "Q8_0" and target.bits == 8)
                or (qtype == "Q4_K" and target.bits == 4 and target.scale_dtype == "float32")
            )
            and target.group_size == 32
        )
        decode = (4 if exact_map else 24) * (threads if stacked else 1)
        # The calling thread meanwhile re-quantizes / measures one item through MLX: its
        # float32 input, MLX's copy and temporaries, the dequantized check (~32 B/value).
        measure = 0 if exact_map else 32
        work = max(work, item * (decode + measure))
    # + a fixed allowance for Python objects (tensor tables, manifests) and allocator slack.
    return max(shard, largest) + 2 * largest + work + (64 << 20)


def flash_gguf_sizes(variant: str, tier: str, requant_group: int = REQUANT_GROUP) -> dict[str, int]:
    """Dry run for ds4's real Flash file: {"gguf": its tensor bytes, "mlx": the tier's bytes,
    "peak_ram": the converter's working-memory bound}.

    Shapes come from the published Flash tensor list (no data read). The MTP block lives in a
    separate GGUF file, so it is left out of both figures.
    """
    from ds4_agent.engine.gguf_source import SourceTensor
    from ds4_agent.engine.mlx_format import PlannedTensor, stored_bytes

    gguf_bytes = mlx_bytes = 0
    plan = []
    sources: dict[str, tuple[str, TargetSpec]] = {}
    for t in _flash_tensors():
        if t.name.startswith("mtp."):
            continue
        qtype = _flash_type(t, variant)
        block, nbytes = gq.BLOCK_LAYOUT[qtype]
        n = 1
        for d in t.shape:
            n *= d
        gguf_bytes += n // block * nbytes
        st = SourceTensor(t.name, "", t.shape, qtype, n // block * nbytes)
        target = default_target(st, tier, requant_group)
        fmt = _fmt(target)
        mlx_bytes += stored_bytes(t.shape, fmt)
        plan.append(PlannedTensor(t.name, t.shape, fmt, tensor_class(t.name)))
        sources[t.name] = (qtype, target)
    return {"gguf": gguf_bytes, "mlx": mlx_bytes, "peak_ram": peak_ram_bound(plan, sources)}


@functools.lru_cache(maxsize=1)
def _flash_tensors() -> tuple[Any, ...]:
    from ds4_agent.engine import convert as cv
    from ds4_agent.engine.convert_sizes import flash_entries

    return tuple(cv.source_tensors(flash_entries()))


def _flash_type(t: Any, variant: str) -> str:
    if ".ffn.experts." in t.name:
        if variant == "q4":
            return "Q4_K"
        return "Q2_K" if t.name.endswith("w2.weight") else "IQ2_XXS"
    if t.kind == "int":
        return "I32"
    for key, qtype in _DS4_FLOAT_TYPES:
        if key in t.name:
            return qtype
    return "F32" if len(t.shape) == 1 else "F16"
