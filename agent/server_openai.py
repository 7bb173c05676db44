"""OpenAI chat-completions wire format: the response body and the SSE chunk sequence.

Chunk order: a first delta with the role, then `reasoning_content` deltas, `content` deltas
and `tool_calls` deltas (the first one of a call carries index, id, type and name with empty
arguments; later ones carry argument fragments), a last chunk with `finish_reason`, an
optional usage chunk with empty `choices` (`stream_options.include_usage`), then
`data: [DONE]`.
"""

from __future__ import annotations

import json
import secrets
import time
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

FINISH = {"stop": "stop", "length": "length", "tool_calls": "tool_calls", "cancelled": "stop"}


def sse_data(obj: Any) -> bytes:
    return b"data: " + json.dumps(obj, ensure_ascii=False).encode() + b"\n\n"


KEEPALIVE = b": keep-alive\n\n"
DONE = b"data: [DONE]\n\n"


def usage_body(u: Usage) -> dict[str, Any]:
    return {
        "prompt_tokens": u.prompt_tokens,
        "completion_tokens": u.completion_tokens,
        "total_tokens": u.prompt_tokens + u.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": u.cached_tokens},
    }


class OpenAIResponse:
    """Turns worker events into chunks (streaming) or one message (non-streaming)."""

    def __init__(self, model: str, fingerprint: str, include_usage: bool = False) -> None:
        self.id = "chatcmpl-" + secrets.token_hex(12)
        self.created = int(time.time())
        self.model = model
        self.fingerprint = fingerprint
        self.include_usage = include_usage
        self.reasoning: list[str] = []
        self.content: list[str] = []
        self.calls: list[dict[str, Any]] = []
        self.done: Done | None = None

    def _chunk(self, delta: dict[str, Any], finish: str | None = None) -> bytes:
        return sse_data(
            {
                "id": self.id,
                "object": "chat.completion.chunk",
                "created": self.created,
                "model": self.model,
                "system_fingerprint": self.fingerprint,
                "choices": [
                    {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
                ],
            }
        )

    def start(self) -> bytes:
        return self._chunk({"role": "assistant", "content": ""})

    def on(self, ev: Event) -> list[bytes]:
        """Record `ev`; return the SSE frames it produces."""
        if isinstance(ev, ReasoningDelta):
            self.reasoning.append(ev.text)
            return [self._chunk({"reasoning_content": ev.text})]
        if isinstance(ev, TextDelta):
            self.content.append(ev.text)
            return [self._chunk({"content": ev.text})]
        if isinstance(ev, ToolStart):
            self.calls.append(
                {
                    "id": ev.call_id,
                    "type": "function",
                    "function": {"name": ev.name, "arguments": ""},
                }
            )
            delta = {
                "index": ev.index,
                "id": ev.call_id,
                "type": "function",
                "function": {"name": ev.name, "arguments": ""},
            }
            return [self._chunk({"tool_calls": [delta]})]
        if isinstance(ev, ToolArgs):
            if not ev.text:
                return []
            self.calls[ev.index]["function"]["arguments"] += ev.text
            delta = {"index": ev.index, "function": {"arguments": ev.text}}
            return [self._chunk({"tool_calls": [delta]})]
        if isinstance(ev, Done):
            self.done = ev
            frames = [self._chunk({}, FINISH.get(ev.finish_reason, "stop"))]
            if self.include_usage:
                frames.append(
                    sse_data(
                        {
                            "id": self.id,
                            "object": "chat.completion.chunk",
                            "created": self.created,
                            "model": self.model,
                            "system_fingerprint": self.fingerprint,
                            "choices": [],
                            "usage": usage_body(ev.usage),
                        }
                    )
                )
            frames.append(DONE)
            return frames
        return []

    def body(self) -> dict[str, Any]:
        done = self.done or Done("stop")
        # Calls of a turn that did not end in a complete tool-call block are not executable.
        calls = self.calls if done.finish_reason == "tool_calls" else []
        message: dict[str, Any] = {
            "role": "assistant",
            "content": "".join(self.content) if (self.content or not calls) else None,
        }
        if self.reasoning:
            message["reasoning_content"] = "".join(self.reasoning)
        if calls:
            message["tool_calls"] = calls
        return {
            "id": self.id,
            "object": "chat.completion",
            "created": self.created,
            "model": self.model,
            "system_fingerprint": self.fingerprint,
            "choices": [
                {
                    "index": 0,
                    "message": message,
                    "logprobs": None,
                    "finish_reason": FINISH.get(done.finish_reason, "stop"),
                }
            ],
            "usage": usage_body(done.usage),
        }
