"""Named sessions of one repository: metadata, transcripts, snapshot references.

Layout under `<data dir>/sessions/<repo key>/`:

    <id>/meta.json            SessionMeta (atomic rewrite)
    <id>/transcript-<N>.jsonl the transcript of epoch N (a compaction starts a new epoch; the
                              older epochs stay, so a compaction can be undone)

Names are unique per repository; ids are uuid4 hex and may be abbreviated to any unique
prefix of at least 4 characters. Look-ups that fail say what was asked for and suggest the
closest name or id.
"""

from __future__ import annotations

import difflib
import shutil
import time
import uuid
from pathlib import Path
from typing import Any, Literal

from ds4_agent.engine.atomic_io import PRIVATE_MODE, atomic_copy, atomic_write_text, fsync_dir
from ds4_agent.sessions.transcript import Transcript
from pydantic import BaseModel, Field

META = "meta.json"
MIN_ID_PREFIX = 4


class SessionError(Exception):
    """A session look-up or operation the user can fix (one line, names the fix)."""


class SnapshotInfo(BaseModel):
    """A reference into the snapshot store: the KV state after `n_tokens` tokens."""

    ref: Any  # the store's SnapshotRef, serialized by the store (opaque here)
    n_tokens: int
    fingerprint: str
    created: float = Field(default_factory=time.time)


class SessionMeta(BaseModel):
    id: str
    name: str
    created: float
    updated: float
    repo: str
    branch: str | None = None
    model_fingerprint: str | None = None
    thinking_mode: Literal["thinking", "chat", "max"] = "thinking"
    n_tokens: int = 0
    n_turns: int = 0  # user turns
    title: str = ""  # first user prompt, shortened
    parent_id: str | None = None  # set on forks
    fork_tokens: int | None = None  # parent's token count at the fork point
    epoch: int = 0  # current transcript file is transcript-<epoch>.jsonl
    snapshot: SnapshotInfo | None = None  # latest KV snapshot of the current epoch
    system_snapshot: SnapshotInfo | None = None  # the shared warm-start prefix used
    version: int = 1


def new_id() -> str:
    return uuid.uuid4().hex


def default_name(created: float) -> str:
    return time.strftime("session-%Y%m%d-%H%M%S", time.localtime(created))


class Session:
    """One session on disk: its directory, metadata and current transcript."""

    def __init__(self, root: Path, meta: SessionMeta) -> None:
        self.root = root
        self.meta = meta
        self._transcript: Transcript | None = None

    @property
    def dir(self) -> Path:
        return self.root / self.meta.id

    def transcript_path(self, epoch: int | None = None) -> Path:
        return self.dir / f"transcript-{self.meta.epoch if epoch is None else epoch}.jsonl"

    @property
    def transcript(self) -> Transcript:
        if self._transcript is None or self._transcript.path != self.transcript_path():
            self._transcript = Transcript.load(self.transcript_path())
        return self._transcript

    def save_meta(self) -> None:
        self.meta.updated = time.time()
        self.meta.n_tokens = self.transcript.n_tokens
        self.meta.n_turns = sum(1 for e in self.transcript if e.kind == "user")
        if not self.meta.title:
            first = next((e for e in self.transcript if e.kind == "user"), None)
            if first is not None:
                self.meta.title = " ".join(first.text.split())[:80]
        atomic_write_text(self.dir / META, self.meta.model_dump_json(indent=1), mode=PRIVATE_MODE)

    def start_epoch(self) -> Transcript:
        """Begin a new transcript file (compaction); the older epochs stay on disk."""
        self.meta.epoch += 1
        self.meta.snapshot = None
        self._transcript = Transcript.create(self.transcript_path())
        return self._transcript


