"""Streaming DSML parser: events, tolerated variants, structured errors, <think> handling,
fuzzing (never raises) and render -> parse round trips."""

from __future__ import annotations

import json
import random

import pytest
from ds4_agent.prompts import dsml
from ds4_agent.prompts.dsml import DsmlParser, parse_completion
from ds4_agent.prompts.encoding import completion_text
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from v4_tok import ours

EOS = "<｜end▁of▁sentence｜>"
CALL = (
    "\n\n<｜DSML｜tool_calls>\n"
    '<｜DSML｜invoke name="edit">\n'
    '<｜DSML｜parameter name="path" string="true">a.py</｜DSML｜parameter>\n'
    '<｜DSML｜parameter name="line" string="false">16</｜DSML｜parameter>\n'
    '<｜DSML｜parameter name="new" string="true">x = 1\ny = "<b>"\n</｜DSML｜parameter>\n'
    "</｜DSML｜invoke>\n"
    "</｜DSML｜tool_calls>"
)
ARGS = {"path": "a.py", "line": 16, "new": 'x = 1\ny = "<b>"\n'}


def _parse_chunks(text: str, mode: str, sizes: list[int]) -> tuple[dsml.ParsedTurn, list]:
    parser = DsmlParser(mode)
    events: list = []
    pos = 0
    k = 0
    while pos < len(text):
        n = sizes[k % len(sizes)] if sizes else 1
        events += parser.feed(text[pos : pos + n])
        pos += n
        k += 1
    events += parser.finish()
    return parser.result(), events


def test_events_of_a_streamed_call(tokenizer_json):
    tok = ours(tokenizer_json)
    parser = DsmlParser("thinking", tokenizer=tok)
    text = "plan</think>Editing." + CALL + EOS
    events = []
    seen_start_before_close = False
    for i in tok.encode_trusted(text):
        new = parser.feed_token(i)
        events += new
        if any(isinstance(e, dsml.ToolCallStart) for e in new):
            seen_start_before_close = not any(isinstance(e, dsml.ToolCallEnd) for e in events)
    assert seen_start_before_close
    kinds = [
        type(e).__name__
        for e in events
        if not isinstance(e, (dsml.ReasoningDelta, dsml.TextDelta, dsml.ParamDelta))
    ]
    assert kinds == [
        "ReasoningEnd",
        "ToolBlockStart",
        "ToolCallStart",
        "ParamStart",
        "ParamEnd",
        "ParamStart",
        "ParamEnd",
        "ParamStart",
        "ParamEnd",
        "ToolCallEnd",
        "ToolBlockEnd",
        "TurnEnd",
    ]
    assert "".join(e.text for e in events if isinstance(e, dsml.ReasoningDelta)) == "plan"
    assert "".join(e.text for e in events if isinstance(e, dsml.TextDelta)) == "Editing."
    new_deltas = [e.text for e in events if isinstance(e, dsml.ParamDelta) and e.name == "new"]
    assert "".join(new_deltas) == ARGS["new"] and len(new_deltas) > 1  # streamed, not at once
    ends = {e.name: e.value for e in events if isinstance(e, dsml.ParamEnd)}
    assert ends == ARGS
    turn = events[-1].turn
    assert turn.ok and turn.ended_with_eos and turn.tool_calls[0].params == ARGS
    assert json.loads(turn.tool_calls[0].arguments) == ARGS


@pytest.mark.parametrize(
    "variant",
    [
        CALL.replace("<｜DSML｜", "<DSML｜"),  # missing leading bar
        CALL.replace("｜DSML｜", "｜｜DSML｜｜"),  # doubled bars
        CALL.replace("</｜DSML｜parameter>", "</｜DSML｜parameter >").replace(
            "</｜DSML｜invoke>", "</｜DSML｜invoke\n>"
        ),
        CALL.replace("</｜DSML｜tool_calls>", "</｜DSML｜tool_calls｜>"),
        CALL.replace(">\n<", ">\n\n  <"),  # looser whitespace between tags
        CALL.replace('name="edit"', "name=“edit”"),  # typographic quotes
        "\n" + CALL.lstrip("\n"),
    ],
)
def test_tolerated_variants(variant):
    turn = parse_completion("Editing." + variant + "\n" + EOS, "chat")
    assert turn.ok, turn.error
    assert turn.content == "Editing." and [c.name for c in turn.tool_calls] == ["edit"]
    assert turn.tool_calls[0].params == ARGS


def test_block_without_eos_is_complete():
    # Generation may stop at </｜DSML｜tool_calls>; the official parser accepts that too.
    turn = parse_completion(CALL, "chat")
    assert turn.ok and not turn.ended_with_eos and turn.tool_calls[0].params == ARGS


