"""Snapshot store: exact round trips, shared segments, prefix lookup, pins, eviction, gc."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
from ds4_agent.sessions.snapshot_synth import exports_equal, synth_export, tiny_config
from ds4_agent.sessions.snapshots import (
    SnapshotBudgetError,
    SnapshotError,
    SnapshotInvalidError,
    SnapshotNotFoundError,
    SnapshotRef,
    SnapshotStore,
)

CFG = tiny_config()
FP = "fingerprint-A"


def toks(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(2, CFG.vocab, n).astype(np.int32)


def seg_files(store: SnapshotStore) -> set[str]:
    return {p.name for p in store.seg_dir.rglob("*.seg")}


@pytest.mark.parametrize("numerics", ["official", "exact"])
@pytest.mark.parametrize("t", [0, 1, 3, 127, 129, 301, 1024, 1153])
def test_round_trip_is_bit_identical(tmp_path, numerics, t):
    ex = synth_export(CFG, toks(t), numerics)
    store = SnapshotStore(tmp_path, segment_tokens=256)
    ref = store.save(ex, FP)
    assert ref.n_tokens == t
    back = SnapshotStore(tmp_path, segment_tokens=256, verify_decoded=True).load(ref.id, FP)
    assert exports_equal(ex, back) is None
    # Full 256-token segments, then 128-token chunks; the last t mod 128 tokens' rows live
    # in the snapshot file.
    assert len(seg_files(store)) == t // 256 + (t % 256) // 128


def test_compact_form_is_used_in_official_numerics(tmp_path):
    t = 4096
    sizes = {}
    for numerics in ("official", "exact"):
        store = SnapshotStore(tmp_path / numerics, segment_tokens=1024)
        store.save(synth_export(CFG, toks(t), numerics), FP)
        sizes[numerics] = store.usage().segment_bytes / t
    # Per token: 2 CSA layers × (256-wide row + 128-wide key) / 4 + 2 HCA rows / 128.
    compact = 2 * (3 * 65 + 128 + 68) / 4 + 2 * (3 * 65 + 128) / 128
    print(f"bytes/token in segments: official {sizes['official']:.1f}, exact {sizes['exact']:.1f}")
    assert sizes["official"] < 1.05 * compact
    assert sizes["exact"] > 2.5 * sizes["official"]


def test_continuing_writes_only_new_segments(tmp_path):
    store = SnapshotStore(tmp_path, segment_tokens=256)
    ids = toks(2000)
    store.save(synth_export(CFG, ids[:1200]), FP)
    first = seg_files(store)
    assert len(first) == 5  # 4 segments + the chunk 1024–1152
    mtimes = {p.name: p.stat().st_mtime_ns for p in store.seg_dir.rglob("*.seg")}
    store.save(synth_export(CFG, ids[:2000]), FP)
    second = seg_files(store)
    # 1024–1280 reuses its stored chunk and adds one; 1280–1792 as two segments; one chunk
    # 1792–1920.
    assert first < second and len(second) == 5 + 1 + 2 + 1
    for p in store.seg_dir.rglob("*.seg"):
        if p.name in mtimes:
            assert p.stat().st_mtime_ns == mtimes[p.name]  # never rewritten


def test_forks_share_their_prefix(tmp_path, capsys):
    """A 10k-token session forked twice, each continued by 1k tokens: the disk grows by the
    rows of the new tokens plus each fork's fixed part, not by two copies."""
    store = SnapshotStore(tmp_path, segment_tokens=1024)
    base = toks(10_000)
    store.save(synth_export(CFG, base), FP)
    u0 = store.usage()
    segs0 = seg_files(store)
    forks = [np.concatenate([base, toks(1000, seed=s)]) for s in (1, 2)]
    refs = [store.save(synth_export(CFG, ids), FP) for ids in forks]
    u2 = store.usage()
    new_segs = seg_files(store) - segs0
    growth = u2.total_bytes - u0.total_bytes
    seg_growth = u2.segment_bytes - u0.segment_bytes
    fixed = sum(r.bytes for r in refs)
    alone = SnapshotStore(tmp_path / "alone", segment_tokens=1024)
    alone.save(synth_export(CFG, forks[0]), FP)
    two_copies = 2 * alone.usage().total_bytes
    with capsys.disabled():
        print(
            f"\nfork test (tiny config): 10k-token session {u0.total_bytes / 1e6:.2f} MB on disk; "
            f"two forks +1k tokens each grew it by {growth / 1e6:.2f} MB = "
            f"{seg_growth / 1e6:.2f} MB new segments + {fixed / 1e6:.2f} MB snapshot files "
            f"(raw windows, frontiers, rows after the last segment); two copies: "
            f"{two_copies / 1e6:.2f} MB"
        )
    # The base stored 9 segments and the chunks 9216–9984; each fork shares them and adds
    # the chunks 9984–10880 (2 to finish the tenth segment's range + 5): only rows of its own
    # tokens (and of the 16 base tokens in the chunk 9984–10112).
    assert len(new_segs) == 2 * 7 and segs0 <= seg_files(store)
    per_token = u0.segment_bytes / 9984
    assert seg_growth <= 2 * 1000 * per_token
    assert growth <= seg_growth + fixed + 4096  # + the two sidecars
    assert growth < 0.5 * two_copies
    for ids in forks:
        ref = store.longest_prefix(ids, FP)
        assert ref is not None and ref.n_tokens == 11_000
        assert exports_equal(store.load(ref, FP), synth_export(CFG, ids)) is None


