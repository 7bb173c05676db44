"""Noticing files the model has read that change on disk outside the agent.

A background thread watches the workspace with watchfiles. A change only matters for files
the model has read (the tools' read-state: path → content hash); a change that leaves the
content equal to what the model saw (the agent's own writes refresh the read-state) is not
reported. Before the model's next turn the loop asks `note()`, which returns one line naming
the stale files; Edit's guard refuses them already (hash mismatch) until they are read again.
"""

from __future__ import annotations

import hashlib
import threading
from pathlib import Path
from typing import Any

IGNORED_DIRS = {".git", "__pycache__", "node_modules", ".venv", ".mypy_cache", ".ruff_cache"}


class FileWatcher:
    def __init__(self, root: Path, read_state: dict[Path, Any]) -> None:
        self.root = root
        self.read_state = read_state  # shared with the tools; read only here
        self._changed: set[Path] = set()
        self._reported: dict[Path, str] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="ds4-agent-watch", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _run(self) -> None:
        from watchfiles import watch

        def keep(change: Any, path: str) -> bool:
            return not any(part in IGNORED_DIRS for part in Path(path).parts)

        try:
            for batch in watch(
                self.root,
                watch_filter=keep,
                stop_event=self._stop,
                rust_timeout=500,
                yield_on_timeout=False,
            ):
                with self._lock:
                    self._changed.update(Path(p) for _, p in batch)
        except Exception:  # noqa: BLE001 - watching is a convenience; never break the session
            return

    def mark(self, paths: list[Path]) -> None:
        """Record changes directly (tests, or platforms without a watcher)."""
        with self._lock:
            self._changed.update(paths)

    def stale(self) -> list[Path]:
        with self._lock:
            changed, self._changed = self._changed, set()
        out: list[Path] = []
        for p in sorted(changed):
            p = p.resolve()
            stamp = self.read_state.get(p)
            if stamp is None:
                continue
            try:
                now = hashlib.sha256(p.read_bytes()).hexdigest()
            except OSError:
                now = "deleted"
            if now != stamp.sha256 and self._reported.get(p) != now:
                self._reported[p] = now
                out.append(p)
        return out

    def note(self) -> str | None:
        files = self.stale()
        if not files:
            return None
        names = ", ".join(_rel(p, self.root) for p in files)
        return (
            f"[ds4-agent] Changed on disk outside your tools since you read them: {names}. "
            "Read them again before editing."
        )


def _rel(p: Path, root: Path) -> str:
    try:
        return p.relative_to(root.resolve()).as_posix()
    except ValueError:
        return str(p)
