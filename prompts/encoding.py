"""DeepSeek V4 chat encoding: messages -> the exact prompt text, or its token ids.

`encode_messages` renders exactly like the official `encoding_dsv4.encode_messages` (same
arguments, same output bytes; see docs/engine-spec.md §5.2 and the golden render fixtures).
`render_tokens` renders the same prompt at token level: every piece of text is tagged as our own
scaffolding (special strings become special ids) or as data (message contents, tool arguments,
schemas: tokenized as plain text, so a user message or a file containing `<｜User｜>` cannot inject
a control token), and assistant turns that carry `token_ids` (the ids the model sampled) are
appended verbatim instead of being re-tokenized from text, which would not reproduce them.

Both functions share one renderer (`render_segments`), so the text and the ids cannot drift apart:
for messages without special strings in their data, `render_tokens(...)` equals
`tokenizer.encode_trusted(encode_messages(...))`.

Tool-result escaping (docs/engine-spec.md §7 item 9): tool results are rendered raw, as the
official encoder does; a literal `</tool_result>` inside a result is not escaped. Reasons: the
model was trained on unescaped results; escaping would show the model text that differs from the
file on disk (an edit copying it would then fail to match); and the dangerous part of an injection,
control tokens such as `<｜User｜>` or `<｜Assistant｜>`, is already impossible because results are
tokenized as plain text. `<tool_result>` itself is plain text, not a special token, so a fake
boundary inside a result is no stronger than any other instruction-looking text in a file.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import regex
from ds4_agent.prompts.protocol import protocol

if TYPE_CHECKING:
    from ds4_agent.engine.tokenizer import Tokenizer

Message = dict[str, Any]
ThinkingMode = Literal["chat", "thinking"]
VALID_EFFORTS = ("max", None, "high")


class EncodingError(ValueError):
    """A request the official encoder rejects (bad role, effort, mode, task, …)."""


@dataclass(frozen=True)
class Segment:
    """A piece of the rendered prompt.

    kind: "control" = our scaffolding (special strings in it are special tokens);
          "data" = message data (tokenized as plain text);
          "turn" = a whole assistant turn; `parts` holds its own control/data segments and
                   `token_ids` the sampled ids when the message carried them.
    """

    text: str
    kind: Literal["control", "data", "turn"]
    parts: tuple[Segment, ...] = ()
    token_ids: tuple[int, ...] | None = None


@dataclass
class _Out:
    segments: list[Segment] = field(default_factory=list)

    def control(self, text: str) -> None:
        if text:
            self.segments.append(Segment(text, "control"))

    def data(self, text: str) -> None:
        if text:
            self.segments.append(Segment(text, "data"))


# ---------------------------------------------------------------------------- helpers
def _to_json(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False)


def _str(value: Any) -> str:
    """What str.format does with a value (the official templates format None as 'None')."""
    return value if isinstance(value, str) else str(value)


def _last_user_index(messages: Sequence[Message]) -> int:
    for idx in range(len(messages) - 1, -1, -1):
        if messages[idx].get("role") in ("user", "developer"):
            return idx
    return -1


def _tools_segments(out: _Out, tools: list[Any]) -> None:
    p = protocol()
    out.control("\n\n" + p.tools_preamble)
    out.data("\n".join(_to_json(t["function"]) for t in tools))
    out.control(p.tools_suffix)


def _response_format_segments(out: _Out, response_format: Any) -> None:
    out.control("\n\n" + protocol().response_format_header)
    out.data(_to_json(response_format))


def _arguments_dict(arguments: Any) -> dict[Any, Any]:
    """Official rule: arguments that are not a JSON text become one parameter named `arguments`."""
    try:
        parsed = json.loads(arguments)
    except Exception:
        parsed = {"arguments": arguments}
    if not isinstance(parsed, dict):
        raise EncodingError(f"tool call arguments must be a JSON object, got: {arguments!r}")
    return parsed


def _tool_calls_segments(out: _Out, tool_calls: list[Any]) -> None:
    dsml = protocol().dsml
    out.control(f"\n\n<{dsml}tool_calls>\n")
    for n, tc in enumerate(tool_calls):
        try:
            fn = tc["function"]
            name, arguments = fn["name"], fn["arguments"]
        except (KeyError, TypeError):
            raise EncodingError(
                f"tool call {n} must look like {{'function': {{'name': …, 'arguments': '<JSON>'}}}}"
            ) from None
        if n:
            out.control("\n")
        out.control(f'<{dsml}invoke name="')
        out.data(_str(name))
        out.control('">\n')
        for k, (key, value) in enumerate(_arguments_dict(arguments).items()):
            if k:
                out.control("\n")
            out.control(f'<{dsml}parameter name="')
            out.data(_str(key))
            is_str = isinstance(value, str)
            out.control(f'" string="{"true" if is_str else "false"}">')
            out.data(value if is_str else _to_json(value))
            out.control(f"</{dsml}parameter>")
        out.control(f"\n</{dsml}invoke>")
    out.control(f"\n</{dsml}tool_calls>")


def _tool_result_text(content: Any) -> str:
    if isinstance(content, list):
        parts = []
        for b in content:
            if b.get("type") == "text":
                parts.append(_str(b.get("text", "")))
            else:
                parts.append(f"[Unsupported {b.get('type')}]")
        return "\n\n".join(parts)
    return _str(content)  # the official template formats a None content as "None"


# ---------------------------------------------------------------------------- preprocessing
def _merge_tool_messages(messages: Sequence[Message]) -> list[Message]:
    """Tool results (and user text following them) collapse into one user message of blocks."""
    merged: list[Message] = []
    for original in messages:
        msg = copy.deepcopy(original)
        role = msg.get("role")
        if role == "tool":
            block = {
                "type": "tool_result",
                "tool_use_id": msg.get("tool_call_id", ""),
                "content": msg.get("content", ""),
            }
            if merged and merged[-1].get("role") == "user" and "content_blocks" in merged[-1]:
                merged[-1]["content_blocks"].append(block)
            else:
                merged.append({"role": "user", "content_blocks": [block]})
        elif role == "user":
            block = {"type": "text", "text": msg.get("content", "")}
            prev = merged[-1] if merged else None
            if (
                prev is not None
                and prev.get("role") == "user"
                and "content_blocks" in prev
                and prev.get("task") is None
            ):
                prev["content_blocks"].append(block)
            else:
                new = {"role": "user", "content": msg.get("content", ""), "content_blocks": [block]}
                for key in ("task", "wo_eos", "mask"):
                    if key in msg:
                        new[key] = msg[key]
                merged.append(new)
        else:
            merged.append(msg)
    return merged


def _sort_tool_results(messages: list[Message]) -> list[Message]:
    """Order the tool results of each user turn by their call order in the latest tool calls."""
    order: dict[str, int] = {}
    for msg in messages:
        role = msg.get("role")
        if role == "assistant" and msg.get("tool_calls"):
            order = {}
            for idx, tc in enumerate(msg["tool_calls"]):
                tc_id = tc.get("id") or tc.get("function", {}).get("id", "")
                if tc_id:
                    order[tc_id] = idx
        elif role == "user" and msg.get("content_blocks"):
            results = [b for b in msg["content_blocks"] if b.get("type") == "tool_result"]
            if len(results) > 1 and order:
                ranked = iter(sorted(results, key=lambda b: order.get(b.get("tool_use_id", ""), 0)))
                msg["content_blocks"] = [
                    next(ranked) if b.get("type") == "tool_result" else b
                    for b in msg["content_blocks"]
                ]
    return messages


def _drop_thinking(messages: list[Message]) -> list[Message]:
    """Before the last user/developer message: assistants lose their reasoning, developer (and
    unknown-role) messages disappear."""
    last_user = _last_user_index(messages)
    keep = {"user", "system", "tool", "latest_reminder", "direct_search_results"}
    out: list[Message] = []
    for idx, msg in enumerate(messages):
        role = msg.get("role")
        if role in keep or idx >= last_user:
            out.append(msg)
        elif role == "assistant":
            msg = dict(msg)
            msg.pop("reasoning_content", None)
            out.append(msg)
    return out


# ---------------------------------------------------------------------------- rendering
def _render_message(
    out: _Out,
    index: int,
    messages: Sequence[Message],
    thinking_mode: str,
    drop_thinking: bool,
    reasoning_effort: str | None,
) -> None:
    p = protocol()
    if thinking_mode not in ("chat", "thinking"):
        raise EncodingError(f"Invalid thinking_mode `{thinking_mode}`")
    if reasoning_effort not in VALID_EFFORTS:
        raise EncodingError(f"Invalid reasoning effort: {reasoning_effort}")
    msg = messages[index]
    last_user = _last_user_index(messages)
    role = msg.get("role")
    content = msg.get("content")
    tools = msg.get("tools")
    response_format = msg.get("response_format")

    if index == 0 and thinking_mode == "thinking" and reasoning_effort == "max":
        out.control(p.reasoning_effort_max)

    if role == "system":
        out.data(_str(content or ""))
        if tools:
            _tools_segments(out, tools)
        if response_format:
            _response_format_segments(out, response_format)
    elif role == "developer":
        if not content:
            raise EncodingError(f"Invalid message for role `{role}`: {msg}")
        out.control(p.user)
        out.data(_str(content))
        if tools:
            _tools_segments(out, tools)
        if response_format:
            _response_format_segments(out, response_format)
    elif role == "user":
        out.control(p.user)
        blocks = msg.get("content_blocks")
        if blocks:
            for n, block in enumerate(blocks):
                if n:
                    out.data("\n\n")
                kind = block.get("type")
                if kind == "text":
                    out.data(_str(block.get("text", "") or ""))
                elif kind == "tool_result":
                    out.data("<tool_result>")
                    out.data(_tool_result_text(block.get("content", "")))
                    out.data("</tool_result>")
                else:
                    out.data(f"[Unsupported {kind}]")
        else:
            out.data(_str(content or ""))
    elif role == "latest_reminder":
        out.control(p.latest_reminder)
        out.data(_str(content))
    elif role == "tool":
        raise EncodingError("tool messages must be merged into a user turn before rendering")
    elif role == "assistant":
        turn = _Out()
        prev_has_task = index >= 1 and messages[index - 1].get("task") is not None
        if (
            thinking_mode == "thinking"
            and not prev_has_task
            and (not drop_thinking or index > last_user)
        ):
            turn.data(_str(msg.get("reasoning_content") or ""))
            turn.control(p.think_end)
        turn.data(_str(content or ""))
        if msg.get("tool_calls"):
            _tool_calls_segments(turn, msg["tool_calls"])
        if not msg.get("wo_eos", False):
            turn.control(p.eos)
        ids = msg.get("token_ids")
        out.segments.append(
            Segment(
                "".join(s.text for s in turn.segments),
                "turn",
                tuple(turn.segments),
                tuple(int(i) for i in ids) if ids is not None else None,
            )
        )
    else:
        raise EncodingError(f"Unknown role: {role}")

    # Transition to what follows.
    if index + 1 < len(messages) and messages[index + 1].get("role") not in (
        "assistant",
        "latest_reminder",
    ):
        return
    task = msg.get("task")
    if task is not None:
        if task not in p.tasks:
            raise EncodingError(f"Invalid task: '{task}'. Valid tasks are: {list(p.tasks)}")
        if task != "action":
            out.control(p.tasks[task])
        else:
            out.control(p.assistant)
            out.control(p.think_start if thinking_mode == "thinking" else p.think_end)
            out.control(p.tasks[task])
    elif role in ("user", "developer"):
        out.control(p.assistant)
        if thinking_mode == "thinking" and (not drop_thinking or index >= last_user):
            out.control(p.think_start)
        else:
            out.control(p.think_end)


def render_segments(
    messages: Sequence[Message],
    thinking_mode: str = "thinking",
    context: Sequence[Message] | None = None,
    drop_thinking: bool = True,
    add_default_bos_token: bool = True,
    reasoning_effort: str | None = None,
) -> list[Segment]:
    """The prompt as tagged segments (see `Segment`); join their texts for the prompt string."""
    for n, m in enumerate([*(context or []), *messages]):
        if not isinstance(m, dict):
            raise EncodingError(
                f"message {n} must be an object with a 'role', got {type(m).__name__}"
            )
    ctx = _merge_tool_messages(context or [])
    # Sorting needs the tool-call order of the context (sorting is idempotent on ctx itself).
    merged = _sort_tool_results(ctx + _merge_tool_messages(messages))[len(ctx) :]
    full = ctx + merged

    out = _Out()
    if add_default_bos_token and not ctx:
        out.control(protocol().bos)
    drop = drop_thinking and not any(m.get("tools") for m in full)
    if thinking_mode == "thinking" and drop:
        full = _drop_thinking(full)
        n_render = len(full) - len(_drop_thinking(ctx))
    else:
        n_render = len(merged)
    start = len(full) - n_render
    for idx in range(n_render):
        _render_message(out, idx + start, full, thinking_mode, drop, reasoning_effort)
    return out.segments


def encode_messages(
    messages: Sequence[Message],
    thinking_mode: str = "thinking",
    context: Sequence[Message] | None = None,
    drop_thinking: bool = True,
    add_default_bos_token: bool = True,
    reasoning_effort: str | None = None,
) -> str:
    """The prompt text, byte for byte what the official V4 encoder produces."""
    segs = render_segments(
        messages, thinking_mode, context, drop_thinking, add_default_bos_token, reasoning_effort
    )
    return "".join(s.text for s in segs)


def completion_text(message: Message, thinking_mode: str = "thinking") -> str:
    """What the model writes for this assistant message after the generation prefix
    (`<｜Assistant｜><think>` or `<｜Assistant｜></think>`): reasoning + `</think>` (thinking mode),
    content, tool calls, EOS. This is the text `dsml.parse_completion` reads back."""
    if message.get("role") != "assistant":
        raise EncodingError("completion_text takes an assistant message")
    return encode_messages([message], thinking_mode, add_default_bos_token=False)


# ---------------------------------------------------------------------------- token level
class _SpecialSplitter:
    def __init__(self, tokenizer: Tokenizer) -> None:
        strings = sorted(protocol().special_strings, key=len, reverse=True)
        self.rx = regex.compile("|".join(regex.escape(s) for s in strings))
        self.ids = {s: tokenizer.token_id(s) for s in strings}

    def atoms(self, text: str) -> list[str | int]:
        out: list[str | int] = []
        pos = 0
        for m in self.rx.finditer(text):
            if m.start() > pos:
                out.append(text[pos : m.start()])
            out.append(self.ids[m.group()])
            pos = m.end()
        if pos < len(text):
            out.append(text[pos:])
        return out


def _turn_ids(tokenizer: Tokenizer, seg: Segment) -> list[int] | None:
    """The sampled ids of an assistant turn, when they spell exactly the rendered turn.

    The sampled ids may lack the final EOS (generation stopped at the end of a tool-call block and
    EOS is appended here), end with an EOS that a `wo_eos` turn leaves out, and carry reasoning
    that this rendering drops (only the part after `</think>` is used then). Anything else means
    the message was edited: it is re-tokenized from its text.
    """
    if seg.token_ids is None:
        return None
    ids = list(seg.token_ids)
    candidates = [ids]
    think_end = tokenizer.token_id(protocol().think_end)
    if think_end in ids:
        candidates.append(ids[ids.index(think_end) + 1 :])
    eos = tokenizer.eos_id
    for cand in candidates:
        text = tokenizer.decode(cand)
        if text == seg.text:
            return cand
        if text + protocol().eos == seg.text:
            return [*cand, eos]
        if cand and cand[-1] == eos and tokenizer.decode(cand[:-1]) == seg.text:
            return cand[:-1]  # a `wo_eos` turn whose sampled ids did end with EOS
    return None


def segments_to_ids(tokenizer: Tokenizer, segments: Sequence[Segment]) -> list[int]:
    """Tokenize rendered segments: control text with special strings -> special ids; runs of
    adjacent text (control and data alike) are BPE-encoded together as plain text, so piece
    boundaries match tokenizing the whole prompt at once."""
    splitter = _SpecialSplitter(tokenizer)
    atoms: list[str | int | list[int]] = []

    def add(seg: Segment) -> None:
        if seg.kind == "control":
            atoms.extend(splitter.atoms(seg.text))
        elif seg.kind == "data":
            atoms.append(seg.text)
        else:
            ids = _turn_ids(tokenizer, seg)
            if ids is not None:
                atoms.append(ids)
            else:
                for part in seg.parts:
                    add(part)

    for seg in segments:
        add(seg)

    out: list[int] = []
    run: list[str] = []
    for atom in atoms:
        if isinstance(atom, str):
            run.append(atom)
            continue
        if run:
            out.extend(tokenizer.encode_untrusted("".join(run)))
            run = []
        if isinstance(atom, int):
            out.append(atom)
        else:
            out.extend(atom)
    if run:
        out.extend(tokenizer.encode_untrusted("".join(run)))
    return out


def render_tokens(
    tokenizer: Tokenizer,
    messages: Sequence[Message],
    thinking_mode: str = "thinking",
    context: Sequence[Message] | None = None,
    drop_thinking: bool = True,
    add_default_bos_token: bool = True,
    reasoning_effort: str | None = None,
) -> list[int]:
    """Token ids of the prompt `encode_messages` renders (same arguments). Assistant messages may
    carry `token_ids` (their sampled ids), which are used verbatim when they match the turn."""
    segs = render_segments(
        messages, thinking_mode, context, drop_thinking, add_default_bos_token, reasoning_effort
    )
    return segments_to_ids(tokenizer, segs)
