"""The DSML parser against the golden parse fixtures, whole, char by char and token by token."""

from __future__ import annotations

import json

import pytest
from conftest import GOLDEN
from ds4_agent.prompts.dsml import DsmlParser, parse_completion
from v4_tok import ours

FILES = sorted((GOLDEN / "dsv4-encoding" / "parse").glob("*.json"))
CASES = [json.loads(f.read_text(encoding="utf-8")) for f in FILES]
# Our error kind for each official error case.
KINDS = {
    "error_text_answer_missing_eos": "missing_eos",
    "error_thinking_missing_think_close": "missing_think_end",
    "error_duplicate_parameter_name": "duplicate_parameter",
}


def _check(case, turn):
    if "expected" in case:
        assert turn.error is None
        exp = case["expected"]
        assert turn.content == exp["content"]
        assert turn.reasoning_content == exp["reasoning_content"]
        got = [(c.name, c.arguments) for c in turn.tool_calls]
        assert got == [
            (t["function"]["name"], t["function"]["arguments"]) for t in exp["tool_calls"]
        ]
        assert turn.to_message() == exp
    else:
        assert turn.error is not None and turn.error.kind == KINDS[case["name"]]
        assert not turn.tool_calls and turn.to_message()["tool_calls"] == []


@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_parse_whole(case):
    _check(case, parse_completion(case["completion"], case["thinking_mode"]))


@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_parse_char_by_char(case):
    parser = DsmlParser(case["thinking_mode"])
    for ch in case["completion"]:
        parser.feed(ch)
    _check(case, parser.result())


@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_parse_token_by_token(case, tokenizer_json):
    tok = ours(tokenizer_json)
    parser = DsmlParser(case["thinking_mode"], tokenizer=tok)
    for i in tok.encode_trusted(case["completion"]):
        parser.feed_token(i)
    _check(case, parser.result())
