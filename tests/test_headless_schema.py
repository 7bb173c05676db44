"""Headless result objects and stream-json events: field names and exit codes."""

from __future__ import annotations

import io
import json

import pytest
from ds4_agent.agent.headless import (
    EXIT_ERROR,
    EXIT_INTERRUPTED,
    EXIT_LIMIT,
    EXIT_OK,
    AssistantContent,
    AssistantEvent,
    InitEvent,
    ResultMessage,
    StreamWriter,
    TextBlock,
    ToolUseBlock,
    Usage,
)
from pydantic import TypeAdapter, ValidationError

CLAUDE_CODE_FIELDS = {
    "type",
    "subtype",
    "is_error",
    "result",
    "session_id",
    "num_turns",
    "duration_ms",
    "usage",
}


def _result(subtype: str, is_error: bool) -> ResultMessage:
    return ResultMessage(
        subtype=subtype,
        is_error=is_error,
        result="ok",
        session_id="abc",
        num_turns=1,
        duration_ms=5,
        usage=Usage(input_tokens=3, output_tokens=2),
        prefill_tokens=3,
        restored_tokens=10,
        kv_restored=True,
    )


@pytest.mark.parametrize(
    ("subtype", "code"),
    [
        ("success", EXIT_OK),
        ("error_max_turns", EXIT_LIMIT),
        ("error_during_execution", EXIT_ERROR),
        ("error_interrupted", EXIT_INTERRUPTED),
    ],
)
def test_exit_code_per_subtype(subtype, code):
    assert _result(subtype, subtype != "success").exit_code == code


def test_result_has_claude_code_fields_and_ours():
    doc = json.loads(_result("success", False).model_dump_json())
    assert doc.keys() >= CLAUDE_CODE_FIELDS
    assert {"prefill_tokens", "restored_tokens", "kv_restored"} <= doc.keys()
    assert doc["type"] == "result" and doc["total_cost_usd"] == 0.0


def test_unknown_subtype_is_rejected():
    with pytest.raises(ValidationError):
        _result("error_maybe", True)


def test_stream_writer_writes_one_flushed_line_per_event():
    buf = io.StringIO()
    w = StreamWriter(buf)
    w.emit(
        InitEvent(session_id="s", cwd="/r", model="m", tools=["Read"], permission_mode="default")
    )
    w.emit(
        AssistantEvent(
            session_id="s",
            message=AssistantContent(
                content=[TextBlock(text="hi"), ToolUseBlock(id="t1", name="Read", input={})]
            ),
        )
    )
    w.emit(_result("success", False))
    lines = buf.getvalue().splitlines()
    assert [json.loads(x)["type"] for x in lines] == ["system", "assistant", "result"]
    adapter = TypeAdapter(InitEvent | AssistantEvent | ResultMessage)
    for x in lines:
        adapter.validate_json(x)
