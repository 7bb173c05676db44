"""Loading the tokenizer from GGUF metadata (`tokenizer.ggml.tokens/merges/token_type`)."""

from __future__ import annotations

import json

import pytest
from conftest import GOLDEN
from ds4_agent.engine.tokenizer import Tokenizer, TokenizerError
from v4_tok import ours

gguf = pytest.importorskip("gguf")

CASES = json.loads((GOLDEN / "tokenizer" / "v4_public.json").read_text(encoding="utf-8"))


def _write(path, data: dict, model: str = "gpt2") -> None:
    """A tensor-less GGUF carrying the real V4 vocabulary the way ds4's files do."""
    vocab = data["model"]["vocab"]
    added = {a["id"]: a for a in data["added_tokens"]}
    n = max(max(vocab.values()), max(added)) + 1
    tokens = [""] * n
    types = [1] * n  # normal
    for s, i in vocab.items():
        tokens[i] = s
    for i, a in added.items():
        tokens[i] = a["content"]
        types[i] = 3 if a["special"] else 4  # control / user-defined
    w = gguf.GGUFWriter(str(path), "deepseek4")
    w.add_tokenizer_model(model)
    w.add_tokenizer_pre("joyai-llm")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in data["model"]["merges"]])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.mark.slow
def test_gguf_tokenizer_equals_json_tokenizer(tokenizer_json, tmp_path):
    data = json.loads(tokenizer_json.read_text(encoding="utf-8"))
    path = tmp_path / "v4.gguf"
    _write(path, data)
    tok = Tokenizer.from_file(path)
    ref = ours(tokenizer_json)
    assert tok.vocab_size == ref.vocab_size and tok.added_tokens == ref.added_tokens
    for case in CASES:
        assert tok.encode_trusted(case["text"]) == case["ids"], case["name"]
        assert tok.encode_untrusted(case["text"]) == case["ids_plain"], case["name"]
    # A model directory holding only the GGUF file loads it too.
    assert Tokenizer.from_file(tmp_path).encode_trusted("<｜User｜>hi") == [128803, 6366]


def test_gguf_with_another_tokenizer_model_is_refused(tmp_path):
    data = {
        "model": {"vocab": {"a": 0}, "merges": []},
        "added_tokens": [{"id": 1, "content": "<x>", "special": True}],
    }
    path = tmp_path / "spm.gguf"
    _write(path, data, model="llama")
    with pytest.raises(TokenizerError, match="not gpt2"):
        Tokenizer.from_file(path)


def test_not_a_gguf_file(tmp_path):
    path = tmp_path / "x.gguf"
    path.write_bytes(b"nope")
    with pytest.raises(TokenizerError, match="not a readable GGUF"):
        Tokenizer.from_file(path)
