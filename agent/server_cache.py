"""The server's prompt cache: one live engine state plus prefix snapshots on disk.

Matching is done on *text*, not on re-tokenized ids. The live state's tokens are decoded to
bytes (byte-level BPE: the concatenation of per-token bytes is the exact text), and a request
reuses the live state when its rendered prompt starts with those bytes; only the remaining
text is tokenized and prefilled. Re-tokenizing generated text rarely gives back the sampled
ids, so id-level matching would miss every previous answer.

The engine cannot rewind a state (compressed rows and frontiers only grow), so the live state
is reused only as a whole. Snapshots cover the other cases; they are written at the points
where a later request is likely to branch (ds4-server's policy, ds4-agent.md §5.3):
- cold: after a long first prompt, at the chat anchor (last `<｜User｜>` before the first
  `<｜Assistant｜>`), else at `len - 32` rounded down to 2048;
- turn: just after the final `<｜Assistant｜>` of a prompt, because thinking-mode chats drop
  old reasoning, so the next turn diverges right there;
- aligned frontiers: every multiple of `frontier_tokens` reached by prefill, and by decode
  until a tool call starts;
- evict: before an unrelated request replaces the live state;
- shutdown.
Snapshots are located by the SHA-256 of the text prefix they hold (`SnapshotIndex`).
"""

from __future__ import annotations

import codecs
import contextlib
import hashlib
import json
import logging
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from ds4_agent.engine.atomic_io import PRIVATE_MODE, atomic_write_bytes

log = logging.getLogger("ds4_agent.server")

USER_TEXT = "<｜User｜>"
ASSISTANT_TEXT = "<｜Assistant｜>"


class TokenText:
    """id -> exact bytes of that token, for a byte-level BPE tokenizer."""

    def __init__(self, tokenizer: Any) -> None:
        self.tok = tokenizer
        self._cache: dict[int, bytes] = {}

    def bytes_of(self, tid: int) -> bytes:
        b = self._cache.get(tid)
        if b is None:
            b = self._lookup(tid)
            self._cache[tid] = b
        return b

    def _lookup(self, tid: int) -> bytes:
        for name in ("token_bytes", "decode_single_token_bytes", "id_to_bytes"):
            fn = getattr(self.tok, name, None)
            if fn is not None:
                return bytes(fn(tid))
        fn = getattr(self.tok, "decode_bytes", None)
        if fn is not None:
            return bytes(fn([tid]))
        return self.tok.decode([tid]).encode("utf-8")

    def join(self, ids: list[int]) -> bytes:
        return b"".join(self.bytes_of(t) for t in ids)

    def decoder(self) -> StreamText:
        return StreamText(self)


class StreamText:
    """Streaming id -> text that never splits a UTF-8 character across two pieces."""

    def __init__(self, text: TokenText) -> None:
        self._text = text
        self._dec = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def feed(self, tid: int) -> str:
        return self._dec.decode(self._text.bytes_of(tid))

    def flush(self) -> str:
        return self._dec.decode(b"", final=True)


class SnapshotBackend(Protocol):
    """What the cache needs from the KV snapshot store (sessions/)."""

    def save(self, state: Any) -> str: ...
    def load(self, key: str) -> Any | None: ...
    def remove(self, key: str) -> None: ...


@dataclass
class IndexEntry:
    key: str  # the backend's snapshot key
    n_tokens: int
    n_bytes: int
    text_sha: str  # sha256 of the text prefix the snapshot holds