@pytest.mark.parametrize(
    "text, kind",
    [
        (CALL.replace("invoke name", "call name"), "dsml_syntax"),
        (CALL.replace('string="false">16', 'string="false">sixteen'), "invalid_json"),
        (CALL.replace('name="line"', 'name="path"'), "duplicate_parameter"),
        (CALL + "\nmore text" + EOS, "content_after_tool_calls"),
        (CALL[:-40], "interrupted_tool_call"),
        (CALL[: CALL.index("y = ")] + EOS, "interrupted_tool_call"),
        (CALL[: CALL.index("</｜DSML｜invoke>")] + EOS, "interrupted_tool_call"),
        ("Answer <think> more" + EOS, "unexpected_special"),
        ("Answer </think>" + EOS, "unexpected_special"),
        ("The token ｜DSML｜ is special." + EOS, "dsml_syntax"),
        ("\n\n<｜DSML｜tool_calls>\n</｜DSML｜tool_calls>" + EOS, "dsml_syntax"),
        ("no end", "missing_eos"),
    ],
)
def test_malformed_output_is_a_structured_error(text, kind):
    turn = parse_completion(text, "chat")
    assert turn.error is not None and turn.error.kind == kind, turn.error
    assert not turn.tool_calls
    feedback = turn.error.feedback()
    assert "\n" not in feedback and len(feedback) < 600
    if kind not in ("missing_eos", "unexpected_special"):
        assert (
            feedback.startswith("invalid DSML tool call: ") and "<｜DSML｜tool_calls>" in feedback
        )


def test_tool_call_inside_thinking_is_not_executed():
    inside = "Let me call it:" + CALL + "\nHmm, wrong place."
    # Only inside the reasoning: an error that tells the model what to do.
    turn = parse_completion(inside + "</think>Done." + EOS, "thinking")
    assert turn.error is not None and turn.error.kind == "tool_call_in_thinking"
    assert not turn.tool_calls and [c.name for c in turn.ignored_calls] == ["edit"]
    # A valid call after </think> still runs; the one inside is reported as ignored.
    turn = parse_completion(inside + "</think>" + CALL + EOS, "thinking")
    assert turn.ok and [c.params for c in turn.tool_calls] == [ARGS]
    assert len(turn.ignored_calls) == 1
    # Merely mentioning DSML while thinking changes nothing.
    turn = parse_completion("I will use ｜DSML｜ syntax.</think>" + CALL + EOS, "thinking")
    assert turn.ok and len(turn.tool_calls) == 1 and not turn.ignored_calls
    # Reasoning never closed, call inside it (the model forgot </think>): not executed.
    turn = parse_completion(inside + EOS, "thinking")
    assert turn.error is not None and turn.error.kind == "missing_think_end"
    assert "tool call" in turn.error.message and not turn.tool_calls


def test_content_before_block_keeps_only_official_separator():
    turn = parse_completion("a\n\n\n" + CALL + EOS, "chat")  # CALL starts with "\n\n"
    assert turn.content == "a\n\n\n"
    turn = parse_completion("a\n" + CALL.lstrip("\n") + EOS, "chat")
    assert turn.content == "a"


def test_whitespace_is_streamed_not_hoarded():
    # Only the last two characters may be held back (a possible separator before a block), so a
    # model looping on whitespace neither stalls the display nor makes parsing quadratic.
    for mode, prefix in (("chat", ""), ("thinking", "r</think>")):
        parser = DsmlParser(mode)
        parser.feed(prefix)
        shown = 0
        for ch in " \n" * 500:
            shown += sum(len(e.text) for e in parser.feed(ch) if isinstance(e, dsml.TextDelta))
        assert shown >= 998
    parser = DsmlParser("chat")
    parser.feed(CALL.replace("</｜DSML｜invoke>", " " * 5000 + "</｜DSML｜invoke>") + EOS)
    assert parser.result().tool_calls[0].params == ARGS


def test_feed_after_end_is_ignored():
    parser = DsmlParser("chat")
    parser.feed("ok" + EOS)
    assert parser.finished
    assert parser.feed("more") == [] and parser.finish() == []
    assert parser.result().content == "ok"


# ---------------------------------------------------------------------------- fuzzing
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    data=st.binary(max_size=300),
    mode=st.sampled_from(["chat", "thinking"]),
    seed=st.integers(0, 99),
)
def test_random_bytes_never_raise(data, mode, seed):
    text = data.decode("utf-8", errors="replace")
    sizes = [random.Random(seed).randint(1, 7) for _ in range(5)]
    turn, _ = _parse_chunks(text, mode, sizes)
    assert isinstance(turn, dsml.ParsedTurn)
    if turn.error is not None:
        assert not turn.tool_calls


