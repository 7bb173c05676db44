"""Load model weights into `dict[str, Weight]` keyed by official checkpoint names.

`load_weights(model_dir)` reads either

* the official checkpoint (sharded safetensors + `model.safetensors.index.json`, engine-spec
  §4.1), mapping its formats to MLX without any rounding (spec §4.4):
  - FP8 e4m3 matrices (`F8_E4M3` + `F8_E8M0` 128×128 block scales in `<stem>.scale`) →
    `QuantizedTensor(mode="mxfp8", group 32)`: the weight bytes are reinterpreted as uint32 and
    each block scale is repeated over its 128 rows and its 4 column groups of 32;
  - FP4 e2m1 routed experts (`I8 [out, in/2]`, two codes per byte, low nibble first, +
    `F8_E8M0 [out, in/32]`) → `QuantizedTensor(mode="mxfp4", group 32)` by reinterpreting the
    bytes as uint32 (zero-copy layout: MLX packs the first element in the lowest nibble too),
    stacked per projection: `layers.L.ffn.experts.w1.weight` → [n_experts, out, in/8];
  - BF16 / F32 tensors unchanged; `tid2eid` (I64) → int32;
* or a directory written by the converter (`ds4_mlx` section in `config.json`, see
  `mlx_format`), whose per-tensor quantization map says how to rebuild each `QuantizedTensor`.

Arrays are lazy: `mx.load` only records where each tensor lives and reads it (pread, no full
copy of the file in Python) when the array is first evaluated; the stacking and scale expansion
are part of the same lazy graph. Evaluate with `materialize()` to bound peak memory to about
one layer's worth of temporaries, instead of `mx.eval` on everything at once.
"""

from __future__ import annotations

import json
import re
import struct
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import numpy as np
from ds4_agent.engine.qtensor import QuantizedTensor, Weight

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
FP8_BLOCK = 128
MX_GROUP = 32

_EXPERT = re.compile(r"^(?P<prefix>.*\.ffn\.experts)\.(?P<e>\d+)\.(?P<w>w[123])\.weight$")


class WeightsError(ValueError):
    """The weights cannot be loaded; the message names the file/tensor and the fix."""


# --------------------------------------------------------------------------------------------
# Raw safetensors access (header only; numpy memmaps for host-side readers like the converter)
# --------------------------------------------------------------------------------------------

_ST_NUMPY = {
    "F64": np.float64,
    "F32": np.float32,
    "F16": np.float16,
    "BF16": np.uint16,  # numpy has no bf16: raw bits
    "I64": np.int64,
    "I32": np.int32,
    "I16": np.int16,
    "I8": np.int8,
    "U8": np.uint8,
    "U16": np.uint16,
    "U32": np.uint32,
    "BOOL": np.bool_,
    "F8_E4M3": np.uint8,  # raw codes (safetensors' numpy API refuses F8 dtypes)
    "F8_E8M0": np.uint8,
}


@dataclass(frozen=True)
class TensorEntry:
    name: str
    dtype: str  # safetensors dtype string
    shape: tuple[int, ...]
    file: Path
    begin: int  # absolute byte offset in the file
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


