"""ds4 GGUF as a conversion source: dequantizers, names, config, exact MLX mappings."""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import mlx.core as mx
import numpy as np
import pytest
from ds4_agent.engine import gguf_quants as gq
from ds4_agent.engine.gguf_source import (
    GGUFSource,
    GGUFSourceError,
    TargetSpec,
    default_target,
    gguf_name,
    official_name,
    tensor_class,
)
from gguf_fixture import TinyShape, kquant_blocks, tensor_specs, write_tiny_gguf

Q = gguf.GGMLQuantizationType


@pytest.fixture(scope="module")
def q2_file(tmp_path_factory) -> Path:
    return write_tiny_gguf(tmp_path_factory.mktemp("gguf") / "tiny-q2.gguf", "q2")


@pytest.fixture(scope="module")
def q4_file(tmp_path_factory) -> Path:
    return write_tiny_gguf(tmp_path_factory.mktemp("gguf") / "tiny-q4.gguf", "q4", seed=1)


def _bits(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a, dtype=np.float32).view(np.uint32)


# --- dequantizers --------------------------------------------------------------------


@pytest.mark.parametrize("qtype", ["Q4_K", "Q2_K", "IQ2_XXS"])
def test_kquant_dequantizers_equal_gguf_bit_for_bit(qtype):
    rng = np.random.default_rng(7)
    raw = kquant_blocks(rng, qtype, (64, 1024))
    ref = gguf.quants.dequantize(raw, Q[qtype])
    ours = gq.dequantize(raw, qtype, ref.shape)
    assert np.array_equal(_bits(ours), _bits(ref))


def test_kquant_dequantizers_cover_the_whole_scale_range():
    # Extreme but finite fp16 super-block scales, including subnormals and zero.
    rng = np.random.default_rng(8)
    for qtype, offsets in [("Q4_K", (0, 2)), ("Q2_K", (80, 82)), ("IQ2_XXS", (0,))]:
        raw = kquant_blocks(rng, qtype, (8, 2048))
        blocks = raw.reshape(-1, gq.BLOCK_LAYOUT[qtype][1])
        special = np.array([0.0, 6e-8, 6.1e-5, 65504.0, -3.5, 1.0], dtype=np.float16)
        for off in offsets:
            vals = special[np.arange(blocks.shape[0]) % special.size]
            blocks[:, off : off + 2] = vals.view(np.uint8).reshape(-1, 2)
        ref = gguf.quants.dequantize(raw, Q[qtype])
        assert np.array_equal(_bits(gq.dequantize(raw, qtype, ref.shape)), _bits(ref)), qtype


def test_q8_0_from_gguf_quantizer_equals_gguf_dequantize():
    rng = np.random.default_rng(9)
    f = rng.standard_normal((33, 320)).astype(np.float32)
    f[3] = 0.0  # an all-zero block (d = 0)
    raw = gguf.quants.quantize(f, Q.Q8_0)
    ref = gguf.quants.dequantize(raw, Q.Q8_0)
    assert np.array_equal(_bits(gq.dequantize(raw, "Q8_0", f.shape)), _bits(ref))


def test_every_tensor_of_a_file_reads_equal_to_gguf(q2_file, q4_file):
    for path in (q2_file, q4_file):
        src = GGUFSource(path)
        by_name = {t.name: t for t in gguf.GGUFReader(str(path)).tensors}
        for t in src.tensors():
            rt = by_name[t.gguf_name]
            if t.qtype == "I32":
                assert np.array_equal(src.read_f32(t.name), rt.data)
                continue
            ref = gguf.quants.dequantize(rt.data, rt.tensor_type)
            assert np.array_equal(_bits(src.read_f32(t.name)), _bits(ref)), t.name
            if t.is_expert_stack:  # one expert at a time reads the same values
                assert np.array_equal(_bits(src.read_f32(t.name, expert=2)), _bits(ref[2]))


def test_truncated_block_data_is_a_clear_error():
    with pytest.raises(gq.GGUFFormatError, match="Q4_K: 100 bytes"):
        gq.dequantize(np.zeros(100, np.uint8), "Q4_K", (100,))
    with pytest.raises(gq.GGUFFormatError, match="not supported"):
        gq.dequantize(np.zeros(100, np.uint8), "Q5_K", (100,))


# --- names and config ----------------------------------------------------------------