def test_longest_prefix(tmp_path):
    store = SnapshotStore(tmp_path, segment_tokens=128)
    ids = toks(900)
    for n in (100, 300, 700):
        store.save(synth_export(CFG, ids[:n], with_logits=False), FP)
    store.save(synth_export(CFG, ids[:500], with_logits=False), "fingerprint-B")
    assert store.longest_prefix(ids, FP).n_tokens == 700
    assert store.longest_prefix(ids[:699], FP).n_tokens == 300
    assert store.longest_prefix(ids[:300], FP).n_tokens == 300
    assert store.longest_prefix(ids[:99], FP) is None
    assert store.longest_prefix(ids, "fingerprint-B").n_tokens == 500
    other = ids.copy()
    other[50] += 1
    assert store.longest_prefix(other, FP) is None
    assert store.longest_prefix([int(x) for x in ids[:350]], FP).n_tokens == 300


def test_saving_the_same_state_twice_is_one_snapshot(tmp_path):
    store = SnapshotStore(tmp_path, segment_tokens=128)
    ex = synth_export(CFG, toks(400))
    a, b = store.save(ex, FP), store.save(ex, FP)
    assert a.id == b.id
    assert store.usage().n_snapshots == 1


def test_refs_serialise_and_load(tmp_path):
    store = SnapshotStore(tmp_path, segment_tokens=128)
    ex = synth_export(CFG, toks(200))
    ref = store.save(ex, FP, pin="session-1")
    data = ref.model_dump(mode="json")
    assert exports_equal(store.load(data, FP), ex) is None
    assert exports_equal(store.load(SnapshotRef.model_validate(data), FP), ex) is None
    assert exports_equal(store.load(str(ref), FP), ex) is None
    assert ref.pins == ("session-1",)


def test_invalid_states_and_ids_raise_snapshot_errors(tmp_path):
    store = SnapshotStore(tmp_path, segment_tokens=128)
    ex = synth_export(CFG, toks(200))
    ex.layers[2].comp = ex.layers[2].comp[:-1]
    with pytest.raises(SnapshotInvalidError, match="compressed rows"):
        store.save(ex, FP)
    with pytest.raises(SnapshotInvalidError, match="fingerprint"):
        store.save(synth_export(CFG, toks(10)), "")
    with pytest.raises(SnapshotNotFoundError):
        store.load("0" * 32, FP)
    with pytest.raises(SnapshotNotFoundError):
        store.load("../../etc/passwd", FP)
    with pytest.raises(SnapshotError):
        store.longest_prefix(["x"], FP)


def _age(store: SnapshotStore, ref, seconds: float, hits: float | None = None):
    side = store._read_sidecar(ref.id)
    side.last_used -= seconds
    if hits is not None:
        side.hits = hits
    store._write_sidecar(side)


