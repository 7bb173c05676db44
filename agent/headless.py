"""Headless output: Claude Code-compatible result objects, stream-json events, exit codes.

Field names follow Claude Code's `-p --output-format json|stream-json` so existing scripts
work (`type`, `subtype`, `is_error`, `result`, `session_id`, `num_turns`, `duration_ms`,
`usage`), plus what a local KV-resuming agent can report: `prefill_tokens` (tokens this run
had to prefill), `restored_tokens` (tokens restored from snapshots) and `kv_restored`.

stdout carries only the answer (text) or JSON; progress goes to stderr. The exit code never
says 0 for a run that was cut short.
"""

from __future__ import annotations

import json
import sys
from typing import Any, Literal, TextIO

from pydantic import BaseModel, Field

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_LIMIT = 3  # --max-turns, tool-round or context limit reached
EXIT_INTERRUPTED = 130

Subtype = Literal["success", "error_max_turns", "error_during_execution", "error_interrupted"]

EXIT_FOR_SUBTYPE: dict[str, int] = {
    "success": EXIT_OK,
    "error_max_turns": EXIT_LIMIT,
    "error_during_execution": EXIT_ERROR,
    "error_interrupted": EXIT_INTERRUPTED,
}


class Usage(BaseModel):
    input_tokens: int = 0  # tokens prefilled (prompt side) in this run
    output_tokens: int = 0  # tokens sampled in this run
    cache_read_input_tokens: int = 0  # tokens restored from KV snapshots instead
    cache_creation_input_tokens: int = 0  # tokens written to new snapshots


class PermissionDenial(BaseModel):
    tool_name: str
    tool_use_id: str
    tool_input: dict[str, Any] = Field(default_factory=dict)


class ResultMessage(BaseModel):
    type: Literal["result"] = "result"
    subtype: Subtype
    is_error: bool
    result: str
    session_id: str
    session_name: str | None = None
    num_turns: int
    duration_ms: int
    duration_api_ms: int = 0  # time inside the engine (prefill + decode)
    total_cost_usd: float = 0.0  # local model: always free
    usage: Usage
    prefill_tokens: int
    restored_tokens: int
    kv_restored: bool
    permission_denials: list[PermissionDenial] = Field(default_factory=list)
    error: str | None = None  # one line when is_error

    @property
    def exit_code(self) -> int:
        return EXIT_FOR_SUBTYPE[self.subtype]


class InitEvent(BaseModel):
    type: Literal["system"] = "system"
    subtype: Literal["init"] = "init"
    session_id: str
    session_name: str | None = None
    cwd: str
    model: str
    tools: list[str]
    permission_mode: str
    kv_restored: bool = False
    restored_tokens: int = 0


class TextBlock(BaseModel):
    type: Literal["text"] = "text"
    text: str


class ThinkingBlock(BaseModel):
    type: Literal["thinking"] = "thinking"
    thinking: str


class ToolUseBlock(BaseModel):
    type: Literal["tool_use"] = "tool_use"
    id: str
    name: str
    input: dict[str, Any]


class ToolResultBlock(BaseModel):
    type: Literal["tool_result"] = "tool_result"
    tool_use_id: str
    content: str
    is_error: bool = False


class AssistantContent(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: list[TextBlock | ThinkingBlock | ToolUseBlock]


class UserContent(BaseModel):
    role: Literal["user"] = "user"
    content: list[ToolResultBlock | TextBlock]


class AssistantEvent(BaseModel):
    type: Literal["assistant"] = "assistant"
    session_id: str
    message: AssistantContent


class UserEvent(BaseModel):
    type: Literal["user"] = "user"
    session_id: str
    message: UserContent


StreamEvent = InitEvent | AssistantEvent | UserEvent | ResultMessage


class StreamWriter:
    """Writes NDJSON events (stream-json) and flushes each line: slow readers lose nothing."""

    def __init__(self, out: TextIO | None = None) -> None:
        self.out = out or sys.stdout

    def emit(self, event: BaseModel) -> None:
        self.out.write(json.dumps(event.model_dump(mode="json"), ensure_ascii=False) + "\n")
        self.out.flush()
