"""Pydantic models at the store's boundaries: file headers on disk and what callers get back."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class EncMeta(BaseModel):
    """How one [n, d] row array is encoded (see codec.EncodedRows)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    n: int = Field(ge=0)
    d: int = Field(ge=0)
    fmt: str
    modes: str


class ArrayMeta(BaseModel):
    """A plain array (frontier, MTP state): raw bytes, run-length coded ("runs"), or only its
    rows that are not canonical fill, in the compact row form ("rows", float32 [R, C])."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    shape: list[int]
    dtype: str
    enc: str  # "raw" | "runs" | "rows"
    rows: EncMeta | None = None  # enc == "rows": how the stored rows are encoded


class SegmentRef(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    name: str
    start: int
    end: int
    nbytes: int


class StackMeta(BaseModel):
    """Rows of several layers stacked layer-major and encoded as one array: one decode call
    fills the same row range of every layer in the stack."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    prefix: str  # section name prefix
    what: str  # "raw" | "comp" | "index"
    layers: list[int]
    enc: EncMeta


class SegmentMeta(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    fingerprint: str
    numerics: str
    segment_tokens: int
    start: int
    end: int
    prefix_hash: str
    content_hash: str
    ratios: list[int]
    stacks: list[StackMeta]


class SnapshotLayerMeta(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    kind: str
    ratio: int
    raw_shape: list[int]
    comp_dim: int | None = None
    index_dim: int | None = None
    frontiers: dict[str, ArrayMeta] = Field(default_factory=dict)


class SnapshotMeta(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    id: str
    fingerprint: str
    numerics: str
    n_tokens: int = Field(ge=0)
    segment_tokens: int
    created: float
    has_logits: bool
    segments: list[SegmentRef]
    layers: list[SnapshotLayerMeta]
    stacks: list[StackMeta]  # raw windows and the rows after the last full segment
    mtp: dict[str, ArrayMeta] | None = None


class Sidecar(BaseModel):
    """Mutable bookkeeping next to an immutable snapshot file (`<id>.meta.json`)."""

    model_config = ConfigDict(extra="ignore")
    id: str
    n_tokens: int
    fingerprint: str
    created: float
    last_used: float
    hits: float = 0.0  # decayed hit count at `last_used`
    pins: list[str] = Field(default_factory=list)


class SnapshotRef(BaseModel):
    """What `save` and `longest_prefix` return; pass it (or its `id`) to `load`.

    JSON-serialisable (`model_dump(mode="json")`), so sessions can keep it in their metadata.
    """

    model_config = ConfigDict(frozen=True)
    id: str
    n_tokens: int
    fingerprint: str
    created: float = 0.0
    last_used: float = 0.0
    hits: float = 0.0
    pins: tuple[str, ...] = ()
    bytes: int = 0  # the snapshot's own file (segments may be shared)

    def __str__(self) -> str:
        return self.id


class RemovedSnapshot(BaseModel):
    id: str
    n_tokens: int
    bytes: int  # freed by removing it, segments no longer referenced included
    reason: str  # "budget" | "damaged" | "removed"


class GcReport(BaseModel):
    usage_before: int
    usage_after: int
    budget_bytes: int | None
    removed: list[RemovedSnapshot] = Field(default_factory=list)
    removed_segments: int = 0
    removed_temp_files: int = 0
    freed_bytes: int = 0
    pinned_bytes: int = 0
    over_budget: bool = False  # still over the budget: only pinned data is left


class StoreUsage(BaseModel):
    total_bytes: int
    snapshot_bytes: int
    segment_bytes: int
    n_snapshots: int
    n_segments: int
    n_pinned: int
    budget_bytes: int | None
