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
    errors: dict[str, gq.ErrorStats] = {}
    exact: dict[str, bool] = {}

    def produce(name: str) -> Any:
        c = src.convert(name, targets[name], quantizer=quantizer)
        cls = tensor_class(name)
        errors.setdefault(cls, gq.ErrorStats()).merge(c.error)
        exact[cls] = exact.get(cls, True) and c.exact
        return c.to_weight()

    def report() -> dict[str, Any]:
        # Classes whose shards were reused on a resume were not re-measured this run.
        return {
            "gguf": {
                cls: {"exact": exact[cls], "rel_error": e.rel, "max_abs_error": e.max_abs}
                for cls, e in sorted(errors.items())
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
        report=report,
        **kwargs,
    )


def planned_bytes(path: str | Path, tier: str, requant_group: int = REQUANT_GROUP) -> int:
    """Output size of a tier from this file (shapes only, nothing is read)."""
    plan, _ = gguf_plan(GGUFSource(path), tier, requant_group)
    return sum(t.nbytes for t in plan)
