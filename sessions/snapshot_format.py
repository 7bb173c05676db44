"""The on-disk container shared by snapshot and segment files, and atomic file writes.

Layout (little-endian):

    magic       8 bytes   b"DS4KVSN\\n" (snapshot) or b"DS4KVSG\\n" (segment)
    version     u32       FORMAT_VERSION
    header_len  u32
    header_sum  u64       xxh3-64 of magic, version, header_len and the header bytes
    header      header_len bytes of JSON (`ContainerHeader`)
    padding     to a multiple of 64
    body        the sections back to back, each 64-aligned; xxh3-128 of the body in the header

A reader checks, in order: magic, version, header length, header checksum, header schema,
exact file size, body checksum, then that every section lies inside the body with a shape that
matches its dtype and byte count. Only then is a single byte of state used.
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import xxhash
from ds4_agent.engine.atomic_io import PRIVATE_MODE, atomic_fd, fsync_dir

# Re-exported: the store's gc and `doctor` find leftover temp files by it.
from ds4_agent.engine.atomic_io import TMP_SUFFIX as TMP_SUFFIX
from ds4_agent.sessions.snapshot_errors import (
    SnapshotCorruptError,
    SnapshotDiskFullError,
    SnapshotIOError,
    SnapshotVersionError,
)
from pydantic import BaseModel, ConfigDict, ValidationError

# 2: 128-token chunks after (and within partly stored) full segments, frontiers as their
# non-canonical rows in the compact row form, rows after the last chunk in the snapshot file.
FORMAT_VERSION = 2
MAGIC_SNAPSHOT = b"DS4KVSN\n"
MAGIC_SEGMENT = b"DS4KVSG\n"
_PREFIX = struct.Struct("<8sIIQ")  # magic, version, header_len, header checksum
_ALIGN = 64
_MAX_HEADER = 64 << 20
_DTYPES = {"uint8", "uint16", "uint32", "int32", "int64", "float16", "float32", "float64"}

# Indirection so that tests can simulate a full disk without touching the real one.
_os_write = os.write


class SectionInfo(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    name: str
    offset: int
    nbytes: int
    dtype: str
    shape: list[int]


class ContainerHeader(BaseModel):
    model_config = ConfigDict(extra="forbid")
    kind: str  # "snapshot" | "segment"
    format_version: int
    body_len: int
    body_xxh3_128: str
    sections: list[SectionInfo]
    meta: dict


_DTYPE_OBJ = {name: np.dtype(name) for name in _DTYPES}


def _dtype(name: str) -> np.dtype:
    return _DTYPE_OBJ.get(name) or np.dtype(name)


def _pad(n: int) -> int:
    return (-n) % _ALIGN


def encode_container(
    magic: bytes, kind: str, meta: dict, sections: dict[str, np.ndarray]
) -> list[memoryview | bytes]:
    """Serialize to a list of buffers (no copy of the section data)."""
    infos: list[SectionInfo] = []
    chunks: list[memoryview | bytes] = []
    body_hash = xxhash.xxh3_128()
    offset = 0
    for name, arr in sections.items():
        arr = np.ascontiguousarray(arr)
        if arr.dtype.name not in _DTYPES:
            raise ValueError(f"section {name} has unsupported dtype {arr.dtype}")
        infos.append(
            SectionInfo(
                name=name,
                offset=offset,
                nbytes=arr.nbytes,
                dtype=arr.dtype.name,
                shape=list(arr.shape),
            )
        )
        data = memoryview(arr.reshape(-1).view(np.uint8))
        pad = b"\0" * _pad(arr.nbytes)
        for piece in (data, pad):
            if len(piece):
                body_hash.update(piece)
                chunks.append(piece)
        offset += arr.nbytes + len(pad)
    header = ContainerHeader(
        kind=kind,
        format_version=FORMAT_VERSION,
        body_len=offset,
        body_xxh3_128=body_hash.hexdigest(),
        sections=infos,
        meta=meta,
    )
    hbytes = json.dumps(header.model_dump(), separators=(",", ":")).encode()
    start = _PREFIX.pack(magic, FORMAT_VERSION, len(hbytes), 0)[:16]
    hsum = xxhash.xxh3_64_intdigest(start + hbytes)
    head = start + struct.pack("<Q", hsum) + hbytes
    head += b"\0" * _pad(len(head))
    return [head, *chunks]


class Container:
    """A validated file: header plus zero-copy numpy views of its sections."""

    def __init__(self, header: ContainerHeader, body: np.ndarray, path: Path):
        self.header = header
        self.meta = header.meta
        self.path = path
        self._body = body
        # name -> (offset, nbytes, dtype, shape), resolved once (a restore makes ~2,000 gets)
        self._sections = {
            s.name: (s.offset, s.nbytes, _dtype(s.dtype), tuple(s.shape)) for s in header.sections
        }

    def names(self) -> list[str]:
        return list(self._sections)

    def has(self, name: str) -> bool:
        return name in self._sections

    def get(self, name: str) -> np.ndarray:
        s = self._sections.get(name)
        if s is None:
            raise SnapshotCorruptError(f"{self.path.name}: section {name!r} is missing")
        offset, nbytes, dtype, shape = s
        return self._body[offset : offset + nbytes].view(dtype).reshape(shape)


def _corrupt(path: Path, why: str) -> SnapshotCorruptError:
    return SnapshotCorruptError(
        f"{path.name} is damaged ({why}); the snapshot cannot be used — re-prefill from the transcript"
    )


def read_header_only(path: Path, magic: bytes) -> ContainerHeader:
    """Read and verify just the header (for listings); the body is not checked."""
    with open(path, "rb") as f:
        prefix = f.read(_PREFIX.size)
        header = _parse_prefix(path, magic, prefix, os.fstat(f.fileno()).st_size)
        hbytes = f.read(header)
    return _parse_header(path, prefix, hbytes)


def _parse_prefix(path: Path, magic: bytes, prefix: bytes, size: int) -> int:
    if len(prefix) < _PREFIX.size:
        raise _corrupt(path, f"only {size} bytes, shorter than a header")
    got_magic, version, hlen, _ = _PREFIX.unpack(prefix)
    if got_magic != magic:
        raise _corrupt(path, "not a ds4-agent snapshot file (bad magic)")
    if version != FORMAT_VERSION:
        raise SnapshotVersionError(
            f"{path.name} uses snapshot format version {version}, this build reads version "
            f"{FORMAT_VERSION}; re-prefill from the transcript (or use the build that wrote it)"
        )
    if hlen > min(_MAX_HEADER, size - _PREFIX.size):
        raise _corrupt(path, f"header length {hlen} does not fit the {size}-byte file")
    return hlen


def _parse_header(path: Path, prefix: bytes, hbytes: bytes) -> ContainerHeader:
    want = struct.unpack("<Q", prefix[16:24])[0]
    if xxhash.xxh3_64_intdigest(prefix[:16] + hbytes) != want:
        raise _corrupt(path, "header checksum mismatch")
    try:
        header = ContainerHeader.model_validate_json(hbytes)
    except ValidationError as e:
        raise _corrupt(path, f"invalid header: {e.errors()[0]['msg']}") from None
    if header.format_version != FORMAT_VERSION:
        raise _corrupt(path, "header version disagrees with the file prefix")
    return header


def read_container(path: Path, magic: bytes, buffer: np.ndarray | None = None) -> Container:
    """Read and fully validate a container file; raises SnapshotError subclasses only.

    With `buffer` (uint8, 1-D) the body is read into it when it is large enough: a reader of
    many files reuses a few buffers instead of page-faulting fresh memory for every file. The
    Container's sections are views into the buffer, valid until it is reused."""
    try:
        with open(path, "rb", buffering=0) as f:
            size = os.fstat(f.fileno()).st_size
            prefix = f.read(_PREFIX.size)
            hlen = _parse_prefix(path, magic, prefix, size)
            hbytes = f.read(hlen)
            header = _parse_header(path, prefix, hbytes)
            body_start = _PREFIX.size + hlen + _pad(_PREFIX.size + hlen)
            if size != body_start + header.body_len:
                raise _corrupt(
                    path,
                    f"size is {size} bytes, expected {body_start + header.body_len} (truncated?)",
                )
            if buffer is not None and buffer.dtype == np.uint8 and buffer.size >= header.body_len:
                body = buffer[: header.body_len]
            else:
                body = np.empty(header.body_len, dtype=np.uint8)
            f.seek(body_start)
            digest = _read_hashed(f, memoryview(body), path)
    except FileNotFoundError:
        raise
    except OSError as e:
        raise SnapshotIOError(f"cannot read {path.name}: {e.strerror or e}") from None
    if digest != header.body_xxh3_128:
        raise _corrupt(path, "data checksum mismatch")
    for s in header.sections:
        if s.dtype not in _DTYPES or s.offset < 0 or s.offset + s.nbytes > header.body_len:
            raise _corrupt(path, f"section {s.name!r} lies outside the file")
        if math.prod(s.shape) * _DTYPE_OBJ[s.dtype].itemsize != s.nbytes:
            raise _corrupt(path, f"section {s.name!r} shape does not match its size")
    return Container(header, body, path)


