"""Server pieces that need no model: request conversion, DSML streaming, wire formats."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from ds4_agent.agent.server_anthropic import AnthropicResponse
from ds4_agent.agent.server_cache import IndexEntry, SnapshotIndex
from ds4_agent.agent.server_completion import CompletionParser
from ds4_agent.agent.server_convert import from_anthropic, from_openai
from ds4_agent.agent.server_errors import ApiError, from_validation_error
from ds4_agent.agent.server_events import (
    Done,
    ReasoningDelta,
    StopMatcher,
    TextDelta,
    ToolArgs,
    ToolEnd,
    ToolStart,
    Usage,
)
from ds4_agent.agent.server_openai import OpenAIResponse
from ds4_agent.agent.server_render import EOS_TEXT, canonical_calls
from ds4_agent.agent.server_replay import ReplayMap, ReplayRecord
from ds4_agent.agent.server_runtime import check_bind, is_loopback
from ds4_agent.agent.server_schemas import ChatCompletionRequest, MessagesRequest
from pydantic import ValidationError

GOLDEN = Path(__file__).parent / "golden" / "dsv4-encoding"
PARSE_CASES = sorted((GOLDEN / "parse").glob("*.json"))


def _oai(raw: dict) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate(raw)


TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "read_file",
            "description": "Read a file",
            "parameters": {"type": "object", "properties": {"path": {"type": "string"}}},
        },
    }
]


# -- conversion --------------------------------------------------------------------------------


def test_openai_tools_attach_to_system_and_thinking_switches() -> None:
    raw = {
        "model": "m",
        "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}],
        "tools": TOOLS,
        "reasoning_effort": "max",
        "max_completion_tokens": 7,
        "stop": "END",
    }
    gen = from_openai(_oai(raw), raw)
    assert gen.messages[0] == {"role": "system", "content": "", "tools": TOOLS}
    assert gen.messages[1] == {"role": "user", "content": "hi"}
    assert (gen.thinking_mode, gen.reasoning_effort, gen.max_tokens) == ("thinking", "max", 7)
    assert gen.stops == ["END"]
    for off in (
        {"reasoning_effort": "none"},
        {"thinking": {"type": "disabled"}},
        {"chat_template_kwargs": {"thinking": False}},
    ):
        raw2 = {**raw, "reasoning_effort": None, **off}
        assert from_openai(_oai(raw2), raw2).thinking_mode == "chat"
    fmt = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object"}}}
    raw4 = {**raw, "response_format": fmt}
    assert from_openai(_oai(raw4), raw4).messages[0]["response_format"] == fmt
    raw3 = {**raw, "tool_choice": "none"}
    assert "tools" not in from_openai(_oai(raw3), raw3).messages[0]


def test_openai_assistant_tool_calls_and_tool_results() -> None:
    raw = {
        "model": "m",
        "messages": [
            {"role": "system", "content": "sys"},
            {"role": "user", "content": "go"},
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "id": "c1",
                        "type": "function",
                        "function": {"name": "f", "arguments": {"a": 1}},
                    }
                ],
            },
            {"role": "tool", "tool_call_id": "c1", "content": "ok"},
        ],
        "tools": TOOLS,
    }
    gen = from_openai(_oai(raw), raw)
    assert gen.messages[0]["tools"] == TOOLS and gen.messages[0]["content"] == "sys"
    assert gen.messages[2]["tool_calls"][0]["function"]["arguments"] == '{"a": 1}'
    assert gen.messages[3] == {"role": "tool", "tool_call_id": "c1", "content": "ok"}


@pytest.mark.parametrize(
    ("patch", "param"),
    [
        ({"reasoning_effort": "huge"}, "reasoning_effort"),
        (
            {"tool_choice": {"type": "function", "function": {"name": "nope"}}},
            "tool_choice.function.name",
        ),
        ({"messages": [{"role": "tool", "content": "x"}]}, "messages[0].tool_call_id"),
        (
            {"messages": [{"role": "user", "content": [{"type": "image_url", "text": None}]}]},
            "messages[0].content[0].type",
        ),
        ({"stop": [""]}, "stop"),
    ],
)
def test_openai_conversion_errors_name_the_field(patch: dict, param: str) -> None:
    raw = {"model": "m", "messages": [{"role": "user", "content": "x"}], "tools": TOOLS, **patch}
    with pytest.raises(ApiError) as e:
        from_openai(_oai(raw), raw)
    assert e.value.status == 400 and e.value.param == param


@pytest.mark.parametrize(
    ("raw", "param"),
    [
        ({"model": "m", "messages": "hi"}, "messages"),
        (
            {"model": "m", "messages": [{"role": "user", "content": "x"}], "temperature": "hot"},
            "temperature",
        ),
        ({"messages": [{"role": "user", "content": "x"}]}, "model"),
        ({"model": "m", "messages": [{"role": "wizard", "content": "x"}]}, "messages[0].role"),
        (
            {"model": "m", "messages": [{"role": "user", "content": "x"}], "max_tokens": 0},
            "max_tokens",
        ),
    ],
)
def test_validation_errors_name_the_field(raw: dict, param: str) -> None:
    with pytest.raises(ValidationError) as e:
        _oai(raw)
    err = from_validation_error(e.value)
    assert err.status == 400 and err.param == param and param in err.message
    assert err.body("openai")["error"]["param"] == param
    assert err.body("anthropic")["error"]["type"] == "invalid_request_error"


def test_anthropic_conversion() -> None:
    raw = {
        "model": "m",
        "max_tokens": 50,
        "system": [{"type": "text", "text": "be brief"}],
        "tools": [{"name": "read_file", "description": "Read", "input_schema": {"type": "object"}}],
        "thinking": {"type": "enabled", "budget_tokens": 1024},
        "stop_sequences": ["##"],
        "messages": [
            {"role": "user", "content": "read a.py"},
            {
                "role": "assistant",
                "content": [
                    {"type": "thinking", "thinking": "need it", "signature": ""},
                    {"type": "text", "text": "Reading."},
                    {
                        "type": "tool_use",
                        "id": "toolu_1",
                        "name": "read_file",
                        "input": {"path": "a.py"},
                    },
                ],
            },
            {
                "role": "user",
                "content": [
                    {
                        "type": "tool_result",
                        "tool_use_id": "toolu_1",
                        "content": [{"type": "text", "text": "x=1"}],
                    },
                    {"type": "text", "text": "now explain"},
                ],
            },
        ],
    }
    gen = from_anthropic(MessagesRequest.model_validate(raw), raw)
    assert gen.thinking_mode == "thinking" and gen.stops == ["##"] and gen.max_tokens == 50
    sys_msg, user, asst, tool, user2 = gen.messages
    assert sys_msg["content"] == "be brief"
    assert sys_msg["tools"][0]["function"] == {
        "name": "read_file",
        "description": "Read",
        "parameters": {"type": "object"},
    }
    assert asst == {
        "role": "assistant",
        "content": "Reading.",
        "reasoning_content": "need it",
        "tool_calls": [
            {
                "id": "toolu_1",
                "type": "function",
                "function": {"name": "read_file", "arguments": '{"path": "a.py"}'},
            }
        ],
    }
    assert tool == {"role": "tool", "tool_call_id": "toolu_1", "content": "x=1"}
    assert user2 == {"role": "user", "content": "now explain"}


# -- rendering ---------------------------------------------------------------------------------


def test_canonical_calls_match_the_official_encoder() -> None:
    case = json.loads(
        (GOLDEN / "render" / "05_chat_tool_calls_typed_arguments_full_exchange.json").read_text()
    )
    asst = next(m for m in case["messages"] if m["role"] == "assistant" and m.get("tool_calls"))
    block = canonical_calls(asst["tool_calls"])
    assert block + EOS_TEXT in case["expected"]


# -- streaming completion parser ---------------------------------------------------------------


def _run_parser(completion: str, mode: str, pieces: list[str]) -> dict:
    ids = iter(f"call_{i}" for i in range(100))
    p = CompletionParser(mode, lambda: next(ids))
    events = []
    for piece in pieces:
        events += p.feed(piece)
    if not p.calls_done:
        events += p.finish()
    out = {"reasoning": "", "content": "", "calls": [], "error": p.error}
    for ev in events:
        if isinstance(ev, ReasoningDelta):
            out["reasoning"] += ev.text
        elif isinstance(ev, TextDelta):
            out["content"] += ev.text
        elif isinstance(ev, ToolStart):
            assert ev.index == len(out["calls"])
            out["calls"].append({"name": ev.name, "arguments": ""})
        elif isinstance(ev, ToolArgs):
            out["calls"][ev.index]["arguments"] += ev.text
        elif isinstance(ev, ToolEnd):
            json.loads(out["calls"][ev.index]["arguments"])
    return out


def _splits(text: str, seed: int) -> list[str]:
    rng = random.Random(seed)
    out, i = [], 0
    while i < len(text):
        n = rng.randint(1, 7)
        out.append(text[i : i + n])
        i += n
    return out


@pytest.mark.parametrize("path", PARSE_CASES, ids=[p.stem for p in PARSE_CASES])
def test_streaming_parser_matches_official_parse(path: Path) -> None:
    case = json.loads(path.read_text())
    completion = case["completion"]
    if completion.endswith(EOS_TEXT):
        completion = completion[: -len(EOS_TEXT)]  # the worker stops on the EOS id
    for pieces in ([completion], list(completion), _splits(completion, 1), _splits(completion, 2)):
        got = _run_parser(completion, case["thinking_mode"], pieces)
        if "expected" not in case:
            if "Duplicate" in case["expected_error"]:
                assert got["error"] and "duplicate" in got["error"].lower()
                assert got["calls"] == [] or all(c["arguments"] for c in got["calls"])
            continue
        exp = case["expected"]
        assert got["reasoning"] == exp["reasoning_content"]
        assert got["content"] == exp["content"]
        assert got["calls"] == [
            {"name": c["function"]["name"], "arguments": c["function"]["arguments"]}
            for c in exp["tool_calls"]
        ]


def test_parser_tolerates_variants_and_reports_garbage() -> None:
    text = '\n\n<DSML｜tool_calls>\n<｜｜DSML｜｜invoke name="f">\n<｜DSML｜parameter name="a" string="false">1</｜DSML｜parameter >\n</｜DSML｜invoke>\n</｜DSML｜tool_calls >'
    got = _run_parser(text, "chat", list(text))
    assert got["calls"] == [{"name": "f", "arguments": '{"a": 1}'}] and got["error"] is None
    bad = "\n\n<｜DSML｜tool_calls>\nnot a tag at all"
    got = _run_parser(bad, "chat", list(bad))
    assert got["error"] and got["calls"] == []


def test_stop_matcher_holds_back_partial_matches() -> None:
    s = StopMatcher(["STOP"])
    out = "".join(s.push(c) for c in "abcSTqSTOPxyz")
    assert out == "abcSTq" and s.matched == "STOP"
    s = StopMatcher(["zz"])
    assert "".join(s.push(c) for c in "abcz") + s.flush() == "abcz" and s.matched is None


# -- wire formats ------------------------------------------------------------------------------


def _frames(raw: list[bytes]) -> list[dict]:
    out = []
    for f in raw:
        for line in f.decode().splitlines():
            if line.startswith("data: ") and line != "data: [DONE]":
                out.append(json.loads(line[6:]))
    return out


EVENTS = [
    ReasoningDelta("hmm"),
    TextDelta("Reading."),
    ToolStart(0, "call_x", "read_file"),
    ToolArgs(0, '{"path": "'),
    ToolArgs(0, 'a.py"}'),
    ToolEnd(0),
    Done("tool_calls", Usage(10, 4, 6)),
]


def test_openai_stream_and_body_agree() -> None:
    r = OpenAIResponse("m", "fp", include_usage=True)
    raw = [r.start()]
    for ev in EVENTS:
        raw += r.on(ev)
    assert raw[-1] == b"data: [DONE]\n\n"
    chunks = _frames(raw)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert chunks[-2]["choices"][0]["finish_reason"] == "tool_calls"
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["prompt_tokens_details"] == {
        "cached_tokens": 4
    }
    args = "".join(
        tc["function"].get("arguments", "")
        for c in chunks
        for ch in c["choices"]
        for tc in ch["delta"].get("tool_calls", [])
    )
    body = r.body()
    msg = body["choices"][0]["message"]
    assert msg["tool_calls"][0]["function"]["arguments"] == args == '{"path": "a.py"}'
    assert msg["reasoning_content"] == "hmm" and msg["content"] == "Reading."
    assert body["usage"] == {
        "prompt_tokens": 10,
        "completion_tokens": 6,
        "total_tokens": 16,
        "prompt_tokens_details": {"cached_tokens": 4},
    }


def test_anthropic_event_sequence() -> None:
    r = AnthropicResponse("m")
    raw = [r.start(Usage(10, 4, 0))]
    for ev in EVENTS:
        raw += r.on(ev)
    types = [f["type"] for f in _frames(raw)]
    assert types == [
        "message_start",
        "content_block_start",
        "content_block_delta",
        "content_block_delta",  # signature
        "content_block_stop",
        "content_block_start",
        "content_block_delta",
        "content_block_stop",
        "content_block_start",
        "content_block_delta",
        "content_block_delta",
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]
    body = r.body()
    assert [b["type"] for b in body["content"]] == ["thinking", "text", "tool_use"]
    assert body["content"][2]["input"] == {"path": "a.py"} and body["stop_reason"] == "tool_use"
    assert body["usage"]["cache_read_input_tokens"] == 4 and body["usage"]["input_tokens"] == 6


# -- replay map, snapshot index, bind rules ----------------------------------------------------


def test_replay_map_survives_restart(tmp_path: Path) -> None:
    rec = ReplayRecord("think", "text", "\n\n<｜DSML｜tool_calls>…", ("call_a", "call_b"))
    ReplayMap(tmp_path).put(rec)
    again = ReplayMap(tmp_path)
    assert again.get("call_b") == rec and again.get("call_zz") is None
    assert all(p.suffix == ".json" for p in tmp_path.iterdir())  # no temp files left behind
    small = ReplayMap(tmp_path / "small", max_records=3)
    for i in range(5):
        small.put(ReplayRecord("", "", "x", (f"id{i}",)))
    assert len(list((tmp_path / "small").glob("*.json"))) == 3


def test_snapshot_index_picks_longest_matching_prefix(tmp_path: Path) -> None:
    import hashlib

    idx = SnapshotIndex(tmp_path / "i.json")
    for text, key in ((b"abc", "k3"), (b"abcdef", "k6"), (b"abX", "kx")):
        idx.add(IndexEntry(key, len(text), len(text), hashlib.sha256(text).hexdigest()))
    reloaded = SnapshotIndex(tmp_path / "i.json")
    assert reloaded.longest(b"abcdefgh").key == "k6"
    assert reloaded.longest(b"abcde").key == "k3"
    assert reloaded.longest(b"zzz") is None
    assert reloaded.longest(b"abcdefgh", min_bytes=3).key == "k6"
    assert reloaded.longest(b"abcdefgh", min_bytes=6) is None


def test_bind_rules() -> None:
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("example.org")
    check_bind("127.0.0.1", None)
    check_bind("0.0.0.0", "k")
    with pytest.raises(ValueError, match="--api-key"):
        check_bind("0.0.0.0", None)


def test_unfinished_call_block_is_not_returned_as_a_call() -> None:
    evs = [TextDelta("x"), ToolStart(0, "call_1", "f"), ToolArgs(0, '{"a": '), Done("stop")]
    o, a = OpenAIResponse("m", "fp"), AnthropicResponse("m")
    for ev in evs:
        o.on(ev)
        a.on(ev)
    msg = o.body()["choices"][0]["message"]
    assert "tool_calls" not in msg and msg["content"] == "x"
    assert [b["type"] for b in a.body()["content"]] == ["text"]
