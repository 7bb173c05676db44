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
    path: str | Path,
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
    from ds4_agent.engine import mlx_format

    src = GGUFSource(path)
    plan, targets = gguf_plan(src, tier, requant_group)
    stats: dict[str, dict[str, Any]] = {}

    def produce(name: str) -> Any:
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
    return mlx_format.write_tier(
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


def planned_bytes(path: str | Path, tier: str, requant_group: int = REQUANT_GROUP) -> int:
    """Output size of a tier from this file (shapes only, nothing is read)."""
    plan, _ = gguf_plan(GGUFSource(path), tier, requant_group)
    return sum(t.nbytes for t in plan)
