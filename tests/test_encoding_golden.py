"""Chat encoding against the golden render fixtures (official encoder outputs), text and ids."""

from __future__ import annotations

import json

import pytest
from conftest import GOLDEN
from ds4_agent.prompts.encoding import EncodingError, encode_messages, render_tokens
from v4_tok import ours

FILES = sorted((GOLDEN / "dsv4-encoding" / "render").glob("*.json"))
CASES = [json.loads(f.read_text(encoding="utf-8")) for f in FILES]


@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_render_text(case):
    if "expected_error" in case:
        with pytest.raises(EncodingError) as e:
            encode_messages(case["messages"], **case["args"])
        # Same message as the reference (its exception type was AssertionError).
        assert case["expected_error"].split(": ", 1)[1] == str(e.value)
        return
    assert encode_messages(case["messages"], **case["args"]) == case["expected"]


@pytest.mark.parametrize("case", [c for c in CASES if "expected" in c], ids=lambda c: c["name"])
def test_render_tokens_equal_trusted_tokenization(case, tokenizer_json):
    tok = ours(tokenizer_json)
    ids = render_tokens(tok, case["messages"], **case["args"])
    assert ids == tok.encode_trusted(case["expected"])
    assert tok.decode(ids) == case["expected"]
