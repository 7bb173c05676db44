"""Undo journal: every write/edit records the file's bytes before and after, per turn.

The agent can undo the last turn's edits or rewind the files to how they were before any
earlier turn. A restore refuses files that changed since the agent wrote them (someone else's
work would be lost) unless forced, and says which files it skipped.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ds4_agent.engine.atomic_io import atomic_write_bytes

from .workspace import digest


@dataclass
class JournalEntry:
    turn: int
    path: str  # absolute
    before: str | None  # sha256 of the content before, None = file did not exist
    after: str | None  # sha256 after, None = file was deleted
    tool: str = ""


@dataclass
class RestoreReport:
    restored: list[str] = field(default_factory=list)
    deleted: list[str] = field(default_factory=list)
    conflicts: list[str] = field(default_factory=list)

    def summary(self) -> str:
        parts = []
        if self.restored:
            parts.append(f"restored {len(self.restored)} file(s): {', '.join(self.restored)}")
        if self.deleted:
            parts.append(f"removed {len(self.deleted)} created file(s): {', '.join(self.deleted)}")
        if self.conflicts:
            parts.append(
                f"skipped {len(self.conflicts)} file(s) changed since the agent wrote them: "
                f"{', '.join(self.conflicts)}"
            )
        return "; ".join(parts) if parts else "nothing to restore"


class UndoJournal:
    """Before/after contents of every file the tools wrote, grouped by turn.

    With `store_dir` the journal persists (an index plus content-addressed blobs, all written
    atomically) so that undo survives a restart; without it everything stays in memory.
    """

    def __init__(self, store_dir: Path | None = None) -> None:
        self.store_dir = Path(store_dir) if store_dir is not None else None
        self.entries: list[JournalEntry] = []
        self._blobs: dict[str, bytes] = {}
        if self.store_dir is not None:
            self._load()

    # ---- recording --------------------------------------------------------------------------

    def record(
        self, turn: int, path: Path, before: bytes | None, after: bytes | None, tool: str = ""
    ) -> None:
        entry = JournalEntry(turn, str(path), self._put(before), self._put(after), tool)
        self.entries.append(entry)
        self._save_index()

    def turns(self) -> list[int]:
        return sorted({e.turn for e in self.entries})

    def files_in_turn(self, turn: int) -> list[str]:
        seen: dict[str, None] = {}
        for e in self.entries:
            if e.turn == turn:
                seen[e.path] = None
        return list(seen)

    # ---- restoring --------------------------------------------------------------------------

    def undo_turn(self, turn: int, force: bool = False) -> RestoreReport:
        """Put back every file written in `turn` as it was before that turn."""
        return self._restore([e for e in self.entries if e.turn == turn], force)

    def rewind_to(self, turn: int, force: bool = False) -> RestoreReport:
        """Put back every file as it was before `turn` started (undoes `turn` and all later turns)."""
        return self._restore([e for e in self.entries if e.turn >= turn], force)

    def _restore(self, entries: list[JournalEntry], force: bool) -> RestoreReport:
        report = RestoreReport()
        # Per file: the state before its first write in the range, and after its last write.
        first: dict[str, JournalEntry] = {}
        last: dict[str, JournalEntry] = {}
        for e in entries:
            first.setdefault(e.path, e)
            last[e.path] = e
        done: set[int] = set()
        for path_str, e_first in first.items():
            path = Path(path_str)
            expected = last[path_str].after
            current = _read_or_none(path)
            current_hash = None if current is None else digest(current)
            if current_hash != expected and not force:
                report.conflicts.append(path_str)
                continue
            if e_first.before is None:
                if path.exists():
                    path.unlink()
                report.deleted.append(path_str)
            else:
                atomic_write_bytes(path, self._get(e_first.before))
                report.restored.append(path_str)
            done.update(id(e) for e in entries if e.path == path_str)
        # Restored entries leave the journal so a second undo does not replay them.
        self.entries = [e for e in self.entries if id(e) not in done]
        self._save_index()
        return report

    # ---- storage ----------------------------------------------------------------------------

    def _put(self, data: bytes | None) -> str | None:
        if data is None:
            return None
        key = digest(data)
        if key not in self._blobs:
            self._blobs[key] = data
            if self.store_dir is not None:
                blob = self.store_dir / "blobs" / key
                if not blob.exists():
                    atomic_write_bytes(blob, data)
        return key

    def _get(self, key: str) -> bytes:
        if key in self._blobs:
            return self._blobs[key]
        if self.store_dir is None:
            raise KeyError(key)
        data = (self.store_dir / "blobs" / key).read_bytes()
        self._blobs[key] = data
        return data

    def _save_index(self) -> None:
        if self.store_dir is None:
            return
        payload = json.dumps({"version": 1, "entries": [asdict(e) for e in self.entries]})
        atomic_write_bytes(self.store_dir / "journal.json", payload.encode())

    def _load(self) -> None:
        assert self.store_dir is not None
        index = self.store_dir / "journal.json"
        if not index.exists():
            return
        data = json.loads(index.read_text())
        self.entries = [JournalEntry(**e) for e in data.get("entries", [])]


def _read_or_none(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        return None
    except IsADirectoryError:
        return os.fsencode("<directory>")
