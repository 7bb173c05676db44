"""What a model on disk is: kind, config, parameters, bytes and bits per tensor class.

`describe(path)` handles the three things a user may point at: a converted MLX tier directory
(its `config.json` already carries the per-class summary), an official checkpoint directory
(computed from the safetensors headers, no data read) and a ds4 `.gguf` file (from the GGUF
tensor table).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class ModelInfoError(ValueError):
    """The path is not a model we can describe; the message says what was expected."""


@dataclass
class ModelInfo:
    kind: str  # "converted" | "official" | "gguf"
    config: dict[str, Any]
    params: int
    disk_bytes: int
    weight_bytes: int
    classes: dict[str, dict[str, Any]] = field(default_factory=dict)
    tier: str | None = None


def _dir_bytes(d: Path) -> int:
    return sum(p.stat().st_size for p in d.iterdir() if p.is_file())


_SOURCE_LABEL = {"fp8": "fp8-e4m3 (128×128)", "fp4": "fp4-e2m1 (1×32)"}


def describe(path: Path) -> ModelInfo:
    path = Path(path)
    if path.is_file() and path.suffix == ".gguf":
        return _describe_gguf(path)
    if not path.is_dir():
        raise ModelInfoError(f"{path}: not a model directory or .gguf file")
    cfg_path = path / "config.json"
    if not cfg_path.is_file():
        raise ModelInfoError(f"{path}: no config.json (not a model directory)")
    cfg = json.loads(cfg_path.read_text())
    if "ds4_mlx" in cfg:
        from ds4_agent.engine.convert_sizes import model_weight_bytes

        meta = cfg["ds4_mlx"]
        classes = meta.get("classes", {})
        return ModelInfo(
            "converted",
            cfg,
            sum(c["params"] for c in classes.values()),
            _dir_bytes(path),
            model_weight_bytes(path),
            classes,
            meta.get("tier"),
        )
    from ds4_agent.engine.convert import source_tensors, tensor_class
    from ds4_agent.engine.weights import Checkpoint

    ckpt = Checkpoint(path)
    tensors = source_tensors(ckpt.entries)
    classes: dict[str, dict[str, Any]] = {}
    for t in tensors:
        c = classes.setdefault(tensor_class(t.name), {"params": 0, "bytes": 0, "formats": []})
        n = 1
        for s in t.shape:
            n *= s
        c["params"] += n
        c["bytes"] += sum(e.nbytes for e in t.entries) + sum(e.nbytes for e in t.scales)
        label = _SOURCE_LABEL.get(t.kind, t.dtype.lower())
        if label not in c["formats"]:
            c["formats"].append(label)
    for c in classes.values():
        c["bits_per_weight"] = 8 * c["bytes"] / max(c["params"], 1)
    weight_bytes = sum(p.stat().st_size for p in ckpt.shards)
    return ModelInfo(
        "official",
        cfg,
        sum(c["params"] for c in classes.values()),
        _dir_bytes(path),
        weight_bytes,
        classes,
    )


def _describe_gguf(path: Path) -> ModelInfo:
    from ds4_agent.engine.gguf_source import GGUFSource, tensor_class

    src = GGUFSource(path)
    classes: dict[str, dict[str, Any]] = {}
    for t in src.tensors():
        c = classes.setdefault(tensor_class(t.name), {"params": 0, "bytes": 0, "formats": []})
        n = 1
        for s in t.shape:
            n *= s
        c["params"] += n
        c["bytes"] += t.nbytes
        if t.qtype not in c["formats"]:
            c["formats"].append(t.qtype)
    for c in classes.values():
        c["bits_per_weight"] = 8 * c["bytes"] / max(c["params"], 1)
    size = path.stat().st_size
    return ModelInfo(
        "gguf", src.config(), sum(c["params"] for c in classes.values()), size, size, classes
    )
