"""Where the server's prefix snapshots go: the sessions KV store when it is available.

`open_backend` returns an object with `save(state) -> key`, `load(key) -> state | None` and
`remove(key)`. It uses the content-addressed snapshot store from `sessions/` (shared segments,
checksums, disk budget). If that store cannot be imported, a plain fallback writes one
self-contained `.npz` per snapshot (atomic, fingerprint-checked, oldest evicted first under
the budget) so the server still survives restarts.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
from ds4_agent.agent.server_replay import atomic_write_bytes

log = logging.getLogger("ds4_agent.server")


class StoreBackend:
    """Adapter over `sessions` SnapshotStore (save/load/remove by key)."""

    def __init__(self, engine: Any, store: Any) -> None:
        self.engine = engine
        self.store = store

    def save(self, state: Any) -> str:
        return str(self.store.save(state.export()))

    def load(self, key: str) -> Any | None:
        try:
            export = self.store.load(key)
        except Exception as e:  # the store reports corruption; fall back to prefill
            log.warning("snapshot %s not loadable: %s", key, e)
            return None
        return None if export is None else self.engine.import_state(export)

    def remove(self, key: str) -> None:
        fn = getattr(self.store, "remove", None) or getattr(self.store, "delete", None)
        if fn is not None:
            fn(key)


class NpzBackend:
    """Fallback: one atomic `.npz` file per snapshot, evicted oldest-first under a budget."""

    def __init__(self, engine: Any, directory: Path, budget_mb: int) -> None:
        self.engine = engine
        self.dir = directory
        self.dir.mkdir(parents=True, exist_ok=True)
        self.budget = budget_mb * 1024 * 1024
        self.fingerprint = str(getattr(engine, "fingerprint", ""))

    def save(self, state: Any) -> str:
        ex = state.export()
        arrays: dict[str, np.ndarray] = {"tokens": np.asarray(ex.tokens)}
        if ex.logits is not None:
            arrays["logits"] = np.asarray(ex.logits)
        layers = []
        for i, layer in enumerate(ex.layers):
            arrays[f"l{i}.raw"] = layer.raw
            if layer.comp is not None:
                arrays[f"l{i}.comp"] = layer.comp
            if layer.index is not None:
                arrays[f"l{i}.index"] = layer.index
            for name, a in layer.frontiers.items():
                arrays[f"l{i}.f.{name}"] = a
            layers.append(
                {"kind": layer.kind, "ratio": layer.ratio, "frontiers": list(layer.frontiers)}
            )
        meta = {
            "version": 1,
            "fingerprint": self.fingerprint,
            "n_tokens": ex.n_tokens,
            "numerics": ex.numerics,
            "layers": layers,
        }
        arrays["meta"] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
        buf = io.BytesIO()
        np.savez(buf, **arrays)
        data = buf.getvalue()
        digest = hashlib.sha256(data).hexdigest()
        key = f"{ex.n_tokens:09d}-{digest[:24]}"
        atomic_write_bytes(self.dir / f"{key}.npz", data)
        (self.dir / f"{key}.sha256").write_text(digest)
        self._evict(protect=key)
        return key

    def load(self, key: str) -> Any | None:
        from ds4_agent.engine.state_export import LayerExport, StateExport

        path = self.dir / f"{key}.npz"
        try:
            data = path.read_bytes()
            want = (self.dir / f"{key}.sha256").read_text().strip()
            if hashlib.sha256(data).hexdigest() != want:
                raise ValueError("checksum mismatch")
            z = np.load(io.BytesIO(data))
            meta = json.loads(bytes(z["meta"]).decode())
            if meta["fingerprint"] != self.fingerprint:
                raise ValueError("written by a different model or numerics")
            layers = []
            for i, lm in enumerate(meta["layers"]):
                layers.append(
                    LayerExport(
                        kind=lm["kind"],
                        ratio=lm["ratio"],
                        raw=z[f"l{i}.raw"],
                        comp=z.get(f"l{i}.comp"),
                        index=z.get(f"l{i}.index"),
                        frontiers={n: z[f"l{i}.f.{n}"] for n in lm["frontiers"]},
                    )
                )
            ex = StateExport(
                n_tokens=meta["n_tokens"],
                tokens=z["tokens"],
                layers=layers,
                numerics=meta["numerics"],
                logits=z.get("logits"),
            )
            os.utime(path)  # recency for eviction
            return self.engine.import_state(ex)
        except (OSError, ValueError, KeyError) as e:
            log.warning("snapshot %s not loadable (%s); it will be prefilled instead", key, e)
            self.remove(key)
            return None

    def remove(self, key: str) -> None:
        for suffix in (".npz", ".sha256"):
            with contextlib.suppress(OSError):
                (self.dir / f"{key}{suffix}").unlink()

    def _evict(self, protect: str) -> None:
        files = sorted(self.dir.glob("*.npz"), key=lambda p: p.stat().st_mtime)
        total = sum(p.stat().st_size for p in files)
        for p in files:
            if total <= self.budget:
                break
            if p.stem == protect:
                continue
            total -= p.stat().st_size
            self.remove(p.stem)


def open_backend(engine: Any, directory: Path, budget_mb: int) -> Any:
    try:
        from ds4_agent.sessions.snapshots import SnapshotStore  # type: ignore[import-not-found]
    except ImportError:
        log.info("sessions snapshot store not available; using plain .npz snapshots")
        return NpzBackend(engine, directory, budget_mb)
    return StoreBackend(engine, SnapshotStore(directory, budget_mb=budget_mb))