def test_every_ds4_name_maps_to_an_official_name_and_back():
    s = TinyShape()
    names = [n for n, _, _ in tensor_specs(s, "q2")]
    mtp = [
        f"mtp.0.{n}"
        for n in ("e_proj.weight", "hnorm.weight", "attn_q_a.weight", "hc_head_fn.weight")
    ]
    for n in names + mtp:
        assert gguf_name(official_name(n)) == n
    assert official_name("blk.3.ffn_down_exps.weight") == "layers.3.ffn.experts.w2.weight"
    assert official_name("blk.2.indexer.proj.weight") == "layers.2.attn.indexer.weights_proj.weight"
    assert (
        official_name("blk.2.indexer_compressor_ape.weight")
        == "layers.2.attn.indexer.compressor.ape"
    )
    assert official_name("blk.5.exp_probs_b.bias") == "layers.5.ffn.gate.bias"
    assert official_name("output_hc_fn.weight") == "hc_head_fn"
    assert official_name("mtp.0.attn_sinks.weight") == "mtp.0.attn.attn_sink"
    with pytest.raises(GGUFSourceError, match="unknown ds4 tensor name 'blk.0.attn_q.weight'"):
        official_name("blk.0.attn_q.weight")
    assert tensor_class("layers.3.ffn.experts.w1.weight") == "routed_experts"
    assert tensor_class("layers.3.attn.wq_b.weight") == "attention"
    assert tensor_class("layers.3.attn.indexer.wq_b.weight") == "compressor_indexer"


def test_shapes_follow_the_official_layout(q2_file):
    src = GGUFSource(q2_file)
    s = TinyShape()
    assert src.info("layers.3.ffn.experts.w1.weight").shape == (s.n_experts, s.moe, s.hidden)
    assert src.info("layers.3.ffn.experts.w2.weight").shape == (s.n_experts, s.hidden, s.moe)
    assert src.info("layers.0.hc_attn_fn").shape == (24, 4 * s.hidden)
    assert src.info("layers.0.ffn.gate.tid2eid").shape == (s.vocab, s.top_k)
    assert src.info("layers.3.attn.compressor.ape").shape == (128, s.head_dim)
    assert src.info("layers.3.ffn.experts.w1.weight").qtype == "IQ2_XXS"
    assert src.info("layers.3.ffn.experts.w2.weight").qtype == "Q2_K"


def test_config_has_the_official_keys(q2_file):
    cfg = GGUFSource(q2_file).config()
    s = TinyShape()
    expect = {
        "model_type": "deepseek_v4",
        "num_hidden_layers": s.n_layers,
        "hidden_size": s.hidden,
        "vocab_size": s.vocab,
        "num_attention_heads": s.n_heads,
        "num_key_value_heads": 1,
        "head_dim": s.head_dim,
        "qk_rope_head_dim": s.rope_dim,
        "q_lora_rank": s.q_lora,
        "o_groups": s.o_groups,
        "o_lora_rank": s.o_lora,
        "n_routed_experts": s.n_experts,
        "num_experts_per_tok": s.top_k,
        "n_shared_experts": 1,
        "moe_intermediate_size": s.moe,
        "routed_scaling_factor": 1.5,
        "norm_topk_prob": True,
        "num_hash_layers": s.n_hash,
        "sliding_window": s.window,
        "index_n_heads": s.index_heads,
        "index_head_dim": s.index_dim,
        "index_topk": s.index_topk,
        "hc_mult": 4,
        "hc_sinkhorn_iters": 20,
        "hc_eps": 1e-6,
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0,
        "compress_rope_theta": 160000.0,
        "swiglu_limit": 10.0,
        "compress_ratios": s.ratios,  # no MTP slot: ds4's MTP block is a separate file
        "num_nextn_predict_layers": 0,
        "bos_token_id": 0,
        "eos_token_id": 1,
    }
    for k, v in expect.items():
        assert cfg[k] == v, k
    assert cfg["rope_scaling"]["factor"] == 16.0
    assert cfg["rope_scaling"]["original_max_position_embeddings"] == 256
    json.dumps(cfg)  # plain JSON types only


def test_non_ds4_files_are_rejected_with_a_reason(tmp_path):
    w = gguf.GGUFWriter(str(tmp_path / "llama.gguf"), "llama")
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(GGUFSourceError, match="architecture 'llama' is not 'deepseek4'"):
        GGUFSource(tmp_path / "llama.gguf")
    (tmp_path / "junk.gguf").write_bytes(b"not a gguf at all")
    with pytest.raises(GGUFSourceError, match="not a readable GGUF"):
        GGUFSource(tmp_path / "junk.gguf")
    with pytest.raises(GGUFSourceError, match="no such file"):
        GGUFSource(tmp_path / "missing.gguf")


# --- MLX mappings --------------------------------------------------------------------


