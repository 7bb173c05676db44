"""One assistant round as it streams, read by the project's DSML parser (`prompts.dsml`).

`DsmlParser` decides the phases (reasoning, answer text, tool-call block), the calls and the
errors. This module adds only what the agent loop needs on top of its events: call ids and a
repeat key, whether sampling is inside DSML structure (sampled greedily there), the block's
text as written (for the UI), and the rest of a round the parser stopped reading because of an
irregularity that is not a tool-call error (a stray special token): the loop decodes on to EOS
as before, and that text is still shown and kept (reasoning until `</think>`, then answer).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Literal

from ds4_agent.prompts import dsml

Kind = Literal["reasoning", "text", "dsml"]

# Parse errors that mean "the model tried to call a tool and got it wrong": the round is
# answered with the error as a tool result so the model can retry. Other irregularities
# (no EOS, no </think>, a stray special token) leave a plain answer as it is.
DSML_ERROR_KINDS = frozenset(
    {
        "dsml_syntax",
        "duplicate_parameter",
        "invalid_json",
        "content_after_tool_calls",
        "interrupted_tool_call",
        "tool_call_in_thinking",
    }
)


@dataclass
class ToolCall:
    id: str
    name: str
    arguments: dict[str, Any]

    def key(self) -> str:
        return self.name + "\0" + json.dumps(self.arguments, sort_keys=True, ensure_ascii=False)


class Round:
    """Fed every sampled token (`feed_token`); `finish()` once sampling stopped."""

    def __init__(self, thinking: bool, tokenizer: Any, think_end_id: int) -> None:
        self._parser = dsml.DsmlParser("thinking" if thinking else "chat", tokenizer)
        # A second decoder of the same tokens: the text as written, for the block shown while
        # it streams and for the rest of a round after the parser stopped reading.
        self._decoder = tokenizer.stream_decoder()
        self._eos_id = tokenizer.eos_id
        self._think_end_id = think_end_id
        self.in_think = thinking
        self.reasoning = ""
        self.text = ""
        self.dsml = ""  # the tool-call block as written so far
        self._after_think = ""  # everything written after the reasoning, as written
        self.ended = False  # the block closed, or a tool-call error: stop sampling here
        self.turn: dsml.ParsedTurn | None = None
        self._in_block = False
        self._in_string = False  # inside a string="true" parameter value
        self._call_name = ""
        self._stopped = False  # the parser stopped at an irregularity that is not a DSML error

    @property
    def answer(self) -> str:
        return self.text.strip()

    @property
    def call_name(self) -> str:
        """Name of the tool being generated right now (for drawing calls as they stream)."""
        return self._call_name

    def in_dsml_structure(self) -> bool:
        """True while the model writes DSML structure rather than a string parameter value."""
        return self._in_block and not self._in_string

    def feed_token(self, tok: int) -> list[tuple[Kind, str]]:
        """Consume one sampled token; return what became visible, as (kind, text) pieces."""
        events = self._parser.feed_token(tok)
        raw = ""
        if tok != self._eos_id and not (tok == self._think_end_id and self.in_think):
            raw = self._decoder.feed(tok)
            if not self.in_think:
                self._after_think += raw
        if self._stopped:
            return self._unparsed(tok, raw)
        out: list[tuple[Kind, str]] = []
        for ev in events:
            if isinstance(ev, dsml.ReasoningDelta):
                self.reasoning += ev.text
                out.append(("reasoning", ev.text))
            elif isinstance(ev, dsml.ReasoningEnd):
                self.in_think = False
            elif isinstance(ev, dsml.TextDelta):
                self.text += ev.text
                out.append(("text", ev.text))
            elif isinstance(ev, dsml.ToolBlockStart):
                self._in_block = True
            elif isinstance(ev, dsml.ToolCallStart):
                self._call_name = ev.name
            elif isinstance(ev, dsml.ParamStart):
                self._in_string = ev.is_string
            elif isinstance(ev, dsml.ParamEnd):
                self._in_string = False
            elif isinstance(ev, dsml.ToolBlockEnd):
                self._in_block = False
                self.ended = True
            elif isinstance(ev, dsml.Error):
                self._in_block = self._in_string = False
                if ev.error.kind in DSML_ERROR_KINDS:
                    self.ended = True
                else:
                    self._stopped = True
        if self._in_block or self.ended:
            # The parser drops the whitespace between the answer and the block.
            self.dsml = self._after_think[len(self.text) :].lstrip()
            if raw:
                out.append(("dsml", raw))
        return out

    def _unparsed(self, tok: int, raw: str) -> list[tuple[Kind, str]]:
        if tok == self._think_end_id and self.in_think:
            self.in_think = False
            return []
        if not raw:
            return []
        if self.in_think:
            self.reasoning += raw
            return [("reasoning", raw)]
        self.text += raw
        return [("text", raw)]

    def finish(self) -> list[tuple[Kind, str]]:
        """Sampling stopped: close the parse; return text that was still held back."""
        out: list[tuple[Kind, str]] = []
        tail = self._decoder.flush()
        for ev in self._parser.finish():
            if isinstance(ev, dsml.ReasoningDelta):
                self.reasoning += ev.text
                out.append(("reasoning", ev.text))
            elif isinstance(ev, dsml.TextDelta):
                self.text += ev.text
                out.append(("text", ev.text))
        if self._stopped:
            out += self._unparsed(-1, tail)
        self.turn = self._parser.result()
        return out

    def calls(self, round_no: int) -> list[ToolCall]:
        assert self.turn is not None
        return [
            ToolCall(id=f"call_{round_no}_{i}", name=c.name, arguments=dict(c.params))
            for i, c in enumerate(self.turn.tool_calls)
        ]
