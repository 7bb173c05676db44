"""Public names of the KV snapshot store, importable from one place.

`from ds4_agent.sessions.snapshots import SnapshotStore, SnapshotRef, SnapshotError`
"""

from __future__ import annotations

from ds4_agent.sessions.snapshot_errors import (
    SnapshotBudgetError,
    SnapshotCorruptError,
    SnapshotDiskFullError,
    SnapshotError,
    SnapshotFingerprintError,
    SnapshotInvalidError,
    SnapshotIOError,
    SnapshotMissingSegmentError,
    SnapshotNotFoundError,
    SnapshotVersionError,
)
from ds4_agent.sessions.snapshot_model import GcReport, SnapshotRef, StoreUsage
from ds4_agent.sessions.store import DEFAULT_SEGMENT_TOKENS, SnapshotStore, snapshot_id

__all__ = [
    "DEFAULT_SEGMENT_TOKENS",
    "GcReport",
    "SnapshotBudgetError",
    "SnapshotCorruptError",
    "SnapshotDiskFullError",
    "SnapshotError",
    "SnapshotFingerprintError",
    "SnapshotIOError",
    "SnapshotInvalidError",
    "SnapshotMissingSegmentError",
    "SnapshotNotFoundError",
    "SnapshotRef",
    "SnapshotStore",
    "SnapshotVersionError",
    "StoreUsage",
    "snapshot_id",
]