def _mx_dequant(c) -> np.ndarray:
    # MLX evaluates in the scales' dtype; the fp16 arrays hold the values exactly, so
    # evaluate in float32 to see them (the engine's kernels accumulate in float32 too).
    w = c.to_weight()
    return gq.affine_dequantize(
        gq.AffineArrays(
            np.array(w.weight), np.array(w.scales), np.array(w.biases), w.bits, w.group_size
        )
    )


def test_q8_0_maps_to_affine_8bit_exactly(q2_file):
    src = GGUFSource(q2_file)
    for name in (
        "head.weight",
        "layers.1.attn.wq_b.weight",
        "layers.2.ffn.shared_experts.w2.weight",
    ):
        c = src.convert(name, default_target(src.info(name), "q2"))
        assert c.exact and c.method == "q8_0→affine8"
        assert c.affine.scales.dtype == np.float16 and c.affine.bits == 8
        assert np.array_equal(_bits(_mx_dequant(c)), _bits(src.read_f32(name)))


def test_q4_k_maps_exactly_with_fp32_scales_and_nearly_with_fp16(q4_file):
    src = GGUFSource(q4_file)
    name = "layers.2.ffn.experts.w2.weight"
    ref = src.read_f32(name)
    exact = src.convert(name, default_target(src.info(name), "lossless"))
    assert exact.exact and exact.affine.scales.dtype == np.float32
    assert exact.affine.weight.shape == (4, 256, 256 * 4 // 32)
    assert np.array_equal(_bits(_mx_dequant(exact)), _bits(ref))
    near = src.convert(name, default_target(src.info(name), "q4"))
    assert not near.exact and near.affine.scales.dtype == np.float16
    # fp16 rounds d·sc to 11 bits: relative error ≈ 2^-12 at most per scale.
    assert 0 < near.error.rel < 1e-3
    np.testing.assert_allclose(_mx_dequant(near), ref, rtol=0, atol=float(np.abs(ref).max()) * 1e-3)


def test_mapped_weights_drive_quantized_matmul(q4_file):
    src = GGUFSource(q4_file)
    name = "layers.3.ffn.experts.w1.weight"
    c = src.convert(name, default_target(src.info(name), "lossless"))
    q = c.to_weight()
    x = mx.random.normal((3, 256), key=mx.random.key(0))
    ref = src.read_f32(name)[1]
    y = mx.quantized_matmul(
        x, q.weight[1], q.scales[1], q.biases[1], transpose=True, group_size=32, bits=4
    )
    np.testing.assert_allclose(np.array(y), np.array(x) @ ref.T, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    "name", ["layers.3.ffn.experts.w1.weight", "layers.3.ffn.experts.w2.weight"]
)
def test_two_bit_types_are_requantized_with_the_error_reported(q2_file, name):
    src = GGUFSource(q2_file)
    t = src.info(name)
    c = src.convert(name, default_target(t, "q2"))
    assert c.method == "requantize" and not c.exact
    assert c.affine.bits == 2 and c.affine.group_size == 64
    ref = src.read_f32(name)
    approx = _mx_dequant(c)
    stats = gq.ErrorStats()
    stats.add(ref, approx)
    assert c.error.rel == pytest.approx(stats.rel, rel=1e-6)
    # Random codes are the worst case for a re-quantizer; real weights do better. The bound
    # only says the re-quantization is sane (not a scrambled layout, which gives ≳ 1).
    assert 0.05 < c.error.rel < 0.6
    with pytest.raises(GGUFSourceError, match="use the official checkpoint for a lossless tier"):
        default_target(t, "lossless")


def test_float_tensors_are_copied_unchanged(q2_file):
    src = GGUFSource(q2_file)
    for name in ("embed.weight", "layers.0.hc_attn_fn", "norm.weight", "layers.0.ffn.gate.tid2eid"):
        t = src.info(name)
        c = src.convert(name, default_target(t, "q2"))
        assert c.exact
        w = c.to_weight()
        assert w.dtype == {"F16": mx.float16, "F32": mx.float32, "I32": mx.int32}[t.qtype]
        assert np.array_equal(np.array(w.astype(mx.float32)), src.read_f32(name).astype(np.float32))


def test_custom_quantizer_is_used_for_requantization(q2_file):
    src = GGUFSource(q2_file)
    calls = []

    def quantizer(w, bits, group):
        calls.append((w.shape, bits, group))
        return gq.rtn_quantize(w, bits, group)

    name = "layers.2.ffn.experts.w3.weight"
    src.convert(name, TargetSpec("affine", bits=3, group_size=32), quantizer=quantizer)
    assert calls == [((256, 256), 3, 32)] * 4  # one call per expert, never the whole stack