def test_eviction_keeps_pinned_and_often_reused_small_prefixes(tmp_path):
    store = SnapshotStore(tmp_path, segment_tokens=256)
    sys_prompt = toks(300, seed=9)
    small = store.save(synth_export(CFG, sys_prompt), FP)
    big_pinned = store.save(synth_export(CFG, toks(3000, seed=1)), FP, pin="named")
    big_once = store.save(synth_export(CFG, toks(3000, seed=2)), FP)
    # The system prompt is reused often but was saved first; the big dump was used once.
    _age(store, small, 3600, hits=12)
    _age(store, big_once, 1800)
    _age(store, big_pinned, 7200)
    usage = store.usage().total_bytes
    store.budget_bytes = usage - 1
    report = store.gc()
    removed = [r.id for r in report.removed]
    assert removed == [big_once.id]
    assert report.freed_bytes > 0 and not report.over_budget
    left = {r.id for r in store.list()}
    assert left == {small.id, big_pinned.id}
    # Only pinned data left over a tiny budget: gc says so instead of deleting it.
    store.budget_bytes = 1
    report = store.gc()
    assert [r.id for r in report.removed] == [small.id]
    assert report.over_budget and report.pinned_bytes > 0
    assert exports_equal(store.load(big_pinned, FP), synth_export(CFG, toks(3000, seed=1))) is None


def test_save_evicts_to_budget_and_protects_the_new_snapshot(tmp_path):
    probe = SnapshotStore(tmp_path / "probe", segment_tokens=256)
    probe.save(synth_export(CFG, toks(1500, seed=0)), FP)
    one = probe.usage().total_bytes
    store = SnapshotStore(tmp_path / "s", budget_bytes=int(2.5 * one), segment_tokens=256)
    refs = []
    for s in range(4):
        refs.append(store.save(synth_export(CFG, toks(1500, seed=s)), FP))
        time.sleep(0.01)
    assert store.usage().total_bytes <= store.budget_bytes
    left = {r.id for r in store.list()}
    assert refs[-1].id in left and refs[0].id not in left
    with pytest.raises(SnapshotBudgetError, match="kv-disk-space-mb"):
        SnapshotStore(tmp_path / "t", budget_bytes=one // 2, segment_tokens=256).save(
            synth_export(CFG, toks(1500)), FP
        )


def test_pins_move_with_the_session(tmp_path):
    store = SnapshotStore(tmp_path, segment_tokens=128)
    ids = toks(600)
    a = store.save(synth_export(CFG, ids[:300]), FP, pin="s1")
    b = store.save(synth_export(CFG, ids[:600]), FP, pin="s1")
    pins = {r.id: r.pins for r in store.list()}
    assert pins == {a.id: (), b.id: ("s1",)}
    store.pin(a, "s2")
    store.unpin(None, "s1")
    pins = {r.id: r.pins for r in store.list()}
    assert pins == {a.id: ("s2",), b.id: ()}
    with pytest.raises(SnapshotNotFoundError):
        store.pin("f" * 32, "x")


def test_delete_keeps_shared_segments(tmp_path):
    store = SnapshotStore(tmp_path, segment_tokens=128)
    ids = toks(700)
    a = store.save(synth_export(CFG, ids[:300]), FP)
    b = store.save(synth_export(CFG, ids[:700]), FP)
    store.delete(b)
    assert len(seg_files(store)) == 2
    assert exports_equal(store.load(a, FP), synth_export(CFG, ids[:300])) is None
    with pytest.raises(SnapshotNotFoundError):
        store.load(b, FP)


def test_gc_command_reports_what_it_removed(tmp_path, capsys):
    import argparse

    from ds4_agent.sessions.store_cli import register_gc

    store = SnapshotStore(tmp_path, segment_tokens=128)
    keep = store.save(synth_export(CFG, toks(300, seed=1)), FP, pin="named")
    drop = store.save(synth_export(CFG, toks(900, seed=2)), FP)
    (store.snap_dir / ".leftover.snap.123.abc.tmp").write_bytes(b"x" * 10)
    parser = argparse.ArgumentParser()
    register_gc(parser.add_subparsers(dest="cmd"))
    args = parser.parse_args(["gc", "--dir", str(tmp_path), "--kv-disk-space-mb", "0"])
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert f"removed snapshot {drop.id[:12]}" in out and "(over budget)" in out
    assert "1 temp files" in out and "still over budget" in out
    assert [r.id for r in store.list()] == [keep.id]
    args = parser.parse_args(["gc", "--dir", str(tmp_path), "--format", "json", "--verify"])
    assert args.func(args) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["removed"] == [] and report["budget_bytes"] is None


