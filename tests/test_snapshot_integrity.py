"""Every way a snapshot can go bad gives one clear SnapshotError, and older snapshots survive.

Setup: snapshot A (600 tokens) and snapshot B (1300 tokens) extending it; with 256-token
segments they share two segments and B owns three more. Each case damages something of B's.
"""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from ds4_agent.sessions import snapshot_format
from ds4_agent.sessions.snapshot_synth import exports_equal, synth_export, tiny_config
from ds4_agent.sessions.snapshots import (
    SnapshotCorruptError,
    SnapshotDiskFullError,
    SnapshotError,
    SnapshotFingerprintError,
    SnapshotMissingSegmentError,
    SnapshotStore,
    SnapshotVersionError,
)

CFG = tiny_config()
FP = "fp-integrity"
IDS = np.random.default_rng(7).integers(2, CFG.vocab, 1300).astype(np.int32)


@pytest.fixture
def world(tmp_path):
    store = SnapshotStore(tmp_path, segment_tokens=256, verify_decoded=True)
    a = store.save(synth_export(CFG, IDS[:600]), FP)
    before = {p.name for p in store.seg_dir.rglob("*.seg")}
    b = store.save(synth_export(CFG, IDS), FP)
    own = sorted(p for p in store.seg_dir.rglob("*.seg") if p.name not in before)
    assert len(before) == 2 and len(own) == 3
    return store, a, b, own


def assert_a_still_loads(store, a):
    assert exports_equal(store.load(a, FP), synth_export(CFG, IDS[:600])) is None


def assert_clear(err: SnapshotError):
    msg = str(err)
    assert "\n" not in msg and "re-prefill from the transcript" in msg, msg


