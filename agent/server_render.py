"""Render a request's messages into the prompt text the model reads.

Rendering is the official V4 encoder (`prompts.encoding.encode_messages`), byte for byte, with
one server addition: assistant turns whose tool-call ids the server issued are replayed exactly
as sampled (reasoning and DSML bytes, see `server_replay`), so a client's JSON history renders
to the same text as the live KV state and the previous turn is reused instead of prefilled.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field, replace
from typing import Any

from ds4_agent.agent.server_convert import GenRequest
from ds4_agent.agent.server_errors import ApiError
from ds4_agent.agent.server_replay import ReplayMap

EOS_TEXT = "<｜end▁of▁sentence｜>"
DSML = "｜DSML｜"


def canonical_calls(tool_calls: list[dict[str, Any]]) -> str:
    """The tool-calls block exactly as the official encoder writes it (spec §5.2)."""
    invokes = []
    for tc in tool_calls:
        fn = tc["function"]
        try:
            args = json.loads(fn["arguments"])
            if not isinstance(args, dict):
                raise ValueError
        except ValueError:
            args = {"arguments": fn["arguments"]}
        params = []
        for k, v in args.items():
            if isinstance(v, str):
                params.append(f'<{DSML}parameter name="{k}" string="true">{v}</{DSML}parameter>')
            else:
                text = json.dumps(v, ensure_ascii=False)
                params.append(
                    f'<{DSML}parameter name="{k}" string="false">{text}</{DSML}parameter>'
                )
        invokes.append(
            f'<{DSML}invoke name="{fn["name"]}">\n' + "\n".join(params) + f"\n</{DSML}invoke>"
        )
    return f"\n\n<{DSML}tool_calls>\n" + "\n".join(invokes) + f"\n</{DSML}tool_calls>"


@dataclass
class _Swap:
    content: str
    canonical: str
    exact: str


@dataclass
class Rendered:
    """The prompt text and its segments (`prompts.encoding.Segment`, control or data).

    Control segments are our scaffolding (special strings in them become special ids); data
    segments are client text (tokenized as plain text, so a tool result quoting `<｜User｜>`
    cannot forge a turn). The texts of the segments concatenate to `text`.
    """

    text: str
    segments: list[Any] = field(default_factory=list)


def _flatten(segments: list[Any]) -> list[Any]:
    out: list[Any] = []
    for seg in segments:
        if seg.kind == "turn":
            out += _flatten(list(seg.parts))
        else:
            out.append(seg)
    return out


def _replace(segments: list[Any], a: int, b: int, new: Any) -> list[Any]:
    """Segments with the text range [a, b) replaced by the segment `new`."""
    out: list[Any] = []
    off = 0
    placed = False
    for seg in segments:
        end = off + len(seg.text)
        if end <= a or off >= b:
            if off >= b and not placed:
                out.append(new)
                placed = True
            out.append(seg)
        else:
            if off < a:
                out.append(replace(seg, text=seg.text[: a - off]))
            if not placed:
                out.append(new)
                placed = True
            if end > b:
                out.append(replace(seg, text=seg.text[b - off :]))
        off = end
    if not placed:
        out.append(new)
    return out


def slice_segments(segments: list[Any], start: int) -> list[Any]:
    """The segments covering text[start:]."""
    out: list[Any] = []
    off = 0
    for seg in segments:
        end = off + len(seg.text)
        if end > start:
            out.append(seg if off >= start else replace(seg, text=seg.text[start - off :]))
        off = end
    return out


def render_prompt(gen: GenRequest, replay: ReplayMap | None) -> Rendered:
    """The prompt (BOS included, ending with the assistant prefix) as text and segments."""
    from ds4_agent.prompts.encoding import Segment, render_segments

    messages = copy.deepcopy(gen.messages)
    swaps: list[_Swap] = []
    for m in messages:
        if m["role"] != "assistant" or not m.get("tool_calls") or replay is None:
            continue
        rec = replay.get(m["tool_calls"][0].get("id", ""))
        if rec is None or [tc.get("id") for tc in m["tool_calls"]] != list(rec.call_ids):
            continue
        # The client often drops reasoning; the live state holds what was sampled.
        m["reasoning_content"] = rec.reasoning
        if m.get("content", "") != rec.content:
            continue  # the client edited the turn: render what it sent
        swaps.append(_Swap(rec.content, canonical_calls(m["tool_calls"]), rec.dsml))
    try:
        segments = _flatten(
            render_segments(
                messages,
                thinking_mode=gen.thinking_mode,
                drop_thinking=True,
                reasoning_effort=gen.reasoning_effort,
            )
        )
    except (AssertionError, ValueError, KeyError, TypeError) as e:
        raise ApiError(400, f"cannot render these messages: {e}", param="messages") from e
    prompt = "".join(seg.text for seg in segments)
    cursor = 0
    for s in swaps:
        needle = s.content + s.canonical + EOS_TEXT
        at = prompt.find(needle, cursor)
        if at < 0:
            continue
        start = at + len(s.content)
        # The sampled block is the model's own output: its DSML markers are control tokens.
        segments = _replace(segments, start, start + len(s.canonical), Segment(s.exact, "control"))
        prompt = prompt[:start] + s.exact + prompt[start + len(s.canonical) :]
        cursor = start + len(s.exact)
    return Rendered(prompt, segments)
