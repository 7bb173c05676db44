"""Render a request's messages into the prompt text the model reads.

Rendering is the official V4 encoder (`prompts.encoding.encode_messages`), byte for byte, with
one server addition: assistant turns whose tool-call ids the server issued are replayed exactly
as sampled (reasoning and DSML bytes, see `server_replay`), so a client's JSON history renders
to the same text as the live KV state and the previous turn is reused instead of prefilled.
"""

from __future__ import annotations

import copy
import json
import re
import secrets
from dataclasses import dataclass, field
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
    """The prompt text plus the character spans that must be tokenized as plain text."""

    text: str
    untrusted: list[tuple[int, int]] = field(default_factory=list)


# Every added token of the V4 tokenizer contains one of these (checked by a test against the
# real tokenizer.json), so text without them cannot hold a control token.
SPECIAL_HINTS = ("｜", "<|", "think>", "dsml:")


class _Marker:
    """Swaps client text that could hold control-token strings for unique placeholders.

    The official encoder only concatenates content, so rendering placeholders and putting the
    texts back afterwards gives the same string while recording where each client text
    landed. Those spans are tokenized as untrusted text: a tool result that quotes
    `<｜User｜>` stays text and cannot forge a turn.
    """

    def __init__(self, tok: Any | None, texts: list[str]) -> None:
        self.tok = tok
        nonce = secrets.token_hex(6)
        while any(nonce in t for t in texts):
            nonce = secrets.token_hex(6)
        self.nonce = nonce
        self.values: list[str] = []
        self.pattern = re.compile("\ue000" + nonce + "(\\d+)\ue001")

    def mark(self, text: Any) -> Any:
        if not isinstance(text, str) or not any(h in text for h in SPECIAL_HINTS):
            return text
        if self.tok is not None and self.tok.encode_trusted(text) == self.tok.encode_untrusted(
            text
        ):
            return text
        self.values.append(text)
        return f"\ue000{self.nonce}{len(self.values) - 1}\ue001"

    def unmark(self, rendered: str) -> Rendered:
        out: list[str] = []
        spans: list[tuple[int, int]] = []
        pos = 0
        length = 0
        for m in self.pattern.finditer(rendered):
            out.append(rendered[pos : m.start()])
            length += m.start() - pos
            value = self.values[int(m.group(1))]
            out.append(value)
            spans.append((length, length + len(value)))
            length += len(value)
            pos = m.end()
        out.append(rendered[pos:])
        return Rendered("".join(out), spans)


def _client_texts(messages: list[dict[str, Any]]) -> list[str]:
    texts = []
    for m in messages:
        for key in ("content", "reasoning_content"):
            if isinstance(m.get(key), str):
                texts.append(m[key])
        for tc in m.get("tool_calls") or []:
            texts.append(tc["function"]["arguments"])
    return texts


def _mark_messages(messages: list[dict[str, Any]], marker: _Marker) -> None:
    for m in messages:
        for key in ("content", "reasoning_content"):
            if key in m:
                m[key] = marker.mark(m[key])
        for tc in m.get("tool_calls") or []:
            fn = tc["function"]
            try:
                args = json.loads(fn["arguments"])
            except ValueError:
                continue
            if isinstance(args, dict) and any(
                isinstance(v, str) and any(h in v for h in SPECIAL_HINTS) for v in args.values()
            ):
                # Top-level string values are rendered raw, so a placeholder survives; the
                # re-serialized arguments render identically (the encoder parses them anyway).
                marked = {k: marker.mark(v) for k, v in args.items()}
                fn["arguments"] = json.dumps(marked, ensure_ascii=False)


def render_prompt(gen: GenRequest, replay: ReplayMap | None, tok: Any | None = None) -> Rendered:
    """The prompt (BOS included, ending with the assistant prefix) and its untrusted spans."""
    from ds4_agent.prompts.encoding import encode_messages

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
        m["_swap"] = len(swaps)
        swaps.append(_Swap(rec.content, canonical_calls(m["tool_calls"]), rec.dsml))
    marker = _Marker(tok, _client_texts(messages))
    _mark_messages(messages, marker)
    for m in messages:
        if "_swap" in m:
            sw = swaps[m.pop("_swap")]
            sw.content = m.get("content", "")
            sw.canonical = canonical_calls(m["tool_calls"])
    try:
        prompt = encode_messages(
            messages,
            thinking_mode=gen.thinking_mode,
            drop_thinking=True,
            reasoning_effort=gen.reasoning_effort,
        )
    except (AssertionError, ValueError, KeyError, TypeError) as e:
        raise ApiError(400, f"cannot render these messages: {e}", param="messages") from e
    cursor = 0
    for s in swaps:
        needle = s.content + s.canonical + EOS_TEXT
        at = prompt.find(needle, cursor)
        if at < 0:
            continue
        start = at + len(s.content)
        prompt = prompt[:start] + s.exact + prompt[start + len(s.canonical) :]
        cursor = start + len(s.exact)
    return marker.unmark(prompt)
