"""Splits one assistant round, as it streams, into reasoning, answer text and a DSML block.

Fed token by token (the `</think>` token by id, everything else as decoded text). It tells
the loop when the tool-call block is complete, so decoding stops right there (the agent then
appends EOS itself, as the official format has it), and it hands the UI what to draw while
the block is still being generated (the tool name and the parameters so far).

The block itself is parsed into calls by `parse_calls`, strictly by the official grammar
but tolerant of whitespace; a malformed block becomes an error message that goes back to the
model as a tool result, so it can retry.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any, Literal

from ds4_agent.agent.render import CALLS_CLOSE, CALLS_OPEN, DSML

Kind = Literal["reasoning", "text", "dsml"]


@dataclass
class ToolCall:
    id: str
    name: str
    arguments: dict[str, Any]

    def key(self) -> str:
        return self.name + "\0" + json.dumps(self.arguments, sort_keys=True, ensure_ascii=False)


@dataclass
class RoundParser:
    thinking: bool
    phase: Literal["think", "text", "dsml", "done"] = "text"
    reasoning: str = ""
    text: str = ""
    dsml: str = ""
    dsml_in_thinking: bool = False  # the model tried a tool call inside <think>
    _hold: str = ""  # text held back: it may be the start of the DSML marker
    events: list[tuple[Kind, str]] = field(default_factory=list)
    turn: Any = None  # prompts.dsml.ParsedTurn of the round, when that parser ran alongside

    def __post_init__(self) -> None:
        if self.thinking:
            self.phase = "think"

    @property
    def in_think(self) -> bool:
        return self.phase == "think"

    @property
    def done(self) -> bool:
        return self.phase == "done"

    def end_think(self) -> None:
        if self.phase == "think":
            self.phase = "text"

    def feed(self, delta: str) -> list[tuple[Kind, str]]:
        """Consume decoded text; return what became visible, as (kind, text) pieces."""
        out: list[tuple[Kind, str]] = []
        if not delta or self.phase == "done":
            return out
        if self.phase == "think":
            self.reasoning += delta
            if DSML in self.reasoning or "|DSML|" in self.reasoning:
                self.dsml_in_thinking = True
            out.append(("reasoning", delta))
            return out
        if self.phase == "text":
            buf = self._hold + delta
            self._hold = ""
            i = buf.find(CALLS_OPEN)
            if i < 0:
                keep = _partial_suffix(buf, CALLS_OPEN)
                visible, self._hold = buf[: len(buf) - keep], buf[len(buf) - keep :]
                if visible:
                    self.text += visible
                    out.append(("text", visible))
                return out
            if buf[:i]:
                self.text += buf[:i]
                out.append(("text", buf[:i]))
            self.phase = "dsml"
            delta = buf[i:]
        # dsml phase
        self.dsml += delta
        out.append(("dsml", delta))
        if CALLS_CLOSE in self.dsml:
            self.phase = "done"
        return out

    def flush(self) -> list[tuple[Kind, str]]:
        """End of the round: release held-back text."""
        if self._hold and self.phase == "text":
            self.text += self._hold
            held, self._hold = self._hold, ""
            return [("text", held)]
        return []

    @property
    def answer(self) -> str:
        return self.text.strip()

    def in_dsml_structure(self) -> bool:
        """True while the model writes DSML structure rather than a string parameter value."""
        if self.phase != "dsml":
            return False
        open_at = self.dsml.rfind(f"<{DSML}parameter ")
        if open_at < 0 or self.dsml.find(f"</{DSML}parameter", open_at) >= 0:
            return True  # between elements
        header_end = self.dsml.find(">", open_at)
        if header_end < 0:
            return True  # still writing the parameter's header
        return 'string="true"' not in self.dsml[open_at:header_end]

    def current_invoke(self) -> str | None:
        """Name of the tool being generated right now (for drawing calls as they stream)."""
        names = re.findall(rf'<{DSML}invoke name="([^"]*)"', self.dsml)
        return names[-1] if names else None


def _partial_suffix(s: str, marker: str) -> int:
    """Length of the longest suffix of s that is a proper prefix of marker."""
    for n in range(min(len(s), len(marker) - 1), 0, -1):
        if marker.startswith(s[-n:]):
            return n
    return 0


_INVOKE = re.compile(rf'<{DSML}invoke\s+name="([^"]*)"\s*>(.*?)</{DSML}invoke\s*>', re.S)
_PARAM = re.compile(
    rf'<{DSML}parameter\s+name="([^"]*)"\s+string="(true|false)"\s*>(.*?)</{DSML}parameter\s*>',
    re.S,
)


class DsmlError(ValueError):
    pass


def parse_calls(block: str, round_no: int = 0) -> list[ToolCall]:
    """Parse a complete `<｜DSML｜tool_calls>…</｜DSML｜tool_calls>` block.

    Raises DsmlError with a message written for the model (what is wrong, what to send).
    """
    start = block.find(CALLS_OPEN)
    end = block.find(CALLS_CLOSE)
    if start < 0:
        raise DsmlError("invalid tool call: missing <｜DSML｜tool_calls> opening tag")
    if end < 0:
        raise DsmlError("invalid tool call: the block ended without </｜DSML｜tool_calls>")
    inner = block[start + len(CALLS_OPEN) : end]
    calls: list[ToolCall] = []
    pos = 0
    for m in _INVOKE.finditer(inner):
        if inner[pos : m.start()].strip():
            raise DsmlError(
                f"invalid tool call: unexpected text {inner[pos : m.start()].strip()[:60]!r} "
                "between invoke elements"
            )
        pos = m.end()
        name, body = m.group(1), m.group(2)
        if not name:
            raise DsmlError("invalid tool call: invoke without a tool name")
        args: dict[str, Any] = {}
        ppos = 0
        for p in _PARAM.finditer(body):
            if body[ppos : p.start()].strip():
                raise DsmlError(
                    f"invalid tool call to {name}: unexpected text "
                    f"{body[ppos : p.start()].strip()[:60]!r}; each argument must be a "
                    f'<｜DSML｜parameter name="…" string="true|false"> element'
                )
            ppos = p.end()
            key, is_str, raw = p.group(1), p.group(2) == "true", p.group(3)
            if key in args:
                raise DsmlError(f"invalid tool call to {name}: parameter '{key}' given twice")
            if is_str:
                args[key] = raw
            else:
                try:
                    args[key] = json.loads(raw)
                except json.JSONDecodeError:
                    raise DsmlError(
                        f"invalid tool call to {name}: parameter '{key}' has string=\"false\" "
                        f'but {raw[:60]!r} is not JSON; use string="true" for text'
                    ) from None
        if body[ppos:].strip():
            raise DsmlError(
                f"invalid tool call to {name}: unexpected text {body[ppos:].strip()[:60]!r}"
            )
        calls.append(ToolCall(id=f"call_{round_no}_{len(calls)}", name=name, arguments=args))
    if inner[pos:].strip():
        raise DsmlError(
            f"invalid tool call: unexpected text {inner[pos:].strip()[:60]!r} "
            '(expected <｜DSML｜invoke name="…"> elements)'
        )
    if not calls:
        raise DsmlError("invalid tool call: the block holds no <｜DSML｜invoke> element")
    return calls
