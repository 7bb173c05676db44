"""Anthropic messages wire format: the response body and the SSE event sequence.

Event order: `message_start`, then per content block `content_block_start`,
`content_block_delta`* (`thinking_delta`, `text_delta` or `input_json_delta`),
`content_block_stop`; then `message_delta` (stop_reason, usage) and `message_stop`.
Keep-alives are `ping` events, which the SDKs ignore.
"""

from __future__ import annotations

import json
import secrets
from typing import Any

from ds4_agent.agent.server_events import (
    Done,
    Event,
    ReasoningDelta,
    TextDelta,
    ToolArgs,
    ToolStart,
    Usage,
)

STOP_REASON = {
    "stop": "end_turn",
    "length": "max_tokens",
    "tool_calls": "tool_use",
    "cancelled": "end_turn",
}


def sse_event(name: str, obj: dict[str, Any]) -> bytes:
    return (
        f"event: {name}\n".encode()
        + b"data: "
        + json.dumps(obj, ensure_ascii=False).encode()
        + b"\n\n"
    )


KEEPALIVE = sse_event("ping", {"type": "ping"})


def usage_body(u: Usage) -> dict[str, Any]:
    # Anthropic counts cached input separately from input_tokens.
    return {
        "input_tokens": u.prompt_tokens - u.cached_tokens,
        "cache_read_input_tokens": u.cached_tokens,
        "cache_creation_input_tokens": 0,
        "output_tokens": u.completion_tokens,
    }


class AnthropicResponse:
    def __init__(self, model: str) -> None:
        self.id = "msg_" + secrets.token_hex(12)
        self.model = model
        self.blocks: list[dict[str, Any]] = []
        self._open: str | None = None  # "thinking" | "text" | "tool_use"
        self._tool_json: dict[int, str] = {}  # block index -> JSON text
        self._tool_block: dict[int, int] = {}  # call index -> block index
        self.done: Done | None = None

    def start(self, usage: Usage) -> bytes:
        return sse_event(
            "message_start",
            {
                "type": "message_start",
                "message": {
                    "id": self.id,
                    "type": "message",
                    "role": "assistant",
                    "model": self.model,
                    "content": [],
                    "stop_reason": None,
                    "stop_sequence": None,
                    "usage": {**usage_body(usage), "output_tokens": 0},
                },
            },
        )

    def _close(self) -> list[bytes]:
        if self._open is None:
            return []
        idx = len(self.blocks) - 1
        frames = []
        if self._open == "thinking":
            frames.append(
                sse_event(
                    "content_block_delta",
                    {
                        "type": "content_block_delta",
                        "index": idx,
                        "delta": {"type": "signature_delta", "signature": ""},
                    },
                )
            )
        self._open = None
        frames.append(sse_event("content_block_stop", {"type": "content_block_stop", "index": idx}))
        return frames

    def _open_block(self, kind: str, block: dict[str, Any]) -> list[bytes]:
        frames = self._close()
        self.blocks.append(block)
        self._open = kind
        start = dict(block)
        if kind == "tool_use":
            start["input"] = {}
        frames.append(
            sse_event(
                "content_block_start",
                {
                    "type": "content_block_start",
                    "index": len(self.blocks) - 1,
                    "content_block": start,
                },
            )
        )
        return frames

    def _delta(self, delta: dict[str, Any]) -> bytes:
        return sse_event(
            "content_block_delta",
            {"type": "content_block_delta", "index": len(self.blocks) - 1, "delta": delta},
        )

    def on(self, ev: Event) -> list[bytes]:
        if isinstance(ev, ReasoningDelta):
            frames = []
            if self._open != "thinking":
                frames += self._open_block(
                    "thinking", {"type": "thinking", "thinking": "", "signature": ""}
                )
            self.blocks[-1]["thinking"] += ev.text
            frames.append(self._delta({"type": "thinking_delta", "thinking": ev.text}))
            return frames
        if isinstance(ev, TextDelta):
            frames = []
            if self._open != "text":
                frames += self._open_block("text", {"type": "text", "text": ""})
            self.blocks[-1]["text"] += ev.text
            frames.append(self._delta({"type": "text_delta", "text": ev.text}))
            return frames
        if isinstance(ev, ToolStart):
            frames = self._open_block(
                "tool_use", {"type": "tool_use", "id": ev.call_id, "name": ev.name, "input": {}}
            )
            self._tool_block[ev.index] = len(self.blocks) - 1
            self._tool_json[len(self.blocks) - 1] = ""
            return frames
        if isinstance(ev, ToolArgs):
            b = self._tool_block.get(ev.index)
            if b is None or not ev.text:
                return []
            self._tool_json[b] += ev.text
            return [self._delta({"type": "input_json_delta", "partial_json": ev.text})]
        if isinstance(ev, Done):
            self.done = ev
            frames = self._close()
            frames.append(
                sse_event(
                    "message_delta",
                    {
                        "type": "message_delta",
                        "delta": {
                            "stop_reason": self.stop_reason(ev),
                            "stop_sequence": ev.stop_sequence,
                        },
                        "usage": usage_body(ev.usage),
                    },
                )
            )
            frames.append(sse_event("message_stop", {"type": "message_stop"}))
            return frames
        return []

    @staticmethod
    def stop_reason(done: Done) -> str:
        if done.stop_sequence is not None:
            return "stop_sequence"
        return STOP_REASON.get(done.finish_reason, "end_turn")

    def body(self) -> dict[str, Any]:
        done = self.done or Done("stop")
        content = []
        for i, b in enumerate(self.blocks):
            if b["type"] == "tool_use":
                if done.finish_reason != "tool_calls":
                    continue  # an unfinished call block is not executable
                try:
                    parsed = json.loads(self._tool_json.get(i) or "{}")
                except ValueError:
                    parsed = {"arguments": self._tool_json.get(i, "")}
                content.append({**b, "input": parsed})
            else:
                content.append(b)
        return {
            "id": self.id,
            "type": "message",
            "role": "assistant",
            "model": self.model,
            "content": content,
            "stop_reason": self.stop_reason(done),
            "stop_sequence": done.stop_sequence,
            "usage": usage_body(done.usage),
        }
