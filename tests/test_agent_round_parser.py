"""Streaming split of an assistant round and strict parsing of DSML tool-call blocks."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from ds4_agent.agent.round_parser import DsmlError, RoundParser, parse_calls

GOLDEN = Path(__file__).parent / "golden" / "dsv4-encoding" / "parse"

BLOCK = (
    "<｜DSML｜tool_calls>\n"
    '<｜DSML｜invoke name="Read">\n'
    '<｜DSML｜parameter name="path" string="true">src/a b.py</｜DSML｜parameter>\n'
    '<｜DSML｜parameter name="limit" string="false">20</｜DSML｜parameter>\n'
    "</｜DSML｜invoke>\n"
    '<｜DSML｜invoke name="Bash">\n'
    '<｜DSML｜parameter name="command" string="true">echo "x\ny"</｜DSML｜parameter>\n'
    "</｜DSML｜invoke>\n"
    "</｜DSML｜tool_calls>"
)


def test_streamed_one_char_at_a_time_splits_text_and_block():
    p = RoundParser(thinking=True)
    kinds = []
    for ch in "plan":
        kinds += [k for k, _ in p.feed(ch)]
    p.end_think()
    for ch in "Answer.\n\n" + BLOCK + "ignored":
        kinds += [k for k, _ in p.feed(ch)]
    assert p.reasoning == "plan" and p.answer == "Answer."
    assert p.done and p.dsml == BLOCK  # stops right at the closing tag
    assert kinds[0] == "reasoning" and "text" in kinds and kinds[-1] == "dsml"
    calls = parse_calls(p.dsml, round_no=3)
    assert [(c.id, c.name) for c in calls] == [("call_3_0", "Read"), ("call_3_1", "Bash")]
    assert calls[0].arguments == {"path": "src/a b.py", "limit": 20}
    assert calls[1].arguments == {"command": 'echo "x\ny"'}


def test_partial_marker_is_held_back_then_released():
    p = RoundParser(thinking=False)
    assert p.feed("a <｜DS") == [("text", "a ")]
    assert p.feed("x") == [("text", "<｜DSx")]
    p.feed(" <")
    assert p.flush() == [("text", "<")]


def test_dsml_inside_thinking_is_flagged():
    p = RoundParser(thinking=True)
    p.feed("maybe <｜DSML｜invoke")
    assert p.dsml_in_thinking and p.phase == "think"


@pytest.mark.parametrize(
    ("block", "message"),
    [
        (BLOCK.replace("</｜DSML｜tool_calls>", ""), "without </｜DSML｜tool_calls>"),
        ("<｜DSML｜tool_calls>\n</｜DSML｜tool_calls>", "no <｜DSML｜invoke>"),
        (BLOCK.replace('string="false">20', 'string="false">twenty'), "is not JSON"),
        (BLOCK.replace('name="limit"', 'name="path"'), "given twice"),
        (BLOCK.replace("</｜DSML｜invoke>\n<", "</｜DSML｜invoke>\nstray <", 1), "unexpected text"),
    ],
)
def test_malformed_blocks_give_model_readable_errors(block, message):
    with pytest.raises(DsmlError, match=message):
        parse_calls(block)


def test_agrees_with_golden_parse_cases():
    checked = 0
    for path in sorted(GOLDEN.glob("*.json")):
        case = json.loads(path.read_text())
        text = case.get("completion") or case.get("text") or case.get("input")
        expected = case.get("expected") or {}
        calls = expected.get("tool_calls") if isinstance(expected, dict) else None
        if not text or not calls or "<｜DSML｜tool_calls>" not in text:
            continue
        got = parse_calls(text)
        assert [c.name for c in got] == [c["function"]["name"] for c in calls]
        assert [c.arguments for c in got] == [json.loads(c["function"]["arguments"]) for c in calls]
        checked += 1
    assert checked >= 2


def test_dsml_structure_versus_string_payload():
    p = RoundParser(thinking=False)
    states = []
    for piece in [
        "Answer.\n\n<｜DSML｜tool_calls>\n",
        '<｜DSML｜invoke name="Bash">\n<｜DSML｜parameter name="command" string="true">',
        "ls -la",
        '</｜DSML｜parameter>\n<｜DSML｜parameter name="timeout" string="false">',
        "30",
    ]:
        p.feed(piece)
        states.append(p.in_dsml_structure())
    assert states == [True, False, False, True, True]
    assert not RoundParser(thinking=False).in_dsml_structure()  # plain text: free sampling
