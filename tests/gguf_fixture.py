"""Tiny DeepSeek V4 GGUF files in ds4's naming, metadata and quant types, for tests.

Written with the `gguf` package's writer. Q8_0 blocks come from `gguf.quants.quantize`; the
package has no quantizer for Q4_K, Q2_K or IQ2_XXS, so those blocks are built by hand: random
code bytes (every bit pattern is a valid code in these formats) with the fp16 super-block
scales overwritten by sane finite values.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import gguf
import numpy as np

Q = gguf.GGMLQuantizationType


@dataclass
class TinyShape:
    hidden: int = 256  # multiple of 256 (K-quant rows)
    n_layers: int = 4  # ratios 0, 0, 4, 128
    n_heads: int = 2
    head_dim: int = 128
    rope_dim: int = 64
    q_lora: int = 64
    o_groups: int = 2
    o_lora: int = 32
    n_experts: int = 4
    top_k: int = 2
    moe: int = 256  # multiple of 256
    index_heads: int = 2
    index_dim: int = 64
    index_topk: int = 4
    hc: int = 4
    vocab: int = 300
    n_hash: int = 1
    window: int = 8
    ratios: list[int] = field(default_factory=lambda: [0, 0, 4, 128])


def fp16_scales(rng: np.random.Generator, n: int, lo: float = 1e-3, hi: float = 2e-2) -> np.ndarray:
    return rng.uniform(lo, hi, size=n).astype(np.float16)


def kquant_blocks(rng: np.random.Generator, qtype: str, shape: tuple[int, ...]) -> np.ndarray:
    """Random valid blocks for Q4_K / Q2_K / IQ2_XXS, as uint8 [..., row bytes]."""
    block, nbytes = {"Q4_K": (256, 144), "Q2_K": (256, 84), "IQ2_XXS": (256, 66)}[qtype]
    *lead, cols = shape
    n_blocks = int(np.prod(lead)) * cols // block
    b = rng.integers(0, 256, size=(n_blocks, nbytes), dtype=np.uint8)
    if qtype == "Q4_K":
        b[:, 0:2] = fp16_scales(rng, n_blocks).view(np.uint8).reshape(-1, 2)
        b[:, 2:4] = fp16_scales(rng, n_blocks).view(np.uint8).reshape(-1, 2)
    elif qtype == "Q2_K":
        b[:, 80:82] = fp16_scales(rng, n_blocks).view(np.uint8).reshape(-1, 2)
        b[:, 82:84] = fp16_scales(rng, n_blocks).view(np.uint8).reshape(-1, 2)
    else:
        b[:, 0:2] = fp16_scales(rng, n_blocks).view(np.uint8).reshape(-1, 2)
    return b.reshape(*lead, cols // block * nbytes)


def tiny_vocab(n: int) -> tuple[list[str], list[int], list[str]]:
    """A byte-level vocabulary: BOS/EOS/pad, the 256 byte symbols, a few merges, then specials."""
    from_bytes = _bytes_to_unicode()
    specials_front = ["<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜▁pad▁｜>"]
    base = [from_bytes[b] for b in range(256)]
    merges = ["h e", "l l", "he ll", "hell o"]
    merged = ["he", "ll", "hell", "hello"]
    tail = ["<｜User｜>", "<｜Assistant｜>", "<think>", "</think>"]
    tokens = specials_front + base + merged
    filler = [f"<｜place▁holder▁no▁{i}｜>" for i in range(n - len(tokens) - len(tail))]
    tokens += filler + tail
    types = [3, 3, 3] + [1] * (len(base) + len(merged)) + [3] * len(filler) + [4, 4, 4, 4]
    assert len(tokens) == n
    return tokens, types, merges


def _bytes_to_unicode() -> dict[int, str]:
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    bs += list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs, strict=True)}


def tensor_specs(s: TinyShape, variant: str) -> list[tuple[str, tuple[int, ...], str]]:
    """(ds4 name, numpy shape, ggml type) for every tensor of a tiny model."""
    gate_up, down = ("IQ2_XXS", "Q2_K") if variant == "q2" else ("Q4_K", "Q4_K")
    H, hc = s.hidden, s.hc
    mix = (2 + hc) * hc
    out: list[tuple[str, tuple[int, ...], str]] = [
        ("token_embd.weight", (s.vocab, H), "F16"),
        ("output.weight", (s.vocab, H), "Q8_0"),
        ("output_norm.weight", (H,), "F32"),
        ("output_hc_fn.weight", (hc, hc * H), "F16"),
        ("output_hc_base.weight", (hc,), "F32"),
        ("output_hc_scale.weight", (1,), "F32"),
    ]
    for L in range(s.n_layers):
        p = f"blk.{L}."
        r = s.ratios[L]
        out += [
            (p + "hc_attn_fn.weight", (mix, hc * H), "F16"),
            (p + "hc_attn_scale.weight", (3,), "F32"),
            (p + "hc_attn_base.weight", (mix,), "F32"),
            (p + "attn_norm.weight", (H,), "F32"),
            (p + "attn_q_a.weight", (s.q_lora, H), "Q8_0"),
            (p + "attn_q_a_norm.weight", (s.q_lora,), "F32"),
            (p + "attn_q_b.weight", (s.n_heads * s.head_dim, s.q_lora), "Q8_0"),
            (p + "attn_kv.weight", (s.head_dim, H), "Q8_0"),
            (p + "attn_kv_a_norm.weight", (s.head_dim,), "F32"),
            (p + "attn_sinks.weight", (s.n_heads,), "F32"),
            (
                p + "attn_output_a.weight",
                (s.o_groups * s.o_lora, s.n_heads * s.head_dim // s.o_groups),
                "Q8_0",
            ),
            (p + "attn_output_b.weight", (H, s.o_groups * s.o_lora), "Q8_0"),
        ]
        if r:
            coff = 2 if r == 4 else 1
            out += [
                (p + "attn_compressor_ape.weight", (r, coff * s.head_dim), "F16"),
                (p + "attn_compressor_kv.weight", (coff * s.head_dim, H), "F16"),
                (p + "attn_compressor_gate.weight", (coff * s.head_dim, H), "F16"),
                (p + "attn_compressor_norm.weight", (s.head_dim,), "F32"),
            ]
        if r == 4:
            out += [
                (p + "indexer.attn_q_b.weight", (s.index_heads * s.index_dim, s.q_lora), "F16"),
                (p + "indexer.proj.weight", (s.index_heads, H), "F16"),
                (p + "indexer_compressor_ape.weight", (4, 2 * s.index_dim), "F16"),
                (p + "indexer_compressor_kv.weight", (2 * s.index_dim, H), "F16"),
                (p + "indexer_compressor_gate.weight", (2 * s.index_dim, H), "F16"),
                (p + "indexer_compressor_norm.weight", (s.index_dim,), "F32"),
            ]
        out += [
            (p + "hc_ffn_fn.weight", (mix, hc * H), "F16"),
            (p + "hc_ffn_scale.weight", (3,), "F32"),
            (p + "hc_ffn_base.weight", (mix,), "F32"),
            (p + "ffn_norm.weight", (H,), "F32"),
            (p + "ffn_gate_inp.weight", (s.n_experts, H), "F16"),
            (p + "ffn_gate_exps.weight", (s.n_experts, s.moe, H), gate_up),
            (p + "ffn_up_exps.weight", (s.n_experts, s.moe, H), gate_up),
            (p + "ffn_down_exps.weight", (s.n_experts, H, s.moe), down),
            (p + "ffn_gate_shexp.weight", (s.moe, H), "Q8_0"),
            (p + "ffn_up_shexp.weight", (s.moe, H), "Q8_0"),
            (p + "ffn_down_shexp.weight", (H, s.moe), "Q8_0"),
        ]
        if s.n_hash > L:
            out.append((p + "ffn_gate_tid2eid.weight", (s.vocab, s.top_k), "I32"))
        else:
            out.append((p + "exp_probs_b.bias", (s.n_experts,), "F32"))
    return out


def write_tiny_gguf(
    path: Path,
    variant: str = "q2",
    shape: TinyShape | None = None,
    seed: int = 0,
    tokenizer: tuple[list[str], list[int], list[str]] | None = None,
) -> Path:
    """Write a tiny ds4-style GGUF ("q2": IQ2_XXS/Q2_K experts, "q4": Q4_K experts)."""
    s = shape or TinyShape()
    rng = np.random.default_rng(seed)
    w = gguf.GGUFWriter(str(path), "deepseek4")
    a = "deepseek4."
    w.add_uint32(a + "block_count", s.n_layers)
    w.add_uint32(a + "context_length", 4096)
    w.add_uint32(a + "embedding_length", s.hidden)
    w.add_uint32(a + "vocab_size", s.vocab)
    w.add_uint32(a + "attention.head_count", s.n_heads)
    w.add_uint32(a + "attention.head_count_kv", 1)
    w.add_uint32(a + "attention.key_length", s.head_dim)
    w.add_uint32(a + "attention.value_length", s.head_dim)
    w.add_uint32(a + "attention.q_lora_rank", s.q_lora)
    w.add_uint32(a + "attention.output_lora_rank", s.o_lora)
    w.add_uint32(a + "attention.output_group_count", s.o_groups)
    w.add_uint32(a + "attention.sliding_window", s.window)
    w.add_array(a + "attention.compress_ratios", [int(r) for r in s.ratios])
    w.add_float32(a + "attention.compress_rope_freq_base", 160000.0)
    w.add_uint32(a + "attention.indexer.head_count", s.index_heads)
    w.add_uint32(a + "attention.indexer.key_length", s.index_dim)
    w.add_uint32(a + "attention.indexer.top_k", s.index_topk)
    w.add_float32(a + "attention.layer_norm_rms_epsilon", 1e-6)
    w.add_uint32(a + "rope.dimension_count", s.rope_dim)
    w.add_float32(a + "rope.freq_base", 10000.0)
    w.add_float32(a + "rope.scaling.factor", 16.0)
    w.add_uint32(a + "rope.scaling.original_context_length", 256)
    w.add_float32(a + "rope.scaling.yarn_beta_fast", 32.0)
    w.add_float32(a + "rope.scaling.yarn_beta_slow", 1.0)
    w.add_uint32(a + "expert_count", s.n_experts)
    w.add_uint32(a + "expert_used_count", s.top_k)
    w.add_uint32(a + "expert_shared_count", 1)
    w.add_uint32(a + "expert_feed_forward_length", s.moe)
    w.add_uint32(a + "expert_group_count", 0)
    w.add_uint32(a + "expert_group_used_count", 0)
    w.add_float32(a + "expert_weights_scale", 1.5)
    w.add_bool(a + "expert_weights_norm", True)
    w.add_uint32(a + "hash_layer_count", s.n_hash)
    w.add_array(a + "swiglu_clamp_exp", [10.0] * s.n_layers)
    w.add_uint32(a + "hyper_connection.count", s.hc)
    w.add_uint32(a + "hyper_connection.sinkhorn_iterations", 20)
    w.add_float32(a + "hyper_connection.epsilon", 1e-6)
    tokens, types, merges = tokenizer or tiny_vocab(s.vocab)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("joyai-llm")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(0)
    w.add_eos_token_id(1)
    w.add_pad_token_id(2)
    for name, shp, qtype in tensor_specs(s, variant):
        if qtype == "F32":
            arr = (rng.standard_normal(shp) * 0.1 + (1.0 if "norm" in name else 0.0)).astype(
                np.float32
            )
            w.add_tensor(name, arr)
        elif qtype == "F16":
            w.add_tensor(name, (rng.standard_normal(shp) * 0.05).astype(np.float16))
        elif qtype == "I32":
            w.add_tensor(name, rng.integers(0, s.n_experts, size=shp, dtype=np.int32))
        elif qtype == "Q8_0":
            f = (rng.standard_normal(shp) * 0.05).astype(np.float32)
            raw = gguf.quants.quantize(f, Q.Q8_0)
            w.add_tensor(name, raw, raw_shape=raw.shape, raw_dtype=Q.Q8_0)
        else:
            raw = kquant_blocks(rng, qtype, shp)
            w.add_tensor(name, raw, raw_shape=raw.shape, raw_dtype=Q[qtype])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
