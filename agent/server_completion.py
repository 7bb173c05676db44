"""Split a streamed completion into reasoning, visible text and tool calls.

Fed decoded text piece by piece, it emits `ReasoningDelta`, `TextDelta`, `ToolStart`,
`ToolArgs` (JSON argument fragments) and `ToolEnd` as soon as they are certain, holding back
only text that could still turn into `</think>` or the start of a tool-calls block. The
grammar is the official one (engine-spec §5.3), with the tolerances seen in practice: a
missing leading bar (`<DSML｜`), doubled bars, whitespace before `>` in closing tags. A block
that breaks the grammar ends the calls (`error` says why); nothing here raises.
"""

from __future__ import annotations

import re
from collections.abc import Callable

from ds4_agent.agent.server_events import (
    ArgsJson,
    Event,
    ReasoningDelta,
    TextDelta,
    ToolArgs,
    ToolEnd,
    ToolStart,
)

THINK_END = "</think>"
_BAR = r"(?:｜|\|){1,2}"
_D = rf"{_BAR}DSML{_BAR}"
_OPEN_RE = re.compile(rf"<(?:｜|\|){{0,2}}DSML{_BAR}tool_calls\s*>")
_OPEN_PREFIXES = ("<｜DSML｜tool_calls>", "<DSML｜tool_calls>", "<｜｜DSML｜｜tool_calls>")
_INVOKE_RE = re.compile(rf'\s*<{_D}invoke\s+name="([^"]*)"\s*>')
_PARAM_RE = re.compile(rf'\s*<{_D}parameter\s+name="([^"]*)"\s+string="(true|false)"\s*>')
_PARAM_END_RE = re.compile(rf"</{_D}parameter\s*>")
_INVOKE_END_RE = re.compile(rf"\s*</{_D}invoke\s*>")
_CALLS_END_RE = re.compile(rf"\s*</{_D}tool_calls\s*>")
_MAX_TAG = 160  # longest tag we wait for before declaring the block malformed


