"""KV snapshots for the agent: save after a turn, restore on resume, warm-start prefixes.

A thin adapter over the snapshot store (`sessions/`), which owns the file format, integrity
checks and deduplication. What the agent adds: it never trusts a snapshot blindly. A restored
state must come from this model build (fingerprint) and its token ids must equal the
transcript's first tokens; anything else is reported as a reason string, and the caller
rebuilds by prefill with a visible notice. A session is never lost because of its snapshot.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from ds4_agent.sessions.session import SnapshotInfo


def _ref_to_json(ref: Any) -> Any:
    if hasattr(ref, "model_dump"):
        return ref.model_dump(mode="json")
    if dataclasses.is_dataclass(ref) and not isinstance(ref, type):
        return dataclasses.asdict(ref)
    return ref


class KVSnapshots:
    def __init__(self, engine: Any, store: Any) -> None:
        self.engine = engine
        self.store = store

    @property
    def fingerprint(self) -> str:
        return str(self.engine.fingerprint)

    def _ref_from_json(self, data: Any) -> Any:
        ref_type = getattr(self.store, "ref_type", None)
        if ref_type is not None and isinstance(data, dict):
            if hasattr(ref_type, "model_validate"):
                return ref_type.model_validate(data)
            return ref_type(**data)
        return data

    def save(self, state: Any, pin: str | None = None, replace_pin: bool = True) -> SnapshotInfo:
        """Store the state. `pin` (a session id, or a shared name) keeps it through eviction;
        with `replace_pin` the pin moves here from that name's older snapshots."""
        export = state.export()
        ref = self.store.save(export, self.fingerprint, pin=pin, replace_pin=replace_pin)
        return SnapshotInfo(
            ref=_ref_to_json(ref), n_tokens=int(state.n_tokens), fingerprint=self.fingerprint
        )

    def restore(
        self, info: SnapshotInfo | None, transcript_tokens: list[int]
    ) -> tuple[Any, Any, str]:
        """(state, logits, "") on success; (None, None, reason) when the caller must rebuild.

        `logits` are the next-token logits stored with the snapshot (None if it has none).
        """
        if info is None:
            return None, None, "the session has no snapshot"
        if info.fingerprint != self.fingerprint:
            return None, None, "its snapshot is from another model build"
        if info.n_tokens > len(transcript_tokens):
            return None, None, "its snapshot is longer than the transcript"
        try:
            export = self.store.load(self._ref_from_json(info.ref), self.fingerprint)
        except Exception as e:  # noqa: BLE001 - SnapshotError, I/O errors, corrupt payloads
            return None, None, f"its snapshot could not be loaded ({_one_line(e)})"
        if [int(t) for t in export.tokens] != transcript_tokens[: len(export.tokens)] or len(
            export.tokens
        ) != info.n_tokens:
            return None, None, "its snapshot does not match the transcript"
        try:
            state = self.engine.import_state(export)
        except Exception as e:  # noqa: BLE001 - shape mismatch from a foreign build
            return None, None, f"its snapshot does not fit this model ({_one_line(e)})"
        return state, _logits(export), ""

    def restore_prefix(self, tokens: list[int]) -> Any:
        """The engine state of the longest stored prefix of `tokens` (warm start), or None."""
        finder = getattr(self.store, "longest_prefix", None)
        if finder is None:
            return None
        try:
            hit = finder(tokens, self.fingerprint)
            if hit is None:
                return None
            export = hit if hasattr(hit, "tokens") else self.store.load(hit, self.fingerprint)
            if [int(t) for t in export.tokens] != tokens[: len(export.tokens)]:
                return None
            return self.engine.import_state(export)
        except Exception:  # noqa: BLE001 - a cold start is always a correct fallback
            return None


def _logits(export: Any) -> Any:
    if getattr(export, "logits", None) is None:
        return None
    import mlx.core as mx

    return mx.array(export.logits)


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else e.__class__.__name__
