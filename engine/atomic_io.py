"""Crash-safe file replacement: temp file in the same directory, fsync, rename, fsync the dir.

Readers of a file written here see either the old or the new content, never a mix, and after
a power cut the file is either the old or the new one. Every package writes through this
module so that the rules (same-directory temp file, O_EXCL creation, cleanup on failure) live
in one place.

Permissions: a new file gets 0666 minus the umask (os.open applies it; reading the umask
would mean changing it, which is process-wide and not thread-safe); an existing file keeps
its permission bits (an edited script stays executable) unless `mode` is given.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

TMP_SUFFIX = ".tmp"

# What tempfile.mkstemp gives: callers that always wrote through it pass this to keep the
# permissions their files have had.
PRIVATE_MODE = 0o600


def fsync_dir(directory: Path, *, strict: bool = False) -> None:
    """Make a rename inside `directory` durable.

    Not every platform allows opening a directory for fsync, and a failure there does not make
    the data less consistent, so errors are ignored unless `strict` (callers whose durability
    promise depends on it).
    """
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        if strict:
            raise
        return
    try:
        os.fsync(fd)
    except OSError:
        if strict:
            raise
    finally:
        os.close(fd)


def create_temp(path: Path, *, tag: str = "", suffix: str = TMP_SUFFIX) -> tuple[int, Path]:
    """Create an empty, hidden temp file next to `path` (O_EXCL, 0666 minus the umask).

    Returns the open write descriptor and its path. `tag` goes into the name (e.g. a pid, so a
    leftover can be traced to its writer); the name ends in `suffix` so cleanups can find it.
    """
    parent = path.parent
    for _ in range(100):
        tmp = parent / f".{path.name}.{tag}{secrets.token_hex(6)}{suffix}"
        try:
            return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), tmp
        except FileExistsError:
            continue
    raise FileExistsError(f"could not create a temporary file next to {path}")


def _target_mode(path: Path, mode: int | None) -> int | None:
    if mode is not None:
        return mode
    try:
        return stat.S_IMODE(path.stat().st_mode)
    except FileNotFoundError:
        return None


@contextlib.contextmanager
def atomic_fd(
    path: Path | str,
    *,
    mode: int | None = None,
    sync_dir: bool = True,
    parents: bool = True,
    tag: str = "",
    suffix: str = TMP_SUFFIX,
) -> Iterator[tuple[int, Path]]:
    """Yield `(fd, tmp_path)` of a fresh temp file; on a clean exit fsync it and rename it over
    `path` (then fsync the directory unless `sync_dir` is False, for callers that batch it).

    The body may write through `fd` or reopen `tmp_path` (e.g. a memory-mapped .npy); the
    fsync on `fd` covers both, since it flushes the file, not the descriptor. The body must
    not close `fd`. On any exception the temp file is removed and `path` is untouched.
    `parents` creates missing parent directories.
    """
    path = Path(path)
    if parents:
        path.parent.mkdir(parents=True, exist_ok=True)
    final_mode = _target_mode(path, mode)
    fd, tmp = create_temp(path, tag=tag, suffix=suffix)
    try:
        try:
            yield fd, tmp
            os.fsync(fd)
        finally:
            os.close(fd)
        if final_mode is not None:
            os.chmod(tmp, final_mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    if sync_dir:
        fsync_dir(path.parent)


@contextlib.contextmanager
def atomic_path(path: Path | str, **kw: Any) -> Iterator[Path]:
    """Like `atomic_fd` for writers that need a file name (e.g. numpy's open_memmap)."""
    with atomic_fd(path, **kw) as (_fd, tmp):
        yield tmp


@contextlib.contextmanager
def atomic_open(
    path: Path | str, text: bool = False, *, encoding: str = "utf-8", **kw: Any
) -> Iterator[IO[Any]]:
    """Yield a file object (binary, or text with `encoding`) for streaming writers (np.savez,
    csv); it is flushed, fsynced and renamed into place on a clean exit."""
    with atomic_fd(path, **kw) as (fd, _tmp):
        # closefd=False: atomic_fd owns the descriptor and fsyncs it after the body.
        f = open(fd, "w" if text else "wb", encoding=encoding if text else None, closefd=False)  # noqa: SIM115
        with f:
            yield f
            f.flush()


def atomic_write_bytes(
    path: Path | str, data: bytes, *, mode: int | None = None, parents: bool = True
) -> None:
    """Replace `path` with `data` atomically (missing parent directories are created unless
    `parents` is False)."""
    with atomic_fd(path, mode=mode, parents=parents) as (fd, _tmp):
        view = memoryview(data).cast("B")
        while len(view):
            view = view[os.write(fd, view) :]


def atomic_write_text(
    path: Path | str,
    text: str,
    *,
    encoding: str = "utf-8",
    mode: int | None = None,
    parents: bool = True,
) -> None:
    atomic_write_bytes(path, text.encode(encoding), mode=mode, parents=parents)


def atomic_write_json(
    path: Path | str, obj: Any, *, mode: int | None = None, **dumps_kw: Any
) -> None:
    """`json.dumps(obj, **dumps_kw)` written atomically as UTF-8."""
    atomic_write_text(path, json.dumps(obj, **dumps_kw), mode=mode)


def atomic_copy(src: Path | str, dst: Path | str, *, mode: int | None = None) -> None:
    atomic_write_bytes(dst, Path(src).read_bytes(), mode=mode)
