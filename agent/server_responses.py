"""OpenAI Responses API (`POST /v1/responses`, what Codex CLI speaks): request conversion,
response body and the SSE event sequence.

Stateless: every request carries its whole input (`store: false` style); a
`previous_response_id` is refused with a clear message. Reasoning items come back to the
client with the raw reasoning text as their content, and are turned back into the assistant
turn's `reasoning_content` when the client replays them.

Stream: `response.created`, `response.in_progress`, then per output item
`response.output_item.added`, its deltas (`response.reasoning_text.delta`,
`response.content_part.added` + `response.output_text.delta` + `response.output_text.done` +
`response.content_part.done`, or `response.function_call_arguments.delta` +
`.done`), `response.output_item.done`; finally `response.completed` (or
`response.incomplete`) with the whole response.
"""

from __future__ import annotations

import json
import secrets
import time
from typing import Any

from ds4_agent.agent.server_convert import GenRequest, Sampling, _finish, openai_effort
from ds4_agent.agent.server_errors import ApiError
from ds4_agent.agent.server_events import (
    Done,
    Event,
    ReasoningDelta,
    TextDelta,
    ToolArgs,
    ToolStart,
    Usage,
)
from pydantic import BaseModel, ConfigDict, Field


class ResponsesRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str
    input: str | list[dict[str, Any]]
    instructions: str | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    max_output_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    stream: bool = False
    reasoning: dict[str, Any] | None = None
    previous_response_id: str | None = None


def _text_of(content: Any, where: str) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise ApiError(400, f"{where} must be a string or a list of parts", param=where)
    texts = []
    for i, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind not in ("input_text", "output_text", "text"):
            raise ApiError(
                400,
                f"content part type '{kind}' is not supported at {where}[{i}]; "
                "this model takes text only",
                param=f"{where}[{i}].type",
            )
        texts.append(str(part.get("text", "")))
    return "\n\n".join(texts)


def _reasoning_text(item: dict[str, Any]) -> str:
    parts = item.get("content") or []
    text = "".join(p.get("text", "") for p in parts if isinstance(p, dict))
    if text:
        return text
    if isinstance(item.get("encrypted_content"), str):
        return item["encrypted_content"]
    return "".join(p.get("text", "") for p in item.get("summary") or [] if isinstance(p, dict))


