"""ModelConfig, sampling, generation, MTP, `debug logits` and `bench` on tiny checkpoints."""

from __future__ import annotations

import json
import subprocess
import sys

import mlx.core as mx
import numpy as np
import pytest
import tiny_model as tm
from ds4_agent.engine.config import ConfigError, ModelConfig
from ds4_agent.engine.qtensor import QuantizedTensor
from ds4_agent.engine.sampling import Sampler, SamplerConfig, ScriptedSampler, probabilities
from ds4_agent.engine.synthetic import synthetic_config, weight_shapes

# ------------------------------------------------------------------------------ config


def test_config_reads_official_keys():
    cfg = ModelConfig.from_dict(tm.flash_config())
    assert cfg.ratios == [0, 0, 4, 128, 4, 128] and cfg.mtp_ratio == 0
    assert [cfg.is_hash_layer(i) for i in range(6)] == [True] * 3 + [False] * 3
    assert cfg.nope_dim == 192 and cfg.rope_scaling.factor == 16


def test_config_yarn_frequencies_match_transformers():
    from transformers.models.deepseek_v4.modeling_deepseek_v4 import DeepseekV4RotaryEmbedding

    raw = tm.flash_config()
    rot = DeepseekV4RotaryEmbedding(tm._hf_config(raw))
    cfg = ModelConfig.from_dict(raw)
    np.testing.assert_allclose(cfg.rope_inv_freq(True), rot.compress_inv_freq.numpy(), rtol=1e-6)
    np.testing.assert_allclose(cfg.rope_inv_freq(False), rot.main_inv_freq.numpy(), rtol=1e-6)


def test_config_real_flash_yarn_band():
    """Spec §1.2: at θ=160000, dim 64, pairs 0..15 keep their frequency, ≥25 are /16."""
    raw = tm.flash_config()
    raw["qk_rope_head_dim"] = 64
    f = ModelConfig.from_dict(raw).rope_inv_freq(True)
    base = [160000.0 ** (-2 * i / 64) for i in range(32)]
    assert all(abs(f[i] - base[i]) < 1e-12 for i in range(16))
    assert all(abs(f[i] - base[i] / 16) < 1e-12 for i in range(25, 32))


def test_config_missing_key_is_named(tmp_path):
    raw = tm.flash_config()
    del raw["compress_ratios"]
    with pytest.raises(ConfigError, match="missing key 'compress_ratios'"):
        ModelConfig.from_dict(raw)
    (tmp_path / "config.json").write_text(json.dumps({**tm.flash_config(), "model_type": "llama"}))
    with pytest.raises(ConfigError, match="unsupported model_type 'llama'"):
        ModelConfig.from_dir(tmp_path)
    with pytest.raises(ConfigError, match="not found"):
        ModelConfig.from_dir(tmp_path / "nowhere")
    bad = {**tm.flash_config(), "compress_ratios": [0, 0, 4]}
    with pytest.raises(ConfigError, match="compress_ratios"):
        ModelConfig.from_dict(bad)


# ------------------------------------------------------------------------------ sampling


def test_sampling_filters():
    logits = np.log(np.array([0.5, 0.3, 0.15, 0.04, 0.01]))
    p = probabilities(logits, SamplerConfig(min_p=0.0))
    np.testing.assert_allclose(p, [0.5, 0.3, 0.15, 0.04, 0.01], atol=1e-12)
    p = probabilities(logits, SamplerConfig())  # min_p 0.05 → drops 0.01 (< 0.025)
    assert p[4] == 0 and p[3] > 0
    p = probabilities(logits, SamplerConfig(top_k=2, min_p=0))
    np.testing.assert_allclose(p, [0.625, 0.375, 0, 0, 0], atol=1e-12)
    p = probabilities(logits, SamplerConfig(top_p=0.8, min_p=0))
    np.testing.assert_allclose(p, [0.625, 0.375, 0, 0, 0], atol=1e-12)
    p = probabilities(logits, SamplerConfig(temperature=0.0))
    assert p.tolist() == [1, 0, 0, 0, 0]
    hot = probabilities(logits, SamplerConfig(temperature=2.0, min_p=0))
    assert hot[4] > 0.01  # flatter


def test_sampler_seeded_and_distribution():
    logits = mx.array(np.log(np.array([0.7, 0.2, 0.1])).astype(np.float32))
    a = [Sampler(SamplerConfig(seed=7)).sample(logits) for _ in range(1)]
    s1, s2 = Sampler(SamplerConfig(seed=7)), Sampler(SamplerConfig(seed=7))
    draws1 = [s1.sample(logits) for _ in range(2000)]
    draws2 = [s2.sample(logits) for _ in range(2000)]
    assert draws1 == draws2 and a[0] == draws1[0]
    freq = np.bincount(draws1, minlength=3) / 2000
    np.testing.assert_allclose(freq, [0.7, 0.2, 0.1], atol=0.04)
    assert Sampler(SamplerConfig(seed=1)).sample(logits, greedy=True) == 0


def test_scripted_sampler():
    s = ScriptedSampler([5, 6], keep_logits=True)
    assert s.sample(np.zeros(10)) == 5 and s.sample(np.zeros(10)) == 6
    assert len(s.seen_logits) == 2
    with pytest.raises(IndexError):
        s.sample(np.zeros(10))


# ------------------------------------------------------------------------------ engine


@pytest.fixture(scope="module")
def flash_dir(request):
    return tm.build_tiny_model("flash", cache_root=tm.cache_root(request))


def test_synthetic_shapes_match_checkpoint(flash_dir):
    """The synthetic model's tensor list is exactly what a real checkpoint provides."""
    eng = tm.cached_engine(flash_dir, "exact")
    want = weight_shapes(eng.config)
    got = {k: tuple(v.shape) for k, v in eng.model.w.items() if not k.startswith("mtp.")}
    assert got == want
    assert synthetic_config().ratios == [0, 4, 128, 4]