def _partial_suffix(text: str, needles: tuple[str, ...]) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of one of `needles`."""
    best = 0
    for n in needles:
        for k in range(min(len(n) - 1, len(text)), best, -1):
            if text.endswith(n[:k]):
                best = k
                break
    return best


class CompletionParser:
    def __init__(self, thinking_mode: str, new_call_id: Callable[[], str]) -> None:
        self.mode = "reasoning" if thinking_mode == "thinking" else "text"
        self.new_call_id = new_call_id
        self.buf = ""
        self.calls: list[str] = []
        self.calls_done = False
        self.error: str | None = None
        self._args: ArgsJson | None = None
        self._in_param = False

    @property
    def in_structure(self) -> bool:
        """Inside the tool-call block but not inside a parameter value."""
        return self.mode == "calls" and not self._in_param

    def feed(self, text: str) -> list[Event]:
        self.buf += text
        out: list[Event] = []
        while True:
            before = (self.mode, len(self.buf))
            if self.mode == "reasoning":
                self._reasoning(out)
            elif self.mode == "text":
                self._text(out)
            elif self.mode == "calls":
                self._calls(out)
            else:  # "done" / "error": the rest is not part of the answer
                self.buf = ""
            if (self.mode, len(self.buf)) == before:
                return out

    def finish(self) -> list[Event]:
        """End of generation: release held-back text; an unfinished call block is an error."""
        out: list[Event] = []
        if self.mode == "reasoning" and self.buf:
            out.append(ReasoningDelta(self.buf))
        elif self.mode == "text" and self.buf:
            out.append(TextDelta(self.buf))
        elif self.mode == "calls":
            self.error = "the tool-call block ended before </｜DSML｜tool_calls>"
            self.mode = "error"
        self.buf = ""
        return out

    # -- states ---------------------------------------------------------------------------

    def _reasoning(self, out: list[Event]) -> None:
        at = self.buf.find(THINK_END)
        if at >= 0:
            if at:
                out.append(ReasoningDelta(self.buf[:at]))
            self.buf = self.buf[at + len(THINK_END) :]
            self.mode = "text"
            return
        keep = _partial_suffix(self.buf, (THINK_END,))
        emit = self.buf[: len(self.buf) - keep]
        if emit:
            out.append(ReasoningDelta(emit))
            self.buf = self.buf[len(emit) :]

    def _text(self, out: list[Event]) -> None:
        m = _OPEN_RE.search(self.buf)
        if m:
            content = self.buf[: m.start()]
            # The official parser ends content at "\n\n<｜DSML｜tool_calls"; the separator
            # whitespace is part of the call block, not of the answer.
            stripped = content.rstrip(" \t\r\n")
            if stripped:
                out.append(TextDelta(stripped))
            self.buf = self.buf[m.end() :]
            self.mode = "calls"
            return
        # Hold back a trailing run of whitespace plus a possible partial opening marker.
        keep = _partial_suffix(self.buf, _OPEN_PREFIXES)
        head = self.buf[: len(self.buf) - keep]
        ws = len(head) - len(head.rstrip(" \t\r\n"))
        emit = head[: len(head) - ws]
        if emit:
            out.append(TextDelta(emit))
            self.buf = self.buf[len(emit) :]

    def _calls(self, out: list[Event]) -> None:
        if self._in_param:
            m = _PARAM_END_RE.search(self.buf)
            if m:
                if m.start():
                    out.append(
                        ToolArgs(len(self.calls) - 1, self._args.value(self.buf[: m.start()]))
                    )
                out.append(ToolArgs(len(self.calls) - 1, self._args.end_param()))
                self.buf = self.buf[m.end() :]
                self._in_param = False
                return
            # Hold back from the last "<" while it could still become the closing tag.
            lt = self.buf.rfind("<")
            keep = 0
            if lt >= 0 and ">" not in self.buf[lt:] and len(self.buf) - lt < _MAX_TAG:
                keep = len(self.buf) - lt
            emit = self.buf[: len(self.buf) - keep]
            if emit:
                out.append(ToolArgs(len(self.calls) - 1, self._args.value(emit)))
                self.buf = self.buf[len(emit) :]
            return
        if self._args is None:
            if m := _INVOKE_RE.match(self.buf):
                cid = self.new_call_id()
                self.calls.append(cid)
                self._args = ArgsJson()
                out.append(ToolStart(len(self.calls) - 1, cid, m.group(1)))
                self.buf = self.buf[m.end() :]
            elif m := _CALLS_END_RE.match(self.buf):
                self.buf = self.buf[m.end() :]
                self.mode = "done"
                self.calls_done = bool(self.calls)
                if not self.calls:
                    self.error = "the tool-call block holds no invoke"
            else:
                self._check_stuck("an invoke")
            return
        if m := _PARAM_RE.match(self.buf):
            if m.group(1) in self._args.names:
                self.error = f"duplicate parameter name {m.group(1)!r}"
                self.mode = "error"
                self.buf = ""
                return
            out.append(
                ToolArgs(
                    len(self.calls) - 1, self._args.start_param(m.group(1), m.group(2) == "true")
                )
            )
            self.buf = self.buf[m.end() :]
            self._in_param = True
        elif m := _INVOKE_END_RE.match(self.buf):
            idx = len(self.calls) - 1
            out.append(ToolArgs(idx, self._args.finish()))
            out.append(ToolEnd(idx))
            self._args = None
            self.buf = self.buf[m.end() :]
        else:
            self._check_stuck("a parameter")

    def _check_stuck(self, expected: str) -> None:
        s = self.buf.lstrip()
        if not s:
            return
        if not s.startswith("<") or len(s) > _MAX_TAG:
            self.error = f"malformed tool-call block: expected {expected}, got {s[:40]!r}"
            self.mode = "error"
            self.buf = ""