# Read size per step: small enough that each piece is hashed while it is still in the CPU's
# cache (hashing the whole body after reading it fetches it from memory again).
_READ_STEP = 1 << 20


def _read_hashed(f, view: memoryview, path: Path) -> str:
    """Fill `view` from `f` and return the xxh3-128 hex digest of its bytes."""
    h = xxhash.xxh3_128()
    n = 0
    while n < len(view):
        got = f.readinto(view[n : n + _READ_STEP])
        if not got:
            raise _corrupt(path, "file ended early")
        h.update(view[n : n + got])
        n += got
    return h.hexdigest()


# --------------------------------------------------------------------------------------------
# Atomic writes


def write_atomic(path: Path, chunks: list, *, sync_dir: bool = True) -> int:
    """temp file in the same directory → write → fsync → rename → (directory fsync).

    On any failure the temp file is removed and the old `path` (if any) is untouched.
    Returns the bytes written. The directory fsync is strict: a snapshot is only promised
    durable once its rename is.
    """
    total = 0
    try:
        # PRIVATE_MODE: snapshot files have always been 0600 (tempfile.mkstemp).
        with atomic_fd(path, mode=PRIVATE_MODE, sync_dir=False, tag=f"{os.getpid()}.") as (
            fd,
            _tmp,
        ):
            for chunk in chunks:
                view = memoryview(chunk).cast("B")
                while len(view):
                    n = _os_write(fd, view[: 64 << 20])
                    total += n
                    view = view[n:]
    except OSError as e:
        raise translate_os_error(e, f"writing {path.name}") from None
    if sync_dir:
        fsync_dir(path.parent, strict=True)
    return total


def translate_os_error(e: OSError, what: str) -> Exception:
    import errno

    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return SnapshotDiskFullError(
            f"no space left on the device while {what}; the previous snapshot is intact — "
            "free disk space or lower --kv-disk-space-mb"
        )
    return SnapshotIOError(f"operating-system error while {what}: {e.strerror or e}")


@contextmanager
def open_lock(path: Path, exclusive: bool) -> Iterator[None]:
    """An advisory whole-store lock (flock): saves and gc exclusive, loads shared."""
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        yield
    finally:
        os.close(fd)
