"""The one exception family the snapshot store raises.

Callers (sessions, server) catch `SnapshotError` and fall back to re-prefilling from the
transcript; the subclasses only let them word the message or count causes. Every message is
one line naming the problem and what to do about it.
"""

from __future__ import annotations


class SnapshotError(Exception):
    """Any problem with the snapshot store; the live session and older snapshots are unaffected."""


class SnapshotNotFoundError(SnapshotError):
    """No snapshot with this id in the store (never saved, evicted or removed)."""


class SnapshotMissingSegmentError(SnapshotError):
    """A segment the snapshot refers to is gone (deleted by hand or by another tool)."""


class SnapshotCorruptError(SnapshotError):
    """A file is truncated, fails its checksum or does not describe a valid state."""


class SnapshotVersionError(SnapshotError):
    """The file was written by a format version this build does not read."""


class SnapshotFingerprintError(SnapshotError):
    """The snapshot belongs to other weights, quantization or numerics."""


class SnapshotDiskFullError(SnapshotError):
    """The disk filled up during a save; nothing partial was left behind."""


class SnapshotIOError(SnapshotError):
    """Any other operating-system error while reading or writing the store."""


class SnapshotInvalidError(SnapshotError):
    """The state handed to `save` is inconsistent (a caller or engine bug)."""


class SnapshotBudgetError(SnapshotError):
    """The snapshot alone is larger than the whole disk budget, so it was not written."""
