"""The tokenizer rebuilt from GGUF metadata tokenizes exactly like the reference tokenizer.json."""

from __future__ import annotations

import json

import gguf
import pytest
from conftest import GOLDEN
from ds4_agent.engine.gguf_source import GGUFSource
from ds4_agent.engine.gguf_tokenizer import GGUFTokenizerError
from gguf_fixture import tiny_vocab, write_tiny_gguf

tokenizers = pytest.importorskip("tokenizers")


def _hf(tok_json: dict) -> tokenizers.Tokenizer:
    return tokenizers.Tokenizer.from_str(json.dumps(tok_json))


def test_tiny_vocab_round_trip(tmp_path):
    path = write_tiny_gguf(tmp_path / "t.gguf", "q2")
    files = GGUFSource(path).tokenizer_files()
    tok = _hf(files["tokenizer.json"])
    tokens, _, _ = tiny_vocab(300)
    hello = tokens.index("hello")
    user = tokens.index("<｜User｜>")
    assert tok.encode("<｜User｜>hello", add_special_tokens=False).ids == [user, hello]
    assert tok.decode([user, hello], skip_special_tokens=False) == "<｜User｜>hello"
    cfg = files["tokenizer_config.json"]
    assert cfg["bos_token"] == "<｜begin▁of▁sentence｜>" and cfg["add_bos_token"] is False


def _write_tokenizer_gguf(path, tok: dict, pre: str = "joyai-llm") -> None:
    vocab = tok["model"]["vocab"]
    added = {a["id"]: a for a in tok["added_tokens"]}
    n = max(max(vocab.values()), max(added)) + 1
    tokens = [""] * n
    types = [1] * n
    for s, i in vocab.items():
        tokens[i] = s
    for i, a in added.items():
        tokens[i] = a["content"]
        types[i] = 3 if a["special"] else 4
    merges = [m if isinstance(m, str) else " ".join(m) for m in tok["model"]["merges"]]
    w = gguf.GGUFWriter(str(path), "deepseek4")
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(0)
    w.add_eos_token_id(1)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.mark.slow
def test_real_v4_vocabulary_matches_the_reference_tokenizer(tmp_path, tokenizer_json):
    ref_json = json.loads(tokenizer_json.read_text())
    path = tmp_path / "vocab.gguf"
    _write_tokenizer_gguf(path, ref_json)
    rebuilt = GGUFSource(path).tokenizer_files()["tokenizer.json"]
    assert rebuilt["model"]["vocab"] == ref_json["model"]["vocab"]
    assert rebuilt["pre_tokenizer"] == ref_json["pre_tokenizer"]
    ours, ref = _hf(rebuilt), tokenizers.Tokenizer.from_file(str(tokenizer_json))
    cases = json.loads((GOLDEN / "tokenizer" / "v4_public.json").read_text())
    assert len(cases) >= 20
    for case in cases:
        got = ours.encode(case["text"], add_special_tokens=False).ids
        assert got == ref.encode(case["text"], add_special_tokens=False).ids, case["name"]
        assert got == case["ids"], case["name"]


def test_other_pre_tokenizers_are_refused(tmp_path):
    tok = {
        "model": {"vocab": {"a": 0, "b": 1}, "merges": []},
        "added_tokens": [{"id": 2, "content": "<s>", "special": True}],
    }
    _write_tokenizer_gguf(tmp_path / "x.gguf", tok, pre="llama-bpe")
    with pytest.raises(GGUFTokenizerError, match="not the DeepSeek V4 pre-tokenizer"):
        GGUFSource(tmp_path / "x.gguf").tokenizer_files()
