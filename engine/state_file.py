"""A single-file `.npz` container for one `StateExport` (used by `ds4-agent debug logits`).

This is a plain, uncompressed debugging format — the session snapshot store (`sessions/`) is the
real on-disk format. The file records the engine fingerprint, and loading checks it, because a
state is only meaningful for the weights and numerics that computed it.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from ds4_agent.engine.atomic_io import PRIVATE_MODE, atomic_open, fsync_dir
from ds4_agent.engine.state_export import LayerExport, StateExport

FORMAT = "ds4-state-npz/1"


class StateFileError(ValueError):
    """The state file is missing, damaged, or belongs to another model."""


def save_state(path: str | Path, ex: StateExport, fingerprint: str) -> None:
    """Write atomically: temp file in the same directory, fsync, rename, fsync the directory."""
    path = Path(path)
    arrays: dict[str, np.ndarray] = {"tokens": np.asarray(ex.tokens, dtype=np.int32)}
    layers = []
    for i, le in enumerate(ex.layers):
        arrays[f"l{i}.raw"] = le.raw
        if le.comp is not None:
            arrays[f"l{i}.comp"] = le.comp
        if le.index is not None:
            arrays[f"l{i}.index"] = le.index
        for k, v in le.frontiers.items():
            arrays[f"l{i}.f.{k}"] = v
        layers.append({"kind": le.kind, "ratio": le.ratio, "frontiers": sorted(le.frontiers)})
    if ex.logits is not None:
        arrays["logits"] = ex.logits
    for k, v in (ex.mtp or {}).items():
        arrays[f"mtp.{k}"] = v
    meta = {
        "format": FORMAT,
        "fingerprint": fingerprint,
        "n_tokens": ex.n_tokens,
        "numerics": ex.numerics,
        "layers": layers,
    }
    arrays["meta"] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
    # PRIVATE_MODE: state files have always been 0600 (tempfile.mkstemp); no parent creation
    # and a strict directory fsync, as before.
    with atomic_open(path, mode=PRIVATE_MODE, parents=False, sync_dir=False) as f:
        np.savez(f, **arrays)
    fsync_dir(path.parent, strict=True)


def load_state(path: str | Path, fingerprint: str | None = None) -> StateExport:
    path = Path(path)
    if not path.is_file():
        raise StateFileError(f"{path}: no such state file")
    try:
        with np.load(path, allow_pickle=False) as z:
            data = {k: z[k] for k in z.files}
        meta = json.loads(bytes(data["meta"]).decode())
    except (OSError, ValueError, KeyError) as e:
        raise StateFileError(f"{path}: not a ds4 state file ({e})") from None
    if meta.get("format") != FORMAT:
        raise StateFileError(f"{path}: unknown state format {meta.get('format')!r}")
    if fingerprint is not None and meta["fingerprint"] != fingerprint:
        raise StateFileError(
            f"{path}: saved by a different model or numerics (fingerprint "
            f"{meta['fingerprint'][:12]}…, this engine {fingerprint[:12]}…); "
            "use the same --model and --numerics"
        )
    layers = []
    for i, lm in enumerate(meta["layers"]):
        layers.append(
            LayerExport(
                kind=lm["kind"],
                ratio=lm["ratio"],
                raw=data[f"l{i}.raw"],
                comp=data.get(f"l{i}.comp"),
                index=data.get(f"l{i}.index"),
                frontiers={k: data[f"l{i}.f.{k}"] for k in lm["frontiers"]},
            )
        )
    mtp = {k[4:]: v for k, v in data.items() if k.startswith("mtp.")} or None
    return StateExport(
        n_tokens=int(meta["n_tokens"]),
        tokens=data["tokens"],
        layers=layers,
        numerics=meta["numerics"],
        logits=data.get("logits"),
        mtp=mtp,
    )