class SnapshotIndex:
    """text-prefix hash -> snapshot key, persisted atomically as one small JSON file."""

    def __init__(self, path: Path | None, max_entries: int = 256) -> None:
        self.path = path
        self.max_entries = max_entries
        self.entries: list[IndexEntry] = []
        if path is not None and path.is_file():
            try:
                raw = json.loads(path.read_text(encoding="utf-8"))
                self.entries = [IndexEntry(**e) for e in raw["entries"]]
            except (OSError, ValueError, KeyError, TypeError) as e:
                log.warning("ignoring unreadable snapshot index %s: %s", path.name, e)

    def _persist(self) -> None:
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        data = {"version": 1, "entries": [e.__dict__ for e in self.entries]}
        atomic_write_bytes(self.path, json.dumps(data).encode(), mode=PRIVATE_MODE)

    def add(self, entry: IndexEntry) -> list[IndexEntry]:
        """Add (replacing an entry for the same text); returns entries dropped by the bound."""
        self.entries = [e for e in self.entries if e.text_sha != entry.text_sha]
        self.entries.append(entry)
        dropped = []
        while len(self.entries) > self.max_entries:
            dropped.append(self.entries.pop(0))
        self._persist()
        return dropped

    def discard(self, key: str) -> None:
        self.entries = [e for e in self.entries if e.key != key]
        self._persist()

    def longest(self, prompt: bytes, min_bytes: int = 0) -> IndexEntry | None:
        """The entry with the longest text that prefixes `prompt` (longer than `min_bytes`)."""
        best = None
        by_len: dict[int, str] = {}
        for e in sorted(self.entries, key=lambda e: -e.n_bytes):
            if e.n_bytes > len(prompt) or e.n_bytes <= min_bytes:
                continue
            if best is not None and e.n_bytes <= best.n_bytes:
                continue
            sha = by_len.get(e.n_bytes)
            if sha is None:
                sha = by_len[e.n_bytes] = hashlib.sha256(prompt[: e.n_bytes]).hexdigest()
            if sha == e.text_sha:
                best = e
        return best


class ContextOverflow(Exception):
    def __init__(self, total: int) -> None:
        super().__init__(f"prompt of {total} tokens")
        self.total = total


@dataclass
class CachePolicy:
    min_snapshot_tokens: int = 512
    cold_max_tokens: int = 30_000
    frontier_tokens: int = 10_240
    turn_snapshots: bool = True
    # Load a snapshot instead of extending the live state when it covers this many more
    # bytes of the prompt (about a thousand tokens).
    prefer_disk_bytes: int = 4096


@dataclass
class Plan:
    cached_tokens: int
    suffix_ids: list[int]
    checkpoints: list[int]  # absolute token counts at which to save a snapshot during prefill

    @property
    def prompt_tokens(self) -> int:
        return self.cached_tokens + len(self.suffix_ids)


