"""One assistant round read by the project's DSML parser, token by token, as the loop feeds it."""

from __future__ import annotations

import pytest
from agent_harness import tokenizer
from ds4_agent.agent.round_parser import Round

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
EOS = "<｜end▁of▁sentence｜>"


@pytest.fixture(scope="module")
def tok(tokenizer_json):
    return tokenizer(tokenizer_json)


def _round(tok, thinking: bool) -> Round:
    return Round(thinking, tok, tok.token_id("</think>"))


def _feed(r: Round, tok, text: str) -> list[tuple[str, str]]:
    """Feed tokens until the round says stop (as the loop does); return the pieces."""
    pieces: list[tuple[str, str]] = []
    for t in tok.encode_trusted(text):
        pieces += r.feed_token(t)
        if r.ended or t == tok.eos_id:
            break
    return pieces


def test_splits_reasoning_text_and_block_and_stops_at_the_close(tok):
    r = _round(tok, thinking=True)
    kinds = [k for k, _ in _feed(r, tok, "plan</think>Answer.\n\n" + BLOCK + "ignored")]
    r.finish()
    assert r.reasoning == "plan" and r.answer == "Answer."
    assert r.ended and r.dsml == BLOCK  # stops right at the closing tag
    assert not r.in_think
    assert kinds[0] == "reasoning" and "text" in kinds and kinds[-1] == "dsml"
    calls = r.calls(round_no=3)
    assert [(c.id, c.name) for c in calls] == [("call_3_0", "Read"), ("call_3_1", "Bash")]
    assert calls[0].arguments == {"path": "src/a b.py", "limit": 20}
    assert calls[1].arguments == {"command": 'echo "x\ny"'}


def test_variant_spelling_still_gives_calls(tok):
    r = _round(tok, thinking=False)
    _feed(r, tok, "ok\n" + BLOCK.replace("<｜DSML｜invoke", "<DSML｜invoke"))
    r.finish()
    assert r.ended and [c.name for c in r.calls(0)] == ["Read", "Bash"]


def test_unfinished_round_is_still_in_think(tok):
    r = _round(tok, thinking=True)
    _feed(r, tok, "still thinking about <｜DS")
    assert r.in_think and r.reasoning.startswith("still thinking")
    r.finish()
    assert r.turn is not None and r.turn.error.kind == "missing_think_end"


def test_call_only_inside_thinking_is_an_error_for_the_model(tok):
    r = _round(tok, thinking=True)
    _feed(r, tok, "maybe " + BLOCK + "</think>done" + EOS)
    r.finish()
    assert r.turn.error.kind == "tool_call_in_thinking" and r.calls(0) == []


@pytest.mark.parametrize(
    ("block", "kind"),
    [
        (BLOCK.replace('string="false">20', 'string="false">twenty'), "invalid_json"),
        (BLOCK.replace('name="limit"', 'name="path"'), "duplicate_parameter"),
        (BLOCK.replace("</｜DSML｜invoke>\n<", "</｜DSML｜invoke>\nstray <", 1), "dsml_syntax"),
        (BLOCK.replace("</｜DSML｜tool_calls>", EOS), "interrupted_tool_call"),
    ],
)
def test_malformed_blocks_stop_early_with_feedback(tok, block, kind):
    r = _round(tok, thinking=False)
    _feed(r, tok, "x\n\n" + block + "\nmore text")
    r.finish()
    assert r.ended
    assert r.turn.error.kind == kind and r.calls(0) == []
    assert "invalid DSML tool call" in r.turn.error.feedback()


def test_text_after_a_stray_special_token_is_kept(tok):
    # The parser stops reading at a special token that has no place in the answer; the loop
    # decodes on to EOS, and that text is still shown and kept as the answer.
    r = _round(tok, thinking=True)
    pieces = _feed(r, tok, "a<think>b</think>first <think> then more" + EOS)
    pieces += r.finish()
    assert not r.ended
    assert r.turn.error.kind == "unexpected_special"
    assert r.reasoning.startswith("a") and "b" in r.reasoning
    assert r.answer.startswith("first") and r.answer.endswith("then more")
    assert "".join(d for k, d in pieces if k == "text") == r.text


def test_dsml_structure_versus_string_payload(tok):
    r = _round(tok, thinking=False)
    states = []
    for piece in [
        "Answer.\n\n<｜DSML｜tool_calls>\n",
        '<｜DSML｜invoke name="Bash">\n<｜DSML｜parameter name="command" string="true">',
        "ls -la",
        '</｜DSML｜parameter>\n<｜DSML｜parameter name="timeout" string="false">',
        "30",
    ]:
        _feed(r, tok, piece)
        states.append(r.in_dsml_structure())
    assert states == [True, False, False, True, True]
    assert r.call_name == "Bash"
    assert not _round(tok, thinking=False).in_dsml_structure()  # plain text: free sampling
