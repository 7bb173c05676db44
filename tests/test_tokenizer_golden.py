"""The V4 tokenizer against the golden fixtures (ids from HF `tokenizers` on the real file)."""

from __future__ import annotations

import json

import pytest
from conftest import GOLDEN
from v4_tok import ours

CASES = json.loads((GOLDEN / "tokenizer" / "v4_public.json").read_text(encoding="utf-8"))


@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_fixture(case, tokenizer_json):
    tok = ours(tokenizer_json)
    text = case["text"]
    assert case["special_tokens_parsed"] is True
    assert tok.encode_trusted(text) == case["ids"]
    assert tok.encode_untrusted(text) == case["ids_plain"]
    assert tok.decode(case["ids"]) == (text if case["roundtrip"] else case["decoded"])
    assert tok.decode(case["ids_plain"]) == (
        text if case["roundtrip_plain"] else case["decoded_plain"]
    )


def test_spec_vector_and_special_ids(tokenizer_json):
    tok = ours(tokenizer_json)
    text = "<｜User｜>你好<｜Assistant｜><think>推理</think>答案<｜end▁of▁sentence｜>"
    assert tok.encode_trusted(text) == [128803, 30594, 128804, 128821, 36101, 128822, 7624, 1]
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (0, 1, 2)
    assert tok.token_id("｜DSML｜") == 128825
    assert tok.vocab_size == 129280
    with pytest.raises(KeyError, match="not an added token"):
        tok.token_id("<｜nope｜>")