class PromptCache:
    """Owns the live state. Only the inference worker thread calls its methods."""

    def __init__(
        self,
        engine: Any,
        tokenizer: Any,
        backend: SnapshotBackend | None,
        index_path: Path | None,
        policy: CachePolicy | None = None,
    ) -> None:
        self.engine = engine
        self.tok = tokenizer
        self.text = TokenText(tokenizer)
        self.backend = backend
        self.index = SnapshotIndex(index_path)
        self.policy = policy or CachePolicy()
        self.state = engine.new_state()
        self._live = bytearray()
        self._live_n = 0
        self._lock = threading.Lock()
        self.user_id = tokenizer.token_id(USER_TEXT)
        self.assistant_id = tokenizer.token_id(ASSISTANT_TEXT)
        self.stats = {"live_hits": 0, "disk_hits": 0, "misses": 0, "saves": 0}

    # -- live text ------------------------------------------------------------------------

    def live_bytes(self) -> bytes:
        tokens = list(self.state.tokens)
        if len(tokens) < self._live_n:  # cannot happen with an append-only state; be safe
            self._live, self._live_n = bytearray(), 0
        self._live += self.text.join(tokens[self._live_n :])
        self._live_n = len(tokens)
        return bytes(self._live)

    def reset(self) -> None:
        self.state = self.engine.new_state()
        self._live, self._live_n = bytearray(), 0

    # -- lookup ---------------------------------------------------------------------------

    def tokenize(self, segments: list[Any], start: int = 0) -> list[int]:
        """Ids of the prompt text from character `start` on (control text may hold special
        tokens, data text never does; see `prompts.encoding.segments_to_ids`)."""
        from ds4_agent.agent.server_render import slice_segments
        from ds4_agent.prompts.encoding import segments_to_ids

        return segments_to_ids(self.tok, slice_segments(segments, start))

    def plan(
        self, prompt: str, segments: list[Any], turn_snapshot: bool = True, ctx: int = 0
    ) -> Plan:
        """How to serve `prompt` (whose `segments` concatenate to it): what is cached, which
        ids remain to prefill, where to snapshot on the way. May replace the live state, but
        not for a prompt that does not fit `ctx` (raises ContextOverflow first)."""

        def check(total: int) -> None:
            if ctx and total >= ctx:
                raise ContextOverflow(total)

        if not segments and prompt:  # a caller without segments: all of it is scaffolding
            from ds4_agent.prompts.encoding import Segment

            segments = [Segment(prompt, "control")]

        pb = prompt.encode("utf-8")
        live = self.live_bytes()
        live_ok = (
            self._live_n > 0 and pb.startswith(live) and _decode_suffix(pb, len(live)) is not None
        )
        # A snapshot clearly longer than the usable live prefix is worth loading instead
        # (reading rows back costs far less than recomputing them).
        min_bytes = len(live) + self.policy.prefer_disk_bytes if live_ok else 0
        hit = self.index.longest(pb, min_bytes) if self.backend is not None else None
        if hit is not None and hit.n_tokens > 0:
            suffix = _decode_suffix(pb, hit.n_bytes)
            ids = []
            if suffix is not None:
                ids = self.tokenize(segments, len(prompt) - len(suffix))
                check(hit.n_tokens + len(ids))
            state = self.backend.load(hit.key) if suffix is not None else None
            if state is not None and state.n_tokens == hit.n_tokens:
                if not live_ok:
                    self.save_live("evict")
                self.state = state
                self._live, self._live_n = bytearray(), 0
                if self.live_bytes() == pb[: hit.n_bytes]:
                    self.stats["disk_hits"] += 1
                    return Plan(
                        hit.n_tokens,
                        ids,
                        self._checkpoints(hit.n_tokens, ids, False, turn_snapshot),
                    )
                log.warning("snapshot %s does not hold the text its index claims; dropped", hit.key)
                live_ok = False  # the old live state is gone; start clean below
                self.reset()
            self.index.discard(hit.key)
        if live_ok:
            self.stats["live_hits"] += 1
            suffix = pb[len(live) :].decode("utf-8")
            ids = self.tokenize(segments, len(prompt) - len(suffix))
            return Plan(
                self._live_n, ids, self._checkpoints(self._live_n, ids, False, turn_snapshot)
            )
        ids = self.tokenize(segments)
        check(len(ids))
        self.stats["misses"] += 1
        self.save_live("evict")
        self.reset()
        return Plan(0, ids, self._checkpoints(0, ids, True, turn_snapshot))

    def _checkpoints(self, cached: int, ids: list[int], cold: bool, turn: bool) -> list[int]:
        if self.backend is None:
            return []
        p = self.policy
        total = cached + len(ids)
        points: set[int] = set()
        if cold and p.min_snapshot_tokens <= total <= p.cold_max_tokens:
            anchor = 0
            first_asst = next((i for i, t in enumerate(ids) if t == self.assistant_id), None)
            if first_asst is not None:
                users = [i for i in range(first_asst) if ids[i] == self.user_id]
                anchor = users[-1] if users else 0
            if anchor < p.min_snapshot_tokens:
                anchor = (total - 32) // 2048 * 2048
            points.add(anchor)
        if turn and p.turn_snapshots:
            last_asst = max((i for i, t in enumerate(ids) if t == self.assistant_id), default=None)
            if last_asst is not None:
                points.add(cached + last_asst + 1)
        if p.frontier_tokens > 0:
            f = (cached // p.frontier_tokens + 1) * p.frontier_tokens
            while f <= total:
                points.add(f)
                f += p.frontier_tokens
        return sorted(x for x in points if cached < x <= total and x >= p.min_snapshot_tokens)

    # -- snapshots ------------------------------------------------------------------------

    def save_live(self, reason: str) -> str | None:
        """Snapshot the live state (if worth it and not already stored)."""
        if self.backend is None or self.state.n_tokens < self.policy.min_snapshot_tokens:
            return None
        live = self.live_bytes()
        sha = hashlib.sha256(live).hexdigest()
        if any(e.text_sha == sha for e in self.index.entries):
            return None
        try:
            key = self.backend.save(self.state)
        except Exception as e:  # a failed save must never take the server down
            log.warning("snapshot (%s) at %d tokens failed: %s", reason, self.state.n_tokens, e)
            return None
        self.stats["saves"] += 1
        log.info("snapshot (%s) at %d tokens", reason, self.state.n_tokens)
        for old in self.index.add(IndexEntry(key, self.state.n_tokens, len(live), sha)):
            with contextlib.suppress(Exception):
                self.backend.remove(old.key)
        return key


def _decode_suffix(pb: bytes, at: int) -> str | None:
    try:
        return pb[at:].decode("utf-8")
    except UnicodeDecodeError:
        return None  # the boundary splits a character: not a usable prefix