def read_safetensors_header(path: Path) -> dict[str, TensorEntry]:
    path = Path(path)
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise WeightsError(f"{path}: truncated safetensors file (no header); re-download it")
        (n,) = struct.unpack("<Q", raw)
        if n > 100_000_000:
            raise WeightsError(f"{path}: not a safetensors file (header length {n})")
        try:
            header = json.loads(f.read(n))
        except json.JSONDecodeError as e:
            raise WeightsError(f"{path}: corrupt safetensors header ({e}); re-download it") from e
    size = path.stat().st_size
    out: dict[str, TensorEntry] = {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        a, b = meta["data_offsets"]
        entry = TensorEntry(name, meta["dtype"], tuple(meta["shape"]), path, 8 + n + a, 8 + n + b)
        if entry.end > size:
            raise WeightsError(
                f"{path}: tensor {name} ends at byte {entry.end} but the file has {size} bytes "
                "(truncated download?)"
            )
        out[name] = entry
    return out


def read_numpy(entry: TensorEntry) -> np.ndarray:
    """The tensor's raw payload as a read-only numpy memmap (BF16 → uint16 bits, F8 → uint8)."""
    dt = _ST_NUMPY.get(entry.dtype)
    if dt is None:
        raise WeightsError(f"{entry.file}: tensor {entry.name} has unsupported dtype {entry.dtype}")
    count = int(np.prod(entry.shape)) if entry.shape else 1
    if count == 0:
        return np.zeros(entry.shape, dtype=dt)
    return np.memmap(entry.file, dtype=dt, mode="r", offset=entry.begin, shape=(count,)).reshape(
        entry.shape
    )


def bf16_bits_to_f32(bits: np.ndarray) -> np.ndarray:
    return (np.asarray(bits, dtype=np.uint16).astype(np.uint32) << 16).view(np.float32)


class Checkpoint:
    """An official-format checkpoint directory: where every tensor lives, read on demand."""

    def __init__(self, model_dir: str | Path) -> None:
        self.dir = Path(model_dir)
        if not self.dir.is_dir():
            raise WeightsError(f"{self.dir}: no such model directory")
        index = self.dir / INDEX_FILE
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as e:
                raise WeightsError(f"{index}: not a safetensors index ({e})") from e
            shards = sorted(set(weight_map.values()))
        elif (self.dir / SINGLE_FILE).is_file():
            shards = [SINGLE_FILE]
        else:
            raise WeightsError(
                f"{self.dir}: no {INDEX_FILE} or {SINGLE_FILE}; point at the directory that "
                "holds the model's safetensors shards"
            )
        self.shards = [self.dir / s for s in shards]
        for s in self.shards:
            if not s.is_file():
                raise WeightsError(f"{s}: shard listed in the index is missing; re-download it")
        self.entries: dict[str, TensorEntry] = {}
        for s in self.shards:
            self.entries.update(read_safetensors_header(s))

    def __contains__(self, name: str) -> bool:
        return name in self.entries

    def names(self) -> list[str]:
        return list(self.entries)


# --------------------------------------------------------------------------------------------
# Official checkpoint → MLX weights
# --------------------------------------------------------------------------------------------


def _scale_name(weight_name: str) -> str:
    if not weight_name.endswith(".weight"):
        raise WeightsError(f"quantized tensor {weight_name} does not end in .weight")
    return weight_name[: -len(".weight")] + ".scale"


def fp8_to_mxfp8(codes: mx.array, block_scales: mx.array) -> QuantizedTensor:
    """F8_E4M3 [out, in] (uint8 codes) + e8m0 [⌈out/128⌉, ⌈in/128⌉] → mxfp8, exactly."""
    out_f, in_f = codes.shape
    if in_f % MX_GROUP:
        raise WeightsError(
            f"FP8 matrix with {in_f} columns cannot map to mxfp8 (needs a multiple of 32)"
        )
    rows = mx.repeat(block_scales, FP8_BLOCK, axis=0)[:out_f]
    scales = mx.repeat(rows, FP8_BLOCK // MX_GROUP, axis=1)[:, : in_f // MX_GROUP]
    return QuantizedTensor(
        weight=mx.view(codes, mx.uint32),
        scales=scales,
        biases=None,
        mode="mxfp8",
        bits=8,
        group_size=MX_GROUP,
    )


def fp4_to_mxfp4(packed: mx.array, scales: mx.array) -> QuantizedTensor:
    """I8 [..., out, in/2] (two e2m1 per byte, low nibble first) + e8m0 [..., out, in/32]."""
    if packed.shape[-1] % 4:
        raise WeightsError("FP4 row of packed width not a multiple of 4 bytes cannot map to mxfp4")
    return QuantizedTensor(
        weight=mx.view(packed, mx.uint32),
        scales=scales.astype(mx.uint8) if scales.dtype != mx.uint8 else scales,
        biases=None,
        mode="mxfp4",
        bits=4,
        group_size=MX_GROUP,
    )


def _stack_weights(parts: list[Weight], name: str) -> Weight:
    first = parts[0]
    if isinstance(first, QuantizedTensor):
        if not all(isinstance(p, QuantizedTensor) and p.mode == first.mode for p in parts):
            raise WeightsError(f"{name}: experts are stored in mixed formats")
        return QuantizedTensor(
            weight=mx.stack([p.weight for p in parts]),  # type: ignore[union-attr]
            scales=mx.stack([p.scales for p in parts]),  # type: ignore[union-attr]
            biases=None if first.biases is None else mx.stack([p.biases for p in parts]),  # type: ignore[union-attr]
            mode=first.mode,
            bits=first.bits,
            group_size=first.group_size,
        )
    return mx.stack(parts)  # type: ignore[arg-type]


def load_official(model_dir: str | Path) -> dict[str, Weight]:
    """The official checkpoint format → lazy MLX weights (see module docstring)."""
    ckpt = Checkpoint(model_dir)
    lazy: dict[str, mx.array] = {}
    for shard in ckpt.shards:
        try:
            lazy.update(mx.load(str(shard)))  # type: ignore[arg-type]
        except (RuntimeError, ValueError) as e:
            raise WeightsError(f"{shard}: MLX cannot read this safetensors file ({e})") from e
    out: dict[str, Weight] = {}
    experts: dict[str, dict[int, Weight]] = {}
    for name, entry in ckpt.entries.items():
        if entry.dtype == "F8_E8M0":
            continue  # consumed with its weight
        if name.endswith(".scale") and entry.dtype in ("F32", "BF16", "F16") and entry.shape:
            weight = name[: -len(".scale")] + ".weight"
            if weight in ckpt.entries and ckpt.entries[weight].dtype in ("F8_E4M3", "I8", "U8"):
                raise WeightsError(
                    f"{model_dir}: {name} is {entry.dtype}; this loader maps only the DeepSeek V4 "
                    "release's F8_E8M0 (power-of-two) block scales to MLX without rounding"
                )
        arr = lazy[name]
        w: Weight
        if entry.dtype == "F8_E4M3":
            sname = _scale_name(name)
            if sname not in ckpt.entries:
                raise WeightsError(f"{model_dir}: FP8 tensor {name} has no {sname}")
            w = fp8_to_mxfp8(arr, lazy[sname])
        elif entry.dtype in ("I8", "U8") and _scale_name(name) in ckpt.entries:
            w = fp4_to_mxfp4(arr, lazy[_scale_name(name)])
        elif entry.dtype in ("I64", "I32"):
            w = arr.astype(mx.int32)
        else:
            w = arr
        m = _EXPERT.match(name)
        if m:
            key = f"{m['prefix']}.{m['w']}.weight"
            experts.setdefault(key, {})[int(m["e"])] = w
        else:
            out[name] = w
    for key, parts in experts.items():
        n = max(parts) + 1
        missing = [e for e in range(n) if e not in parts]
        if missing:
            raise WeightsError(f"{model_dir}: {key} lacks experts {missing[:8]}")
        out[key] = _stack_weights([parts[e] for e in range(n)], key)
    return out


# --------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------


def is_converted_dir(model_dir: str | Path) -> bool:
    cfg = Path(model_dir) / "config.json"
    if not cfg.is_file():
        return False
    try:
        return "ds4_mlx" in json.loads(cfg.read_text())
    except json.JSONDecodeError:
        return False


def load_weights(
    model_dir: str | Path, *, context_tokens: int = 4096, check_memory: bool = True
) -> dict[str, Weight]:
    """All weights of a model directory, keyed by official names, lazily (see module doc).

    Dispatches on `config.json`: a `ds4_mlx` section means a converted MLX tier. Before
    anything is read, the weights plus `context_tokens` of decode state are compared with this
    machine's memory (`convert_sizes.check_memory_fit`); a model that cannot fit raises
    `InsufficientMemoryError` with a one-line explanation instead of swapping the machine to a
    halt. `DS4_SKIP_MEMORY_CHECK=1` (or `check_memory=False`) skips the check.
    """
    if check_memory and (Path(model_dir) / "config.json").is_file():
        from ds4_agent.engine.convert_sizes import check_memory_fit

        check_memory_fit(model_dir, context_tokens)
    if is_converted_dir(model_dir):
        from ds4_agent.engine import mlx_format

        return mlx_format.load_converted(model_dir)
    return load_official(model_dir)


def _arrays(w: Weight) -> Iterator[mx.array]:
    if isinstance(w, QuantizedTensor):
        yield w.weight
        yield w.scales
        if w.biases is not None:
            yield w.biases
    else:
        yield w


def materialize(weights: dict[str, Weight], group_key: re.Pattern[str] | None = None) -> None:
    """Evaluate lazy weights one group (layer) at a time, replacing them by their values, so the
    peak temporary memory is one layer's loads instead of the whole model's."""
    pat = group_key or re.compile(r"^(?:layers|mtp)\.\d+\.")
    groups: dict[str, list[str]] = {}
    for name in weights:
        m = pat.match(name)
        groups.setdefault(m.group(0) if m else "", []).append(name)
    for names in groups.values():
        mx.eval([a for n in names for a in _arrays(weights[n])])


def weight_nbytes(weights: Iterable[Weight]) -> int:
    return sum(a.nbytes for w in weights for a in _arrays(w))
