"""What the inference worker tells a request handler, dialect-neutral.

The worker turns sampled tokens into these events; `server_openai` and `server_anthropic`
turn them into wire chunks. Tool-call arguments are streamed as JSON text fragments whose
concatenation is exactly the final `arguments` string, so a streaming client and a
non-streaming client see the same call.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field


@dataclass
class Accepted:
    """The prompt is tokenized and fits; prefill starts now."""

    prompt_tokens: int
    cached_tokens: int


@dataclass
class ReasoningDelta:
    text: str


@dataclass
class TextDelta:
    text: str


@dataclass
class ToolStart:
    index: int
    call_id: str
    name: str


@dataclass
class ToolArgs:
    index: int
    text: str  # a fragment of the JSON arguments string


@dataclass
class ToolEnd:
    index: int


@dataclass
class Usage:
    prompt_tokens: int = 0
    cached_tokens: int = 0
    completion_tokens: int = 0


@dataclass
class Done:
    finish_reason: str  # "stop" | "length" | "tool_calls" | "cancelled"
    usage: Usage = field(default_factory=Usage)
    stop_sequence: str | None = None


@dataclass
class Failed:
    status: int
    message: str
    param: str | None = None


Event = Accepted | ReasoningDelta | TextDelta | ToolStart | ToolArgs | ToolEnd | Done | Failed


class ArgsJson:
    """Builds `{"k": v, ...}` incrementally from DSML parameter events.

    Matches the official parser's rebuild: `string="true"` values are JSON-encoded
    (`ensure_ascii=False`), `string="false"` values are copied verbatim, separators are
    `", "` and `": "`.
    """

    def __init__(self) -> None:
        self.n_params = 0
        self.names: set[str] = set()
        self._is_string = False
        self.text = ""

    def start_param(self, name: str, is_string: bool) -> str:
        out = ("{" if self.n_params == 0 else ", ") + json.dumps(name, ensure_ascii=False) + ": "
        if is_string:
            out += '"'
        self.n_params += 1
        self.names.add(name)
        self._is_string = is_string
        self.text += out
        return out

    def value(self, raw: str) -> str:
        out = json.dumps(raw, ensure_ascii=False)[1:-1] if self._is_string else raw
        self.text += out
        return out

    def end_param(self) -> str:
        out = '"' if self._is_string else ""
        self.text += out
        return out

    def finish(self) -> str:
        out = "{}" if self.n_params == 0 else "}"
        self.text += out
        return out


class StopMatcher:
    """Finds client stop strings in streamed visible text without leaking a partial match.

    `push` returns the text that is safe to emit now; up to len(longest stop) - 1 characters
    are held back until they can no longer start a stop string.
    """

    def __init__(self, stops: list[str]) -> None:
        self.stops = [s for s in stops if s]
        self.hold = max((len(s) for s in self.stops), default=1) - 1
        self.buf = ""
        self.matched: str | None = None

    def push(self, text: str) -> str:
        if not self.stops:
            return text
        self.buf += text
        best = None
        for s in self.stops:
            at = self.buf.find(s)
            if at >= 0 and (best is None or at < best[0]):
                best = (at, s)
        if best is not None:
            self.matched = best[1]
            out, self.buf = self.buf[: best[0]], ""
            return out
        if len(self.buf) <= self.hold:
            return ""
        cut = len(self.buf) - self.hold
        out, self.buf = self.buf[:cut], self.buf[cut:]
        return out

    def flush(self) -> str:
        out, self.buf = self.buf, ""
        return out