class SessionStore:
    """All sessions of one repository."""

    def __init__(self, root: Path, repo: str) -> None:
        self.root = root
        self.repo = repo

    # -- queries -------------------------------------------------------------------------

    def list(self) -> list[SessionMeta]:
        """Sessions, most recently updated first; unreadable directories are skipped."""
        out: list[SessionMeta] = []
        if not self.root.is_dir():
            return out
        for d in self.root.iterdir():
            meta = d / META
            if not meta.is_file():
                continue
            try:
                out.append(SessionMeta.model_validate_json(meta.read_bytes()))
            except ValueError:
                continue
        out.sort(key=lambda m: m.updated, reverse=True)
        return out

    def open(self, session_id: str) -> Session:
        path = self.root / session_id / META
        try:
            meta = SessionMeta.model_validate_json(path.read_bytes())
        except FileNotFoundError:
            raise SessionError(f"session {session_id} does not exist") from None
        except ValueError as e:
            raise SessionError(
                f"session {session_id}: metadata {path} is unreadable ({e.__class__.__name__}); "
                "remove it with `ds4-agent sessions rm`"
            ) from None
        return Session(self.root, meta)

    def latest(self) -> Session | None:
        metas = self.list()
        return self.open(metas[0].id) if metas else None

    def resolve(self, query: str) -> Session:
        """Exact name, then exact id, then a unique id prefix; otherwise a helpful error."""
        metas = self.list()
        for m in metas:
            if m.name == query:
                return self.open(m.id)
        for m in metas:
            if m.id == query:
                return self.open(m.id)
        if len(query) >= MIN_ID_PREFIX:
            hits = [m for m in metas if m.id.startswith(query.lower())]
            if len(hits) == 1:
                return self.open(hits[0].id)
            if len(hits) > 1:
                names = ", ".join(f"{m.name} ({m.id[:8]})" for m in hits[:5])
                raise SessionError(
                    f"session id prefix '{query}' is ambiguous: {names}; give more characters"
                )
        if not metas:
            raise SessionError(
                f"no session named '{query}': this repository has no sessions yet "
                "(start one with `ds4-agent -n NAME`)"
            )
        hint = self.closest(query, metas)
        tail = f"; did you mean '{hint}'?" if hint else "; see `ds4-agent sessions list`"
        raise SessionError(f"no session named '{query}' in this repository{tail}")

    @staticmethod
    def closest(query: str, metas: list[SessionMeta]) -> str | None:
        names = [m.name for m in metas]
        best = difflib.get_close_matches(query, names, n=1, cutoff=0.5)
        if best:
            return best[0]
        # Case-insensitive substring as a second chance ("fix" → "fix-login-bug").
        low = query.lower()
        subs = [n for n in names if low in n.lower() or n.lower() in low]
        return subs[0] if subs else None

    # -- changes -------------------------------------------------------------------------

    def _check_name(self, name: str, except_id: str | None = None) -> None:
        if not name or name != name.strip() or any(c in name for c in "/\\\n\r\t\0"):
            raise SessionError(
                f"invalid session name {name!r}: use a non-empty name without slashes, "
                "control characters or surrounding spaces"
            )
        for m in self.list():
            if m.name == name and m.id != except_id:
                raise SessionError(
                    f"a session named '{name}' already exists in this repository "
                    f"({m.id[:8]}); pick another name or resume it with `-r {name}`"
                )

    def unique_name(self, base: str) -> str:
        taken = {m.name for m in self.list()}
        if base not in taken:
            return base
        n = 2
        while f"{base}-{n}" in taken:
            n += 1
        return f"{base}-{n}"

    def create(
        self,
        name: str | None = None,
        *,
        branch: str | None = None,
        model_fingerprint: str | None = None,
        thinking_mode: Literal["thinking", "chat", "max"] = "thinking",
    ) -> Session:
        now = time.time()
        if name is None:
            name = self.unique_name(default_name(now))
        self._check_name(name)
        meta = SessionMeta(
            id=new_id(),
            name=name,
            created=now,
            updated=now,
            repo=self.repo,
            branch=branch,
            model_fingerprint=model_fingerprint,
            thinking_mode=thinking_mode,
        )
        s = Session(self.root, meta)
        s.dir.mkdir(parents=True, exist_ok=False)
        fsync_dir(self.root)
        Transcript.create(s.transcript_path())
        s.save_meta()
        return s

    def rename(self, query: str, new_name: str) -> Session:
        s = self.resolve(query)
        self._check_name(new_name, except_id=s.meta.id)
        s.meta.name = new_name
        s.save_meta()
        return s

    def remove(self, query: str) -> SessionMeta:
        s = self.resolve(query)
        # Rename first so a half-finished delete never leaves a session that lists but
        # does not load; the tombstone has no meta.json at the top level.
        tomb = self.root / f".deleted-{s.meta.id}"
        s.dir.rename(tomb)
        fsync_dir(self.root)
        shutil.rmtree(tomb, ignore_errors=True)
        return s.meta

    def fork(self, query: str, new_name: str | None = None) -> Session:
        """Copy a session (current epoch's transcript and snapshot reference) under a new id.

        The parent is not touched. The snapshot reference is shared: snapshots are immutable
        in the store, so both sessions restore the same state and diverge from there.
        """
        parent = self.resolve(query)
        name = new_name if new_name is not None else self.unique_name(f"{parent.meta.name}-fork")
        self._check_name(name)
        now = time.time()
        meta = parent.meta.model_copy(deep=True)
        meta.id = new_id()
        meta.name = name
        meta.created = now
        meta.parent_id = parent.meta.id
        meta.fork_tokens = parent.transcript.n_tokens
        child = Session(self.root, meta)
        child.dir.mkdir(parents=True, exist_ok=False)
        src = parent.transcript_path()
        if src.exists():
            atomic_copy(src, child.transcript_path(), mode=PRIVATE_MODE)
        else:
            Transcript.create(child.transcript_path())
        child.save_meta()
        return child