def from_responses(req: ResponsesRequest, default_thinking: bool = True) -> GenRequest:
    if req.previous_response_id:
        raise ApiError(
            400,
            "previous_response_id is not supported: this server stores no responses; "
            "send the whole conversation in 'input'",
            param="previous_response_id",
        )
    msgs: list[dict[str, Any]] = []
    if req.instructions:
        msgs.append({"role": "system", "content": req.instructions})
    items = [{"role": "user", "content": req.input}] if isinstance(req.input, str) else req.input
    pending_reasoning: str | None = None

    def assistant() -> dict[str, Any]:
        """The assistant message that a function call or text of this turn belongs to."""
        nonlocal pending_reasoning
        if not msgs or msgs[-1]["role"] != "assistant":
            msgs.append({"role": "assistant", "content": ""})
        if pending_reasoning is not None:
            msgs[-1]["reasoning_content"] = pending_reasoning
            pending_reasoning = None
        return msgs[-1]

    for i, item in enumerate(items):
        where = f"input[{i}]"
        if not isinstance(item, dict):
            raise ApiError(400, f"{where} must be an object", param=where)
        kind = item.get("type", "message")
        if kind == "message":
            role = item.get("role")
            text = _text_of(item.get("content"), f"{where}.content")
            if role in ("system", "developer", "user"):
                msgs.append({"role": role, "content": text})
            elif role == "assistant":
                m = assistant()
                if m.get("tool_calls"):  # text after calls starts a new turn
                    msgs.append({"role": "assistant", "content": text})
                else:
                    m["content"] += text
            else:
                raise ApiError(400, f"unknown role '{role}' at {where}.role", param=f"{where}.role")
        elif kind == "reasoning":
            pending_reasoning = _reasoning_text(item)
        elif kind == "function_call":
            for key in ("call_id", "name"):
                if not isinstance(item.get(key), str):
                    raise ApiError(400, f"{where}.{key} is required", param=f"{where}.{key}")
            args = item.get("arguments", "{}")
            m = assistant()
            m.setdefault("tool_calls", []).append(
                {
                    "id": item["call_id"],
                    "type": "function",
                    "function": {
                        "name": item["name"],
                        "arguments": args if isinstance(args, str) else json.dumps(args),
                    },
                }
            )
        elif kind == "function_call_output":
            if not isinstance(item.get("call_id"), str):
                raise ApiError(400, f"{where}.call_id is required", param=f"{where}.call_id")
            out = item.get("output", "")
            msgs.append(
                {
                    "role": "tool",
                    "tool_call_id": item["call_id"],
                    "content": out if isinstance(out, str) else _text_of(out, f"{where}.output"),
                }
            )
        else:
            raise ApiError(400, f"input item type '{kind}' is not supported", param=f"{where}.type")

    tools = []
    for t in req.tools or []:
        # Built-in tool kinds (web search, custom grammars, …) have no DSML equivalent; the
        # model simply does not see them.
        if t.get("type") == "function" and isinstance(t.get("name"), str):
            fn = {k: t[k] for k in ("name", "description", "parameters") if t.get(k) is not None}
            tools.append({"type": "function", "function": fn})
    choice = req.tool_choice
    if choice == "none":
        tools = []
    elif isinstance(choice, dict) and choice.get("type") == "function":
        tools = [t for t in tools if t["function"]["name"] == choice.get("name")]
        if not tools:
            raise ApiError(
                400,
                f"tool_choice names function '{choice.get('name')}', which is not in tools",
                param="tool_choice.name",
            )
    if tools:
        if msgs and msgs[0]["role"] == "system":
            msgs[0]["tools"] = tools
        else:
            msgs.insert(0, {"role": "system", "content": "", "tools": tools})

    effort_in = (req.reasoning or {}).get("effort")
    thinking, effort = openai_effort(effort_in, default_thinking, "reasoning.effort")
    gen = GenRequest(
        messages=msgs,
        thinking_mode="thinking" if thinking else "chat",
        reasoning_effort=effort,
        max_tokens=req.max_output_tokens,
        sampling=Sampling(
            temperature=1.0 if req.temperature is None else req.temperature,
            top_p=1.0 if req.top_p is None else req.top_p,
        ),
        tool_names=[t["function"]["name"] for t in tools],
    )
    return _finish(gen)


def _sse(obj: dict[str, Any]) -> bytes:
    return (
        f"event: {obj['type']}\n".encode()
        + b"data: "
        + json.dumps(obj, ensure_ascii=False).encode()
        + b"\n\n"
    )


KEEPALIVE = b": keep-alive\n\n"


