"""engine/atomic_io.py: the one crash-safe writer every package uses."""

from __future__ import annotations

import os
import stat

import numpy as np
import pytest
from ds4_agent.engine.atomic_io import (
    PRIVATE_MODE,
    TMP_SUFFIX,
    atomic_open,
    atomic_path,
    atomic_write_bytes,
    atomic_write_json,
    fsync_dir,
)


def _mode(p) -> int:
    return stat.S_IMODE(p.stat().st_mode)


def test_new_file_follows_umask_and_parents_are_created(tmp_path):
    old = os.umask(0o027)
    try:
        p = tmp_path / "a" / "b" / "f.txt"
        atomic_write_bytes(p, b"hello")
    finally:
        os.umask(old)
    assert p.read_bytes() == b"hello"
    assert _mode(p) == 0o640
    assert list(p.parent.iterdir()) == [p]  # no temp file left behind


def test_existing_mode_kept_unless_given(tmp_path):
    p = tmp_path / "run.sh"
    p.write_bytes(b"old")
    p.chmod(0o755)
    atomic_write_bytes(p, b"new")
    assert (p.read_bytes(), _mode(p)) == (b"new", 0o755)
    atomic_write_json(p, {"k": [1, 2]}, mode=PRIVATE_MODE, sort_keys=True)
    assert (p.read_text(), _mode(p)) == ('{"k": [1, 2]}', 0o600)


def test_failure_leaves_old_file_and_no_temp(tmp_path):
    p = tmp_path / "f.bin"
    p.write_bytes(b"old")
    with pytest.raises(RuntimeError, match="boom"), atomic_open(p) as f:
        f.write(b"half")
        raise RuntimeError("boom")
    assert p.read_bytes() == b"old"
    assert [x.name for x in tmp_path.iterdir()] == ["f.bin"]


def test_parents_false_refuses_missing_directory(tmp_path):
    with pytest.raises(FileNotFoundError):
        atomic_write_bytes(tmp_path / "missing" / "f", b"x", parents=False)
    assert not (tmp_path / "missing").exists()


def test_streaming_writers_by_name_and_handle(tmp_path):
    out = tmp_path / "x.npy"
    with atomic_path(out, tag="7.") as tmp:
        assert tmp.name.startswith(".x.npy.7.") and tmp.name.endswith(TMP_SUFFIX)
        arr = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=(3, 2))
        arr[:] = 1.5
        arr.flush()
        del arr
    assert np.load(out).tolist() == [[1.5, 1.5]] * 3
    with atomic_open(tmp_path / "t.csv", text=True) as f:
        f.write("a,b\n1,2\n")
    assert (tmp_path / "t.csv").read_text() == "a,b\n1,2\n"


def test_fsync_dir_strict_raises_only_when_asked(tmp_path):
    fsync_dir(tmp_path / "nope")  # best effort: silently nothing
    with pytest.raises(FileNotFoundError):
        fsync_dir(tmp_path / "nope", strict=True)
