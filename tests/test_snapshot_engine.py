"""End to end through the real engine: save at T, restore in a new process, continue decoding.

T = 301 (T mod 4 = 1, T mod 128 = 45) with 128-token segments: two shared segments, a tail of
partial rows and half-filled compressor frontiers. The restored run must produce logits that
are bit-identical to the uninterrupted run, in both numerics modes.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import tiny_model as tm
from ds4_agent.sessions.snapshot_synth import exports_equal
from ds4_agent.sessions.snapshots import SnapshotStore

T = 301
CONTINUE = 6
MODES = ("official", "exact")

_CHILD = textwrap.dedent(
    """
    import json, sys
    import numpy as np
    from pathlib import Path
    from ds4_agent.engine.generate import Engine
    from ds4_agent.sessions.snapshots import SnapshotStore

    job = json.loads(Path(sys.argv[1]).read_text())
    store = SnapshotStore(Path(job["store"]), segment_tokens=128, verify_decoded=True)
    for mode, sid in job["ids"].items():
        eng = Engine.load(job["model"], numerics=mode)
        export = store.load(sid, eng.fingerprint)
        state = eng.import_state(export)
        rows = [np.asarray(export.logits)]
        for tok in job["continue"]:
            rows.append(np.array(eng.decode(state, tok), dtype=np.float32))
        np.save(Path(job["out"]) / f"{mode}.npy", np.stack(rows))
    """
)


@pytest.mark.slow
def test_resume_in_a_new_process_is_bit_identical(request, tmp_path):
    model = tm.build_tiny_model("flash", cache_root=tm.cache_root(request))
    ids = tm.random_tokens(T + CONTINUE, 512, seed=3)
    prompt, cont = ids[:T], ids[T:]
    store = SnapshotStore(tmp_path / "store", segment_tokens=128, verify_decoded=True)
    expected = {}
    snap_ids = {}
    for mode in MODES:
        eng = tm.cached_engine(model, mode)
        state = eng.new_state()
        first = np.array(eng.prefill(state, prompt, chunk_size=64), dtype=np.float32)
        export = state.export()
        assert export.n_tokens == T and T % 4 and T % 128
        ref = store.save(export, eng.fingerprint)
        snap_ids[mode] = ref.id
        # In-process round trip is exact too (frontiers, raw window order, logits).
        assert exports_equal(store.load(ref, eng.fingerprint), export) is None
        rows = [first] + [np.array(eng.decode(state, t), dtype=np.float32) for t in cont]
        expected[mode] = np.stack(rows)
    assert store.usage().n_segments == 4  # 2 per mode: different fingerprints share nothing

    job = {
        "store": str(tmp_path / "store"),
        "model": str(model),
        "ids": snap_ids,
        "continue": cont,
        "out": str(tmp_path),
    }
    (tmp_path / "job.json").write_text(json.dumps(job))
    r = subprocess.run(
        [sys.executable, "-c", _CHILD, str(tmp_path / "job.json")],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    for mode in MODES:
        got = np.load(tmp_path / f"{mode}.npy")
        assert got.shape == expected[mode].shape == (CONTINUE + 1, 512)
        assert np.array_equal(got.view(np.uint32), expected[mode].view(np.uint32)), mode


@pytest.mark.slow
def test_engine_state_encodes_compactly_and_resumes_with_another_chunking(request, tmp_path):
    """Official-numerics rows take the compact form; the snapshot does not record a prefill
    chunk size, so a restored state continues with any chunking."""
    model = tm.build_tiny_model("flash", cache_root=tm.cache_root(request))
    eng = tm.cached_engine(model, "official")
    ids = tm.random_tokens(T + 40, 512, seed=4)
    state = eng.new_state()
    eng.prefill(state, ids[:T], chunk_size=32)
    store = SnapshotStore(tmp_path, segment_tokens=128)
    ref = store.save(state.export(), eng.fingerprint)
    # 2 segments × 128 tokens; head_dim 256 = 3 FP8 blocks + 64 RoPE channels (float32 in this
    # engine), index keys 128 wide in FP4.
    usage = store.usage()
    per_token = usage.segment_bytes / 256
    compact = 2 * ((3 * 65 + 64 * 4) + 68) / 4 + 2 * (3 * 65 + 64 * 4) / 128
    print(
        f"engine state, official numerics: {per_token:.1f} B/token in segments (compact {compact:.1f})"
    )
    assert per_token < compact * 1.1
    restored = eng.import_state(store.load(ref, eng.fingerprint))
    a = np.array(eng.prefill(restored, ids[T:], chunk_size=7), dtype=np.float32)
    b = np.array(eng.prefill(state, ids[T:], chunk_size=7), dtype=np.float32)
    assert np.array_equal(a.view(np.uint32), b.view(np.uint32))
