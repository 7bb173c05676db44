"""Turn OpenAI / Anthropic request bodies into one neutral generation request.

The neutral form carries the message list exactly as the official DeepSeek V4 encoder takes it
(OpenAI-style roles, tool schemas attached to the system message, assistant `tool_calls` with
JSON-string arguments, `tool` results) plus the sampling knobs. Everything client-specific
stops here; the worker and the prompt cache see only `GenRequest`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from ds4_agent.agent.server_errors import ApiError
from ds4_agent.agent.server_schemas import (
    AnthBlock,
    ChatCompletionRequest,
    MessagesRequest,
    OAIContentPart,
    OAIToolChoiceNamed,
)

MAX_STOP_STRINGS = 16


@dataclass
class Sampling:
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float | None = None
    seed: int | None = None


@dataclass
class GenRequest:
    messages: list[dict[str, Any]]
    thinking_mode: str  # "chat" | "thinking"
    reasoning_effort: str | None  # None | "high" | "max" (what the encoder accepts)
    max_tokens: int | None
    sampling: Sampling
    stops: list[str] = field(default_factory=list)
    tool_names: list[str] = field(default_factory=list)
    # The last message is a partial assistant turn that the model continues (rendered
    # without EOS); the completion then starts as visible text, not reasoning.
    continues_assistant: bool = False

    @property
    def has_tools(self) -> bool:
        return any(m.get("tools") for m in self.messages)


def _finish(gen: GenRequest) -> GenRequest:
    last = gen.messages[-1] if gen.messages else None
    if last is not None and last["role"] == "assistant":
        if last.get("tool_calls"):
            raise ApiError(
                400,
                "the last message is an assistant tool call; send the tool results after it",
                param="messages",
            )
        last["wo_eos"] = True
        gen.continues_assistant = True
    return gen


def _dumps(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False)


def _attach_tools(messages: list[dict[str, Any]], tools: list[dict[str, Any]]) -> None:
    """The official encoder reads tool schemas from a `tools` key on the system message."""
    if not tools:
        return
    if messages and messages[0]["role"] == "system":
        messages[0]["tools"] = tools
    else:
        messages.insert(0, {"role": "system", "content": "", "tools": tools})


def _parts_text(parts: list[OAIContentPart], where: str) -> str:
    texts = []
    for i, p in enumerate(parts):
        if p.type not in ("text", "input_text", "output_text") or p.text is None:
            raise ApiError(
                400,
                f"content part type '{p.type}' is not supported at {where}[{i}]; "
                "this model takes text only",
                param=f"{where}[{i}].type",
            )
        texts.append(p.text)
    return "\n\n".join(texts)


def _stops(value: str | list[str] | None, param: str) -> list[str]:
    stops = [value] if isinstance(value, str) else list(value or [])
    if len(stops) > MAX_STOP_STRINGS:
        raise ApiError(400, f"at most {MAX_STOP_STRINGS} stop strings are allowed", param=param)
    if any(s == "" for s in stops):
        raise ApiError(400, "stop strings must not be empty", param=param)
    return stops


# ---------------------------------------------------------------------------------------------
# OpenAI


def _openai_thinking(req: ChatCompletionRequest, default_thinking: bool) -> tuple[str, str | None]:
    thinking = default_thinking
    if req.thinking is not None:
        thinking = req.thinking.type != "disabled"
    kwargs = req.chat_template_kwargs or {}
    for key in ("thinking", "enable_thinking"):
        if key in kwargs:
            if not isinstance(kwargs[key], bool):
                raise ApiError(
                    400,
                    f"chat_template_kwargs.{key} must be true or false",
                    param=f"chat_template_kwargs.{key}",
                )
            thinking = kwargs[key]
    thinking, effort = openai_effort(req.reasoning_effort, thinking, "reasoning_effort")
    return ("thinking" if thinking else "chat"), effort


def openai_effort(value: str | None, thinking: bool, param: str) -> tuple[bool, str | None]:
    """OpenAI effort names -> (thinking on?, the encoder's reasoning_effort)."""
    if value is None:
        return thinking, None
    e = value.lower()
    if e in ("none", "minimal"):
        return False, None
    if e in ("low", "medium", "high"):
        # The V4 encoder adds nothing below "max"; "high" is passed through as it is.
        return True, ("high" if e == "high" else None)
    if e in ("max", "xhigh"):
        return True, "max"
    raise ApiError(
        400, f"unknown {param} '{value}'; use none, low, medium, high or max", param=param
    )


def from_openai(
    req: ChatCompletionRequest, raw: dict[str, Any], default_thinking: bool = True
) -> GenRequest:
    msgs: list[dict[str, Any]] = []
    for i, m in enumerate(req.messages):
        where = f"messages[{i}]"
        content: str
        if isinstance(m.content, list):
            content = _parts_text(m.content, f"{where}.content")
        else:
            content = m.content or ""
        if m.role in ("system", "developer", "user"):
            if m.content is None and m.role == "user":
                raise ApiError(
                    400, f"{where}.content is required for a user message", param=f"{where}.content"
                )
            msgs.append({"role": m.role, "content": content})
        elif m.role == "tool":
            if not m.tool_call_id:
                raise ApiError(
                    400,
                    f"{where}.tool_call_id is required for a tool message",
                    param=f"{where}.tool_call_id",
                )
            msgs.append({"role": "tool", "tool_call_id": m.tool_call_id, "content": content})
        else:  # assistant
            out: dict[str, Any] = {"role": "assistant", "content": content}
            if m.reasoning_content:
                out["reasoning_content"] = m.reasoning_content
            if m.tool_calls:
                out["tool_calls"] = [
                    {
                        "id": tc.id,
                        "type": "function",
                        "function": {
                            "name": tc.function.name,
                            "arguments": tc.function.arguments
                            if isinstance(tc.function.arguments, str)
                            else _dumps(tc.function.arguments),
                        },
                    }
                    for tc in m.tool_calls
                ]
            msgs.append(out)

    raw_tools = [t.get("function", {}) for t in (raw.get("tools") or [])]
    tools = [{"type": "function", "function": f} for f in raw_tools]
    names = [f.get("name", "") for f in raw_tools]
    choice = req.tool_choice
    if choice == "none":
        tools = []
    elif isinstance(choice, OAIToolChoiceNamed):
        want = choice.function.name
        tools = [t for t in tools if t["function"].get("name") == want]
        if not tools:
            raise ApiError(
                400,
                f"tool_choice names function '{want}', which is not in tools",
                param="tool_choice.function.name",
            )
    _attach_tools(msgs, tools)
    fmt = req.response_format
    if fmt is not None and fmt.get("type") not in (None, "text"):
        # The official encoder states the schema in the system message (not enforced by
        # constrained decoding here).
        if not msgs or msgs[0]["role"] != "system":
            msgs.insert(0, {"role": "system", "content": ""})
        msgs[0]["response_format"] = raw.get("response_format", fmt)

    mode, effort = _openai_thinking(req, default_thinking)
    gen = GenRequest(
        messages=msgs,
        thinking_mode=mode,
        reasoning_effort=effort,
        max_tokens=req.max_completion_tokens or req.max_tokens,
        sampling=Sampling(
            temperature=1.0 if req.temperature is None else req.temperature,
            top_p=1.0 if req.top_p is None else req.top_p,
            top_k=req.top_k or 0,
            min_p=req.min_p,
            seed=req.seed,
        ),
        stops=_stops(req.stop, "stop"),
        tool_names=[n for n in names if any(t["function"].get("name") == n for t in tools)],
    )
    return _finish(gen)


# ---------------------------------------------------------------------------------------------
# Anthropic


def _anth_text(content: str | list[AnthBlock] | None, where: str) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    texts = []
    for i, b in enumerate(content):
        if b.type != "text":
            raise ApiError(
                400,
                f"block type '{b.type}' is not supported at {where}[{i}]; this model takes text only",
                param=f"{where}[{i}].type",
            )
        texts.append(b.text or "")
    return "\n\n".join(texts)


def from_anthropic(req: MessagesRequest, raw: dict[str, Any]) -> GenRequest:
    msgs: list[dict[str, Any]] = []
    if req.system is not None:
        msgs.append({"role": "system", "content": _anth_text(req.system, "system")})
    for i, m in enumerate(req.messages):
        where = f"messages[{i}].content"
        blocks = (
            [AnthBlock(type="text", text=m.content)] if isinstance(m.content, str) else m.content
        )
        if m.role == "user":
            texts: list[str] = []
            for j, b in enumerate(blocks):
                if b.type == "tool_result":
                    if not b.tool_use_id:
                        raise ApiError(
                            400,
                            f"{where}[{j}].tool_use_id is required for a tool_result block",
                            param=f"{where}[{j}].tool_use_id",
                        )
                    msgs.append(
                        {
                            "role": "tool",
                            "tool_call_id": b.tool_use_id,
                            "content": _anth_text(b.content, f"{where}[{j}].content"),
                        }
                    )
                elif b.type == "text":
                    texts.append(b.text or "")
                else:
                    raise ApiError(
                        400,
                        f"block type '{b.type}' is not supported in a user message; "
                        "use text or tool_result",
                        param=f"{where}[{j}].type",
                    )
            if texts:
                msgs.append({"role": "user", "content": "\n\n".join(texts)})
        else:
            out: dict[str, Any] = {"role": "assistant", "content": ""}
            reasoning: list[str] = []
            calls: list[dict[str, Any]] = []
            for j, b in enumerate(blocks):
                if b.type == "text":
                    out["content"] += b.text or ""
                elif b.type == "thinking":
                    reasoning.append(b.thinking or "")
                elif b.type == "redacted_thinking":
                    continue
                elif b.type == "tool_use":
                    if not b.id or not b.name:
                        raise ApiError(
                            400,
                            f"{where}[{j}] needs 'id' and 'name' for a tool_use block",
                            param=f"{where}[{j}]",
                        )
                    calls.append(
                        {
                            "id": b.id,
                            "type": "function",
                            "function": {"name": b.name, "arguments": _dumps(b.input or {})},
                        }
                    )
                else:
                    raise ApiError(
                        400,
                        f"block type '{b.type}' is not supported in an assistant message",
                        param=f"{where}[{j}].type",
                    )
            if reasoning:
                out["reasoning_content"] = "".join(reasoning)
            if calls:
                out["tool_calls"] = calls
            msgs.append(out)

    raw_tools = raw.get("tools") or []
    tools = [
        {
            "type": "function",
            "function": {
                "name": t["name"],
                **({"description": t["description"]} if t.get("description") is not None else {}),
                "parameters": t.get("input_schema") or {"type": "object", "properties": {}},
            },
        }
        for t in raw_tools
    ]
    choice = req.tool_choice
    if choice is not None and choice.type == "none":
        tools = []
    elif choice is not None and choice.type == "tool":
        tools = [t for t in tools if t["function"]["name"] == choice.name]
        if not tools:
            raise ApiError(
                400,
                f"tool_choice names tool '{choice.name}', which is not in tools",
                param="tool_choice.name",
            )
    _attach_tools(msgs, tools)

    thinking = req.thinking is not None and req.thinking.type in ("enabled", "adaptive")
    gen = GenRequest(
        messages=msgs,
        thinking_mode="thinking" if thinking else "chat",
        reasoning_effort=None,
        max_tokens=req.max_tokens,
        sampling=Sampling(
            temperature=1.0 if req.temperature is None else req.temperature,
            top_p=1.0 if req.top_p is None else req.top_p,
            top_k=req.top_k or 0,
        ),
        stops=_stops(req.stop_sequences, "stop_sequences"),
        tool_names=[t["function"]["name"] for t in tools],
    )
    return _finish(gen)