class ResponsesResponse:
    def __init__(self, model: str) -> None:
        self.id = "resp_" + secrets.token_hex(12)
        self.model = model
        self.created = int(time.time())
        self.output: list[dict[str, Any]] = []
        self._open: str | None = None
        self._call_item: dict[int, int] = {}
        self.seq = 0
        self.done: Done | None = None

    def _ev(self, obj: dict[str, Any]) -> bytes:
        obj["sequence_number"] = self.seq
        self.seq += 1
        return _sse(obj)

    def _snapshot(self, status: str) -> dict[str, Any]:
        done = self.done
        body: dict[str, Any] = {
            "id": self.id,
            "object": "response",
            "created_at": self.created,
            "status": status,
            "model": self.model,
            "output": self.output if done else [],
            "parallel_tool_calls": True,
            "tool_choice": "auto",
            "tools": [],
            "error": None,
            "incomplete_details": None,
        }
        if done is not None:
            if status == "incomplete":
                body["incomplete_details"] = {"reason": "max_output_tokens"}
            u = done.usage
            body["usage"] = {
                "input_tokens": u.prompt_tokens,
                "input_tokens_details": {"cached_tokens": u.cached_tokens},
                "output_tokens": u.completion_tokens,
                "output_tokens_details": {"reasoning_tokens": 0},
                "total_tokens": u.prompt_tokens + u.completion_tokens,
            }
        return body

    def start(self) -> list[bytes]:
        snap = self._snapshot("in_progress")
        return [
            self._ev({"type": "response.created", "response": snap}),
            self._ev({"type": "response.in_progress", "response": snap}),
        ]

    def _close(self) -> list[bytes]:
        if self._open is None:
            return []
        idx = len(self.output) - 1
        item = self.output[idx]
        frames = []
        if self._open == "message":
            part = item["content"][0]
            frames.append(
                self._ev(
                    {
                        "type": "response.output_text.done",
                        "item_id": item["id"],
                        "output_index": idx,
                        "content_index": 0,
                        "text": part["text"],
                    }
                )
            )
            frames.append(
                self._ev(
                    {
                        "type": "response.content_part.done",
                        "item_id": item["id"],
                        "output_index": idx,
                        "content_index": 0,
                        "part": part,
                    }
                )
            )
        elif self._open == "function_call":
            frames.append(
                self._ev(
                    {
                        "type": "response.function_call_arguments.done",
                        "item_id": item["id"],
                        "output_index": idx,
                        "arguments": item["arguments"],
                    }
                )
            )
        item["status"] = "completed"
        self._open = None
        frames.append(
            self._ev({"type": "response.output_item.done", "output_index": idx, "item": item})
        )
        return frames

    def _add(self, kind: str, item: dict[str, Any]) -> list[bytes]:
        frames = self._close()
        self.output.append(item)
        self._open = kind
        idx = len(self.output) - 1
        added = json.loads(json.dumps(item))
        frames.append(
            self._ev({"type": "response.output_item.added", "output_index": idx, "item": added})
        )
        if kind == "message":
            frames.append(
                self._ev(
                    {
                        "type": "response.content_part.added",
                        "item_id": item["id"],
                        "output_index": idx,
                        "content_index": 0,
                        "part": {"type": "output_text", "text": "", "annotations": []},
                    }
                )
            )
        return frames

    def on(self, ev: Event) -> list[bytes]:
        if isinstance(ev, ReasoningDelta):
            frames = []
            if self._open != "reasoning":
                frames += self._add(
                    "reasoning",
                    {
                        "type": "reasoning",
                        "id": "rs_" + secrets.token_hex(12),
                        "summary": [],
                        "content": [{"type": "reasoning_text", "text": ""}],
                        "status": "in_progress",
                    },
                )
            item = self.output[-1]
            item["content"][0]["text"] += ev.text
            frames.append(
                self._ev(
                    {
                        "type": "response.reasoning_text.delta",
                        "item_id": item["id"],
                        "output_index": len(self.output) - 1,
                        "content_index": 0,
                        "delta": ev.text,
                    }
                )
            )
            return frames
        if isinstance(ev, TextDelta):
            frames = []
            if self._open != "message":
                frames += self._add(
                    "message",
                    {
                        "type": "message",
                        "id": "msg_" + secrets.token_hex(12),
                        "status": "in_progress",
                        "role": "assistant",
                        "content": [{"type": "output_text", "text": "", "annotations": []}],
                    },
                )
            item = self.output[-1]
            item["content"][0]["text"] += ev.text
            frames.append(
                self._ev(
                    {
                        "type": "response.output_text.delta",
                        "item_id": item["id"],
                        "output_index": len(self.output) - 1,
                        "content_index": 0,
                        "delta": ev.text,
                    }
                )
            )
            return frames
        if isinstance(ev, ToolStart):
            frames = self._add(
                "function_call",
                {
                    "type": "function_call",
                    "id": "fc_" + secrets.token_hex(12),
                    "call_id": ev.call_id,
                    "name": ev.name,
                    "arguments": "",
                    "status": "in_progress",
                },
            )
            self._call_item[ev.index] = len(self.output) - 1
            return frames
        if isinstance(ev, ToolArgs):
            idx = self._call_item.get(ev.index)
            if idx is None or not ev.text:
                return []
            item = self.output[idx]
            item["arguments"] += ev.text
            return [
                self._ev(
                    {
                        "type": "response.function_call_arguments.delta",
                        "item_id": item["id"],
                        "output_index": idx,
                        "delta": ev.text,
                    }
                )
            ]
        if isinstance(ev, Done):
            frames = self._close()
            self.done = ev
            status = self.status()
            kind = "response.completed" if status == "completed" else "response.incomplete"
            frames.append(self._ev({"type": kind, "response": self._snapshot(status)}))
            return frames
        return []

    def status(self) -> str:
        return "incomplete" if self.done and self.done.finish_reason == "length" else "completed"

    def body(self) -> dict[str, Any]:
        self.done = self.done or Done("stop", Usage())
        if self.done.finish_reason != "tool_calls":
            # An unfinished call block is not executable.
            self.output = [o for o in self.output if o["type"] != "function_call"]
        for item in self.output:
            item["status"] = "completed"
        return self._snapshot(self.status())