def test_verify_decoded_catches_a_decoder_that_lies(tmp_path, monkeypatch):
    from ds4_agent.sessions import codec

    store = SnapshotStore(tmp_path, segment_tokens=128, verify_decoded=True)
    ref = store.save(synth_export(CFG, toks(300)), FP)
    real = codec.decode_rows_into

    def off_by_one_ulp(enc, big, r0):
        real(enc, big, r0)
        big.view(np.uint32)[0, r0, 0] ^= 1

    monkeypatch.setattr(codec, "decode_rows_into", off_by_one_ulp)
    with pytest.raises(SnapshotError, match="do not hash"):
        store.load(ref, FP)


def test_concurrent_saves_and_loads_from_two_stores_on_one_directory(tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    ids = toks(1500)
    exports = [synth_export(CFG, np.concatenate([ids, toks(300, seed=s)])) for s in range(4)]

    def work(i: int) -> str | None:
        store = SnapshotStore(tmp_path, segment_tokens=256, threads=1)  # one handle each
        ref = store.save(exports[i], FP)
        return exports_equal(store.load(ref, FP), exports[i])

    with ThreadPoolExecutor(4) as pool:
        assert list(pool.map(work, range(4))) == [None] * 4
    store = SnapshotStore(tmp_path, segment_tokens=256)
    assert store.usage().n_snapshots == 4
    assert store.usage().n_segments == 5 + 4 * 2  # the shared 1280-token prefix is stored once
    assert store.gc().removed_segments == 0


def test_frontiers_store_only_rows_that_hold_something(tmp_path):
    """Canonical frontier rows (kv +0.0, gate −inf) are rebuilt on load, not stored; any other
    row is stored exactly, signed zeros and NaN payloads included."""
    from ds4_agent.sessions.snapshot_format import MAGIC_SNAPSHOT, read_container

    ex = synth_export(CFG, toks(300))  # 300 mod 128 = 44 valid HCA rows of 128
    hca = next(le for le in ex.layers if le.ratio == 128)
    kv, gate = hca.frontiers["kv_state"], hca.frontiers["score_state"]
    kv[60] = -0.0  # not canonical: another bit pattern
    gate[61, :3] = np.array([np.nan, -np.inf, 0.0], np.float32)
    gate[62] = (np.arange(gate.shape[1]) % 7).astype(np.float32)  # bfloat16-exact row
    store = SnapshotStore(tmp_path, segment_tokens=256)
    ref = store.save(ex, FP)
    back = store.load(ref, FP)
    assert exports_equal(back, ex) is None
    c = read_container(store._snap_path(ref.id), MAGIC_SNAPSHOT)
    i = ex.layers.index(hca)
    fill = c.get(f"{i}.f.kv_state.fill")
    assert int((fill == 0).sum()) == 45 and int((fill == 1).sum()) == 128 - 45
    stored = sum(s.nbytes for s in c.header.sections if s.name.startswith(f"{i}.f."))
    assert stored < 0.5 * (kv.nbytes + gate.nbytes)


@pytest.mark.parametrize("threads", [1, 3])
def test_numpy_fallback_restores_the_same_state(tmp_path, monkeypatch, threads):
    """Without numba the store encodes and restores with the numpy codec, to the same bits;
    one thread or a reader with several decoders gives the same state."""
    from ds4_agent.sessions import codec

    ids = toks(1500)
    ex = synth_export(CFG, ids)
    fast = SnapshotStore(tmp_path, segment_tokens=256, threads=threads)
    ref = fast.save(ex, FP)
    assert exports_equal(fast.load(ref, FP), ex) is None
    monkeypatch.setattr(codec, "_jit", None)
    slow = SnapshotStore(tmp_path, segment_tokens=256, threads=threads)
    assert exports_equal(slow.load(ref, FP), ex) is None
    other = synth_export(CFG, np.concatenate([ids[:1300], toks(200, seed=5)]))
    ref2 = slow.save(other, FP)  # shares 1280 tokens of segments written by the compiled codec
    monkeypatch.undo()
    assert exports_equal(fast.load(ref2, FP), other) is None