def flip(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x10
    path.write_bytes(bytes(data))


def test_truncated_segment(world):
    store, a, b, own = world
    data = own[1].read_bytes()
    own[1].write_bytes(data[: len(data) // 2])
    with pytest.raises(SnapshotCorruptError, match="truncated") as e:
        store.load(b, FP)
    assert_clear(e.value)
    assert_a_still_loads(store, a)


def test_flipped_byte_in_a_segment_and_recovery_by_saving_again(world):
    store, a, b, own = world
    flip(own[0], own[0].stat().st_size - 100)
    with pytest.raises(SnapshotCorruptError, match="checksum") as e:
        store.load(b, FP)
    assert_clear(e.value)
    assert_a_still_loads(store, a)
    # The damaged segment was dropped, so saving the state again repairs the snapshot.
    store.save(synth_export(CFG, IDS), FP)
    assert exports_equal(store.load(b, FP), synth_export(CFG, IDS)) is None


@pytest.mark.parametrize("where", ["header", "body"])
def test_flipped_byte_in_the_snapshot_file(world, where):
    store, a, b, _ = world
    path = store._snap_path(b.id)
    flip(path, 200 if where == "header" else path.stat().st_size - 5)
    with pytest.raises(SnapshotCorruptError, match="checksum") as e:
        store.load(b, FP)
    assert_clear(e.value)
    assert_a_still_loads(store, a)


def test_saving_again_after_a_damaged_snapshot_file_rewrites_its_damaged_segments(world):
    """A damaged snapshot file hides which segments it used; if one of them is damaged too,
    the save that replaces the snapshot must not reuse it, so the next load works at once."""
    store, a, b, own = world
    flip(store._snap_path(b.id), store._snap_path(b.id).stat().st_size - 5)
    flip(own[1], own[1].stat().st_size // 2)
    with pytest.raises(SnapshotCorruptError):
        store.load(b, FP)
    before = own[1].stat().st_mtime_ns
    ref = store.save(synth_export(CFG, IDS), FP)  # the session layer's re-prefill saves again
    assert own[1].stat().st_mtime_ns != before  # rewritten, not reused
    assert exports_equal(store.load(ref, FP), synth_export(CFG, IDS)) is None
    assert_a_still_loads(store, a)
    assert not (store.root / "damage-seen").exists()


def test_missing_segment(world):
    store, a, b, own = world
    own[2].unlink()
    with pytest.raises(SnapshotMissingSegmentError, match="missing") as e:
        store.load(b, FP)
    assert_clear(e.value)
    assert_a_still_loads(store, a)


def test_wrong_fingerprint(world):
    store, a, b, _ = world
    with pytest.raises(SnapshotFingerprintError, match="another model build") as e:
        store.load(b, "fp-other")
    assert_clear(e.value)
    assert store.longest_prefix(IDS, "fp-other") is None
    assert_a_still_loads(store, a)


@pytest.mark.parametrize(
    "target, version", [("snapshot", 1), ("segment", 1), ("snapshot", 99), ("segment", 99)]
)
def test_unknown_version(world, target, version):
    """Older (1: full segments only, run-length frontiers) and newer formats are refused with
    the re-prefill message, never misread."""
    store, a, b, own = world
    assert version != snapshot_format.FORMAT_VERSION
    path = store._snap_path(b.id) if target == "snapshot" else own[0]
    data = bytearray(path.read_bytes())
    data[8:12] = version.to_bytes(4, "little")
    path.write_bytes(bytes(data))
    with pytest.raises(SnapshotVersionError, match=f"format version {version},") as e:
        store.load(b, FP)
    assert_clear(e.value)
    assert_a_still_loads(store, a)


def test_disk_full_during_save(world, monkeypatch):
    store, a, b, _ = world
    written = 0
    real_write = snapshot_format._os_write

    def filling_write(fd, data):
        nonlocal written
        if written > 150_000:
            raise OSError(errno.ENOSPC, "No space left on device")
        n = real_write(fd, data)
        written += n
        return n

    segs_before = sorted(store.seg_dir.rglob("*.seg"))
    monkeypatch.setattr(snapshot_format, "_os_write", filling_write)
    longer = np.concatenate([IDS, IDS[:1000]])
    with pytest.raises(SnapshotDiskFullError, match="no space left") as e:
        store.save(synth_export(CFG, longer), FP)
    assert "\n" not in str(e.value) and "kv-disk-space-mb" in str(e.value)
    monkeypatch.setattr(snapshot_format, "_os_write", real_write)
    assert not list(store.root.rglob("*.tmp"))  # the failed file was removed…
    assert sorted(store.seg_dir.rglob("*.seg")) == segs_before  # …and the segments before it
    assert store.longest_prefix(longer, FP).id == b.id  # the new snapshot does not exist
    assert exports_equal(store.load(b, FP), synth_export(CFG, IDS)) is None
    assert_a_still_loads(store, a)
    report = store.gc()
    assert report.removed_segments == 0 and not report.removed
    assert exports_equal(store.load(b, FP), synth_export(CFG, IDS)) is None


def test_random_damage_never_escapes_as_another_exception(world):
    store, a, b, own = world
    rng = np.random.default_rng(0)
    files = [store._snap_path(b.id), *own]
    originals = {p: p.read_bytes() for p in files}
    for trial in range(40):
        path = files[trial % len(files)]
        data = bytearray(originals[path])
        if trial % 5 == 4:
            data = data[: int(rng.integers(0, len(data)))]
        else:
            for _ in range(int(rng.integers(1, 4))):
                data[int(rng.integers(0, len(data)))] ^= int(rng.integers(1, 256))
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(bytes(data))
        try:
            store.load(b, FP)
        except SnapshotError as e:
            assert "\n" not in str(e)
        path.write_bytes(originals[path])
    assert_a_still_loads(store, a)


_CHILD = textwrap.dedent(
    """
    import sys, numpy as np
    from pathlib import Path
    from ds4_agent.sessions.snapshot_synth import synth_export, tiny_config
    from ds4_agent.sessions.snapshots import SnapshotStore
    store = SnapshotStore(Path(sys.argv[1]), segment_tokens=256)
    cfg = tiny_config()
    base = np.random.default_rng(7).integers(2, cfg.vocab, 1300).astype(np.int32)
    ex = synth_export(cfg, np.concatenate([base, np.full(20000, 5, np.int32)]))
    print("ready", flush=True)
    i = 0
    while True:
        # New ids after the shared 1300: every save writes ~80 new segments, then a snapshot.
        ex.tokens = ex.tokens.copy()
        ex.tokens[1300:] = i
        store.save(ex, "fp-integrity")
        i += 1
    """
)


def _kill_when(child: subprocess.Popen, root: Path, n_new_segments: int) -> None:
    """SIGKILL the saving child mid-save: as soon as a temp file shows up (n = 0) or once
    `n_new_segments` segments of its save exist but not yet the snapshot naming them."""
    start_segs = len(list(root.rglob("*.seg")))
    start_snaps = len(list(root.rglob("*.snap")))
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline and child.poll() is None:
            if n_new_segments == 0 and list(root.rglob("*.tmp")):
                break
            if n_new_segments and len(list(root.rglob("*.seg"))) - start_segs >= n_new_segments:
                break
            time.sleep(0.002)
        assert len(list(root.rglob("*.snap"))) == start_snaps, "the save finished before the kill"
    finally:
        os.kill(child.pid, signal.SIGKILL)
        child.wait()


@pytest.mark.slow
def test_process_killed_during_save(world):
    store, a, b, _ = world
    for n_new in (0, 3, 20):
        child = subprocess.Popen(
            [sys.executable, "-c", _CHILD, str(store.root)],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert child.stdout.readline().strip() == "ready"
        _kill_when(child, store.root, n_new)
        # Whatever the moment of death: old snapshots load, listed ones are complete.
        assert exports_equal(store.load(b, FP), synth_export(CFG, IDS)) is None
        assert_a_still_loads(store, a)
        assert {r.id for r in store.list()} == {a.id, b.id}
    report = store.gc()
    assert not list(store.root.rglob("*.tmp"))
    print(
        f"after kills: gc removed {report.removed_temp_files} temp files, {report.removed_segments} segments"
    )
    assert report.removed_segments >= 20  # it did die mid-save, leaving unreferenced segments
    assert_a_still_loads(store, a)
    assert exports_equal(store.load(b, FP), synth_export(CFG, IDS)) is None