def test_generate_teacher_forcing_stops_and_greedy_hook(flash_dir):
    eng = tm.cached_engine(flash_dir, "exact")
    toks = tm.random_tokens(40, 512, seed=4)
    ref = tm.one_shot_logits(flash_dir, toks)
    st = eng.new_state()
    eng.prefill(st, toks[:20])
    script = ScriptedSampler(toks[20:40], keep_logits=True)
    out = list(eng.generate(st, script, max_tokens=20))
    assert out == toks[20:40] and st.n_tokens == 40
    for i, lg in enumerate(script.seen_logits):  # step i sees the logits after token 19+i
        assert tm.rel_err(lg[None], ref[19 + i : 20 + i]) <= 1e-5
    # A stop id is yielded but not fed to the state.
    st2 = eng.new_state()
    eng.prefill(st2, toks[:20])
    got = list(eng.generate(st2, ScriptedSampler([7, 8, 9]), max_tokens=3, stop_ids=[8]))
    assert got == [7, 8] and st2.n_tokens == 21
    # EOS stops too; greedy_when forces argmax regardless of the sampler's temperature.
    st3 = eng.new_state()
    eng.prefill(st3, toks[:20])
    sampler = Sampler(SamplerConfig(temperature=50.0, min_p=0.0, seed=0))
    seen = []
    greedy = list(
        eng.generate(st3, sampler, max_tokens=5, greedy_when=lambda s: True, on_token=seen.append)
    )
    assert seen == greedy
    st4 = eng.new_state()
    lg = eng.prefill(st4, toks[:20])
    assert greedy[0] == int(np.argmax(np.array(lg)))


def test_generate_should_stop(flash_dir):
    eng = tm.cached_engine(flash_dir, "exact")
    st = eng.new_state()
    eng.prefill(st, [5, 6, 7])
    assert list(eng.generate(st, Sampler(), max_tokens=5, should_stop=lambda: True)) == []
    with pytest.raises(ValueError, match="outside the vocabulary"):
        eng.decode(st, 10_000)


def test_mtp_block_loads_and_drafts(flash_dir):
    eng = tm.cached_engine(flash_dir, "official")
    assert eng.model.has_mtp()
    st = eng.new_state()
    eng.prefill(st, tm.random_tokens(20, 512, seed=5))
    d1 = np.array(eng.mtp_draft(st, 11))
    assert d1.shape == (512,) and np.isfinite(d1).all()
    # A second draft step sees its own first row in the MTP window, so it differs from a fresh
    # state's draft for the same token.
    fresh = st.clone()
    fresh.mtp_layer = None
    d2 = np.array(eng.mtp_draft(st, 12))
    d2_fresh = np.array(eng.mtp_draft(fresh, 12))
    assert not np.allclose(d2, d2_fresh)
    assert isinstance(eng.model.w["mtp.0.e_proj.weight"], mx.array | QuantizedTensor)


# ------------------------------------------------------------------------------ CLI


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "ds4_agent.agent.cli", *args],
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_debug_logits_cli_with_state(flash_dir, tmp_path):
    toks = tm.random_tokens(140, 512, seed=6)
    (tmp_path / "all.json").write_text(json.dumps(toks))
    (tmp_path / "a.json").write_text(json.dumps(toks[:133]))
    (tmp_path / "b.json").write_text(json.dumps({"tokens": toks[133:]}))
    r = _cli(
        "debug", "logits", "--model", str(flash_dir), "--tokens-file", str(tmp_path / "a.json"),
        "--numerics", "exact", "--chunk", "50", "--save-state", str(tmp_path / "s.npz"),
        "--out", str(tmp_path / "a.npy"),
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    r = _cli(
        "debug", "logits", "--model", str(flash_dir), "--tokens-file", str(tmp_path / "b.json"),
        "--numerics", "exact", "--load-state", str(tmp_path / "s.npz"),
        "--out", str(tmp_path / "b.npy"),
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    a, b = np.load(tmp_path / "a.npy"), np.load(tmp_path / "b.npy")
    assert a.shape == (133, 512) and b.shape == (7, 512) and a.dtype == np.float32
    ref = tm.one_shot_logits(flash_dir, toks)
    assert tm.rel_err(np.concatenate([a, b]), ref) <= 1e-5
    # The saved state belongs to the exact numerics: official refuses it with a clear message.
    r = _cli(
        "debug", "logits", "--model", str(flash_dir), "--tokens-file", str(tmp_path / "b.json"),
        "--load-state", str(tmp_path / "s.npz"), "--out", str(tmp_path / "c.npy"),
    )  # fmt: skip
    assert r.returncode == 1 and "different model or numerics" in r.stderr
    assert r.stderr.count("\n") == 1
    r = _cli(
        "debug", "logits", "--model", str(tmp_path), "--tokens-file", str(tmp_path / "b.json"),
        "--out", str(tmp_path / "c.npy"),
    )  # fmt: skip
    assert r.returncode == 1 and "config.json" in r.stderr


def test_bench_synthetic_smoke(tmp_path):
    out = tmp_path / "bench.csv"
    r = _cli("bench", "--synthetic", "mid", "--ctx", "24", "--decode", "2", "--chunk", "16",
             "--csv", str(out))  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert "decode tok/s" in r.stdout
    rows = out.read_text().splitlines()
    assert rows[0].startswith("ctx,prefill_tokens") and rows[1].startswith("24,24,")
    r = _cli("bench")
    assert r.returncode == 1 and "--synthetic" in r.stderr
