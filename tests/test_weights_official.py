"""The official checkpoint loader: FP8 → mxfp8 and FP4 → mxfp4 exactly, floats kept, experts stacked."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
import tiny_model
from ds4_agent.engine import quant
from ds4_agent.engine.qtensor import QuantizedTensor
from ds4_agent.engine.weights import (
    Checkpoint,
    WeightsError,
    load_official,
    load_weights,
    materialize,
    read_numpy,
)


@pytest.fixture(scope="module")
def quant_dir() -> Path:
    return tiny_model.build_tiny_model("quant")


@pytest.fixture(scope="module")
def float_dir() -> Path:
    return tiny_model.build_tiny_model("flash")


def _official_stacked(ref: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The reference float tensors with experts stacked like the loader's keys."""
    out: dict[str, np.ndarray] = {}
    experts: dict[str, dict[int, np.ndarray]] = {}
    for name, arr in ref.items():
        parts = name.split(".")
        if ".ffn.experts." in name:
            i = parts.index("experts")
            key = ".".join(parts[: i + 1] + parts[i + 2 :])
            experts.setdefault(key, {})[int(parts[i + 1])] = arr
        else:
            out[name] = arr
    for key, d in experts.items():
        out[key] = np.stack([d[e] for e in range(len(d))])
    return out


def _as_f32(w) -> np.ndarray:
    if isinstance(w, QuantizedTensor):
        return np.array(w.dequantize(mx.float32))
    return np.array(w.astype(mx.float32)) if w.dtype != mx.int32 else np.array(w)


def test_quantized_checkpoint_dequantizes_exactly(quant_dir: Path) -> None:
    weights = load_official(quant_dir)
    materialize(weights)
    ref = _official_stacked(tiny_model.load_official_float(quant_dir))
    assert set(weights) == set(ref)
    modes: dict[str, int] = {}
    for name, w in weights.items():
        got = _as_f32(w)
        assert got.shape == ref[name].shape, name
        assert np.array_equal(got, ref[name].astype(got.dtype)), name
        key = w.mode if isinstance(w, QuantizedTensor) else str(w.dtype)
        modes[key] = modes.get(key, 0) + 1
    assert modes["mxfp4"] > 0 and modes["mxfp8"] > 0 and modes["mlx.core.bfloat16"] > 0
    w1 = weights["layers.0.ffn.experts.w1.weight"]
    assert isinstance(w1, QuantizedTensor) and w1.mode == "mxfp4"
    cfg = json.loads((quant_dir / "config.json").read_text())
    e, inter, h = cfg["n_routed_experts"], cfg["moe_intermediate_size"], cfg["hidden_size"]
    assert w1.shape == (e, inter, h) and w1.weight.shape == (e, inter, h // 8)
    assert weights["layers.0.ffn.gate.tid2eid"].dtype == mx.int32


def test_quantized_matmul_matches_dequantized_matmul(quant_dir: Path) -> None:
    weights = load_official(quant_dir)
    rng = np.random.default_rng(0)
    for name in ("layers.2.attn.wq_b.weight", "layers.3.ffn.shared_experts.w2.weight"):
        w = weights[name]
        assert isinstance(w, QuantizedTensor) and w.mode == "mxfp8"
        x = mx.array(rng.standard_normal((3, w.shape[-1])).astype(np.float32))
        y = mx.quantized_matmul(
            x, w.weight, w.scales, None, transpose=True, group_size=32, bits=8, mode="mxfp8"
        )
        ref = x @ w.dequantize(mx.float32).T
        np.testing.assert_allclose(np.array(y), np.array(ref), rtol=1e-5, atol=1e-5)
    stack = weights["layers.4.ffn.experts.w2.weight"]
    assert isinstance(stack, QuantizedTensor)
    x = mx.array(rng.standard_normal((4, 1, stack.shape[-1])).astype(np.float32))
    idx = mx.array(np.array([0, 3, 7, 3], dtype=np.uint32))
    y = mx.gather_qmm(
        x,
        stack.weight,
        stack.scales,
        None,
        rhs_indices=idx,
        transpose=True,
        group_size=32,
        bits=4,
        mode="mxfp4",
    )
    deq = np.array(stack.dequantize(mx.float32))
    ref = np.stack([np.array(x[i]) @ deq[int(idx[i])].T for i in range(4)])
    np.testing.assert_allclose(np.array(y).reshape(ref.shape), ref, rtol=1e-5, atol=1e-5)


def test_float_checkpoint_loads_unchanged(float_dir: Path) -> None:
    weights = load_weights(float_dir)
    ref = _official_stacked(tiny_model.load_official_float(float_dir))
    assert set(weights) == set(ref)
    for name, w in weights.items():
        assert not isinstance(w, QuantizedTensor)
        assert np.array_equal(_as_f32(w), ref[name]), name


def test_fp8_partial_blocks_map_exactly(tmp_path: Path) -> None:
    """Official scales use ⌈out/128⌉×⌈in/128⌉ blocks; edge blocks must expand correctly."""
    rng = np.random.default_rng(1)
    w = (rng.standard_normal((200, 96)) * 0.05).astype(np.float32)
    codes, scales = quant.fp8_block_quantize(w)
    tiny_model.write_safetensors(
        tmp_path / "model.safetensors",
        {"x.weight": ("F8_E4M3", codes), "x.scale": ("F8_E8M0", scales)},
    )
    got = load_official(tmp_path)["x.weight"]
    assert isinstance(got, QuantizedTensor)
    assert np.array_equal(np.array(got.dequantize()), quant.fp8_block_dequantize(codes, scales))


def test_raw_reader_reads_f8_payloads(quant_dir: Path) -> None:
    ckpt = Checkpoint(quant_dir)
    e = ckpt.entries["layers.2.attn.wkv.weight"]
    assert e.dtype == "F8_E4M3"
    raw = read_numpy(e)
    direct = tiny_model.read_safetensors(e.file)[e.name][1]
    assert np.array_equal(raw, direct)


def test_errors_name_the_problem(tmp_path: Path, quant_dir: Path) -> None:
    with pytest.raises(WeightsError, match="no model.safetensors.index.json"):
        load_weights(tmp_path)
    broken = tmp_path / "broken"
    shutil.copytree(quant_dir, broken)
    shard = sorted(broken.glob("*.safetensors"))[0]
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    with pytest.raises(WeightsError, match="truncated"):
        load_weights(broken)


def test_refuses_to_load_a_model_that_cannot_fit(
    quant_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from ds4_agent.engine import convert_sizes

    monkeypatch.setattr(convert_sizes, "physical_memory", lambda: 256 << 20)
    with pytest.raises(convert_sizes.InsufficientMemoryError, match="needs about"):
        load_weights(quant_dir, context_tokens=1 << 20)
    monkeypatch.setenv("DS4_SKIP_MEMORY_CHECK", "1")
    assert load_weights(quant_dir, context_tokens=1 << 20)