_DSML_BITS = [
    "<｜DSML｜",
    "</｜DSML｜",
    "<DSML｜",
    "｜",
    "DSML",
    "tool_calls",
    "invoke",
    "parameter",
    ' name="x"',
    ' string="true"',
    ' string="false"',
    ">",
    "\n",
    "\n\n",
    "<",
    "</",
    "</think>",
    "<think>",
    EOS,
    "1",
    '"',
    " ",
    "{",
    "}",
    "a",
]


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    bits=st.lists(st.sampled_from(_DSML_BITS), max_size=40),
    mode=st.sampled_from(["chat", "thinking"]),
    sizes=st.lists(st.integers(1, 9), min_size=1, max_size=4),
)
def test_dsml_soup_never_raises_and_chunking_does_not_matter(bits, mode, sizes):
    text = "".join(bits)
    whole = parse_completion(text, mode)
    chunked, events = _parse_chunks(text, mode, sizes)
    # Identical results; only the quoted snippet of an error message may be shorter.
    same_error = (chunked.error is None) == (whole.error is None)
    if chunked.error is not None and whole.error is not None:
        same_error = chunked.error.kind == whole.error.kind
        chunked.error = whole.error
    assert same_error and chunked == whole
    assert isinstance(events[-1], dsml.TurnEnd)
    if whole.error is not None:
        assert not whole.tool_calls


@settings(max_examples=200, deadline=None)
@given(cut=st.integers(0, len(CALL) + len(EOS)), mode=st.sampled_from(["chat", "thinking"]))
def test_truncated_calls_never_execute_partially(cut, mode):
    text = ("r</think>" if mode == "thinking" else "") + (CALL + EOS)[:cut]
    turn = parse_completion(text, mode)
    if turn.tool_calls:
        # Only a fully closed block may run.
        assert turn.ok and "</｜DSML｜tool_calls>" in text and turn.tool_calls[0].params == ARGS


# ---------------------------------------------------------------------------- round trips
_TEXT = st.text(
    alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="｜"), max_size=30
)
_NAME = st.from_regex(r"[A-Za-z_][A-Za-z0-9_.-]{0,12}", fullmatch=True)
_JSON = st.recursive(
    st.one_of(
        st.none(),
        st.booleans(),
        st.integers(),
        st.floats(allow_nan=False, allow_infinity=False),
        _TEXT,
    ),
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(_NAME, inner, max_size=3)),
    max_leaves=8,
)


def _clean(s: str) -> bool:
    return not any(x in s for x in ("<think>", "</think>", "DSML", EOS, "<｜begin▁of▁sentence｜>"))


@settings(
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
@given(
    calls=st.lists(
        st.tuples(_NAME, st.dictionaries(_NAME, _JSON, max_size=4)), min_size=1, max_size=3
    ),
    content=_TEXT.filter(_clean),
    reasoning=_TEXT.filter(_clean),
    mode=st.sampled_from(["chat", "thinking"]),
)
def test_valid_calls_round_trip(calls, content, reasoning, mode):
    msg = {
        "role": "assistant",
        "content": content,
        "reasoning_content": reasoning,
        "tool_calls": [
            {
                "type": "function",
                "function": {"name": n, "arguments": json.dumps(a, ensure_ascii=False)},
            }
            for n, a in calls
        ],
    }
    turn = parse_completion(completion_text(msg, mode), mode)
    assert turn.ok, turn.error
    assert turn.content == content
    assert turn.reasoning_content == (reasoning if mode == "thinking" else "")
    assert [(c.name, c.params) for c in turn.tool_calls] == [(n, a) for n, a in calls]
    assert [c.arguments for c in turn.tool_calls] == [
        json.dumps(a, ensure_ascii=False) for _, a in calls
    ]


def test_round_trip_token_by_token(tokenizer_json):
    tok = ours(tokenizer_json)
    msg = {
        "role": "assistant",
        "content": "Let me check 世界 😀.",
        "reasoning_content": "think\n\nmore",
        "tool_calls": [
            {
                "type": "function",
                "function": {
                    "name": "bash",
                    "arguments": json.dumps(
                        {
                            "command": "echo '<｜User｜>' && ls\n",
                            "timeout": 30.5,
                            "env": {"A": [1, None]},
                        },
                        ensure_ascii=False,
                    ),
                },
            }
        ],
    }
    text = completion_text(msg, "thinking")
    parser = DsmlParser("thinking", tokenizer=tok)
    for i in tok.encode_trusted(text):
        parser.feed_token(i)
    turn = parser.result()
    assert turn.ok and turn.ended_with_eos
    assert turn.to_message()["tool_calls"][0]["function"] == msg["tool_calls"][0]["function"]
