"""Exact replay of sampled tool calls, keyed by tool-call id.

A client keeps the conversation as JSON: it sends a tool call back as `{name, arguments}` and
usually drops the reasoning. Re-rendering that canonically rarely gives the bytes the model
actually sampled (spacing, parameter order, `string="false"` literals, the reasoning), so the
rendered prompt would stop matching the live KV state right at the previous turn and the whole
turn would be prefilled again. The server therefore remembers, for every tool-call id it
issued, the exact sampled reasoning and DSML block, and substitutes them when the client's
history mentions that id again.

Records live in one small file each, written atomically, so the map survives restarts and a
crash can never leave a half-written record behind. The map is bounded (oldest dropped).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import threading
from collections import OrderedDict
from dataclasses import asdict, dataclass
from pathlib import Path

from ds4_agent.engine.atomic_io import PRIVATE_MODE, atomic_write_bytes

DEFAULT_MAX_RECORDS = 20_000
_MEMORY_RECORDS = 2_048


@dataclass(frozen=True)
class ReplayRecord:
    """What the model produced for one assistant turn that ended in tool calls."""

    reasoning: str  # exact text between the opening <think> and </think> ("" in chat mode)
    content: str  # the visible text returned to the client before the calls
    dsml: str  # exact bytes from the end of `content` to the end of the tool-calls block
    call_ids: tuple[str, ...]


class ReplayMap:
    """tool-call id -> ReplayRecord; persisted under `directory` when one is given."""

    def __init__(self, directory: Path | None, max_records: int = DEFAULT_MAX_RECORDS) -> None:
        self.directory = directory
        self.max_records = max_records
        self._mem: OrderedDict[str, ReplayRecord] = OrderedDict()
        self._lock = threading.Lock()
        self._n_files = 0
        if directory is not None:
            directory.mkdir(parents=True, exist_ok=True)
            self._n_files = sum(1 for _ in directory.glob("*.json"))

    def _file(self, call_id: str) -> Path:
        assert self.directory is not None
        # Ids come from the client: hash them so no id can name a path.
        return self.directory / (hashlib.sha256(call_id.encode()).hexdigest()[:40] + ".json")

    def put(self, record: ReplayRecord) -> None:
        payload = json.dumps(asdict(record), ensure_ascii=False).encode()
        with self._lock:
            for cid in record.call_ids:
                self._remember(cid, record)
                if self.directory is not None:
                    atomic_write_bytes(self._file(cid), payload, mode=PRIVATE_MODE)
                    self._n_files += 1
        # Listing the directory is the expensive part: do it only once the bound is passed.
        if self.directory is not None and self._n_files > self.max_records:
            self._prune()

    def get(self, call_id: str) -> ReplayRecord | None:
        with self._lock:
            rec = self._mem.get(call_id)
            if rec is not None:
                self._mem.move_to_end(call_id)
                return rec
        if self.directory is None:
            return None
        path = self._file(call_id)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            rec = ReplayRecord(
                reasoning=str(data["reasoning"]),
                content=str(data["content"]),
                dsml=str(data["dsml"]),
                call_ids=tuple(str(c) for c in data["call_ids"]),
            )
        except (OSError, ValueError, KeyError, TypeError):
            return None  # missing or unreadable: render canonically, costs only cache reuse
        if call_id not in rec.call_ids:
            return None  # a hash collision: never replay another call's bytes
        with self._lock:
            self._remember(call_id, rec)
        return rec

    def _remember(self, call_id: str, rec: ReplayRecord) -> None:
        self._mem[call_id] = rec
        self._mem.move_to_end(call_id)
        while len(self._mem) > _MEMORY_RECORDS:
            self._mem.popitem(last=False)

    def _prune(self) -> None:
        assert self.directory is not None
        files = [p for p in self.directory.glob("*.json") if p.is_file()]
        self._n_files = len(files)
        if len(files) <= self.max_records:
            return
        files.sort(key=lambda p: p.stat().st_mtime)
        # Drop a tenth more than needed so the next listing is many puts away.
        excess = len(files) - self.max_records + self.max_records // 10
        for p in files[:excess]:
            with contextlib.suppress(OSError):
                p.unlink()
                self._n_files -= 1
