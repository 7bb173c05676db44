"""The session transcript: an append-only JSON-lines file whose token ids are the truth.

Each line is one `Entry`: a piece of the conversation exactly as it entered the model's
context (system prefix, user turn, assistant turn, tool results, an appended fact, a notice),
with the token ids that were prefilled or sampled for it and a display form for people.
Concatenating the `tokens` of all entries gives the model's context token for token; the
text is never re-tokenized (a sampled token sequence does not survive a decode/encode round
trip).

Crash safety: every append is one `write` of one line followed by fsync. A crash can only
leave a torn last line, which `load` detects (no trailing newline or invalid JSON) and drops;
the next append first truncates it away.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, Literal

from ds4_agent.engine.atomic_io import PRIVATE_MODE, atomic_write_bytes, fsync_dir
from pydantic import BaseModel, Field

EntryKind = Literal[
    "system",  # system prefix: system prompt + tools + project instructions
    "user",  # a user turn (includes the assistant-prefix tokens that follow it)
    "assistant",  # sampled tokens of one assistant round (reasoning, answer, DSML)
    "tool_results",  # one user turn holding the results of the previous round's calls
    "fact",  # dynamic facts (date, branch, changed files) appended as a user turn
    "summary",  # compaction summary heading a compacted transcript
    "notice",  # tokens appended by the agent itself (interrupt endings, EOS after DSML)
]


class Entry(BaseModel):
    kind: EntryKind
    tokens: list[int] = Field(default_factory=list)
    text: str = ""  # what people see; not a source for tokens
    data: dict[str, Any] = Field(default_factory=dict)  # reasoning, tool calls, flags…
    ts: float = Field(default_factory=time.time)


class Transcript:
    """An open transcript file; entries are cached in memory."""

    def __init__(self, path: Path, entries: list[Entry], valid_bytes: int) -> None:
        self.path = path
        self.entries = entries
        self._valid_bytes = valid_bytes  # length of the file's well-formed prefix

    @classmethod
    def load(cls, path: Path) -> Transcript:
        if not path.exists():
            return cls(path, [], 0)
        raw = path.read_bytes()
        entries: list[Entry] = []
        pos = 0
        while pos < len(raw):
            nl = raw.find(b"\n", pos)
            if nl < 0:
                break  # torn last line: written without its newline
            try:
                entries.append(Entry.model_validate_json(raw[pos:nl]))
            except ValueError:
                break  # torn or corrupt: everything from here on is dropped
            pos = nl + 1
        return cls(path, entries, pos)

    @classmethod
    def create(cls, path: Path, entries: Iterable[Entry] = ()) -> Transcript:
        entries = list(entries)
        data = b"".join(_line(e) for e in entries)
        atomic_write_bytes(path, data, mode=PRIVATE_MODE)
        return cls(path, entries, len(data))

    @property
    def dropped_tail(self) -> bool:
        return self.path.exists() and self.path.stat().st_size > self._valid_bytes

    def append(self, entry: Entry) -> None:
        line = _line(entry)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        new_file = not self.path.exists()
        with open(self.path, "ab") as f:
            if f.tell() != self._valid_bytes:
                f.truncate(self._valid_bytes)  # cut a torn line left by a crash
                f.seek(self._valid_bytes)
            f.write(line)
            f.flush()
            os.fsync(f.fileno())
        if new_file:
            fsync_dir(self.path.parent)
        self._valid_bytes += len(line)
        self.entries.append(entry)

    def tokens(self) -> list[int]:
        out: list[int] = []
        for e in self.entries:
            out.extend(e.tokens)
        return out

    @property
    def n_tokens(self) -> int:
        return sum(len(e.tokens) for e in self.entries)

    def __iter__(self) -> Iterator[Entry]:
        return iter(self.entries)

    def __len__(self) -> int:
        return len(self.entries)


def _line(entry: Entry) -> bytes:
    # One compact JSON object per line; ensure_ascii keeps the line free of raw U+2028 etc.
    return json.dumps(entry.model_dump(mode="json"), ensure_ascii=True).encode() + b"\n"
