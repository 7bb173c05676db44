"""Where the server's prefix snapshots go: the sessions KV snapshot store.

`open_backend` returns an object with `save(state) -> key`, `load(key) -> state | None` and
`remove(key)` over the content-addressed store in `sessions/` (shared segments, checksums,
atomic writes, disk budget with eviction). A snapshot that cannot be loaded is reported and
answered with `None`: the caller prefills instead.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Any

log = logging.getLogger("ds4_agent.server")


class StoreBackend:
    """Adapter over the sessions SnapshotStore (content-addressed segments, budget, checksums)."""

    def __init__(self, engine: Any, store: Any) -> None:
        self.engine = engine
        self.store = store
        self.fingerprint = str(engine.fingerprint)

    def save(self, state: Any) -> str:
        return str(self.store.save(state.export(), self.fingerprint).id)

    def load(self, key: str) -> Any | None:
        from ds4_agent.sessions.snapshots import SnapshotError

        try:
            export = self.store.load(key, self.fingerprint)
        except SnapshotError as e:  # corrupt, evicted, other model: prefill instead
            log.warning("snapshot %s not loadable: %s", key[:12], e)
            return None
        return self.engine.import_state(export)

    def remove(self, key: str) -> None:
        from ds4_agent.sessions.snapshots import SnapshotError

        with contextlib.suppress(SnapshotError):
            self.store.delete(key)


def open_backend(engine: Any, directory: Path, budget_mb: int) -> StoreBackend:
    from ds4_agent.sessions.snapshots import SnapshotStore

    return StoreBackend(engine, SnapshotStore(directory, budget_mb=budget_mb))
