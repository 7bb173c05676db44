"""Crash-safe file replacement: temp file in the same directory, fsync, rename, fsync the dir."""

from __future__ import annotations

import contextlib
import os
import secrets
import stat
from pathlib import Path


def fsync_dir(directory: Path) -> None:
    # Directory fsync makes the rename itself durable; not every platform allows opening a
    # directory for it, and a failure here does not make the data less consistent.
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: Path, data: bytes, mode: int | None = None) -> None:
    """Replace `path` with `data` so that readers see either the old or the new file, never a mix.

    Keeps the permission bits of an existing file (an edited script stays executable) unless
    `mode` is given; a new file gets the usual 0666 minus the umask. Missing parent
    directories are created.
    """
    path = Path(path)
    parent = path.parent
    parent.mkdir(parents=True, exist_ok=True)
    if mode is None:
        try:
            mode = stat.S_IMODE(path.stat().st_mode)
        except FileNotFoundError:
            mode = None
    # os.open applies the umask itself (reading the umask would mean changing it, which is
    # process-wide and not thread-safe).
    for _ in range(100):
        tmp = parent / f".{path.name}.{secrets.token_hex(6)}.tmp"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
            break
        except FileExistsError:
            continue
    else:
        raise FileExistsError(f"could not create a temporary file next to {path}")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        if mode is not None:
            os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_dir(parent)
