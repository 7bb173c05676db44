"""Streaming parser for DeepSeek V4 completions: reasoning, answer text and DSML tool calls.

Fed token by token (`feed_token`) or text delta by delta (`feed`), `DsmlParser` emits events as
soon as they are certain, so a UI can show a tool call while the model writes it; `finish()` (or
EOS) ends the turn and returns a `ParsedTurn`. It never raises: malformed output becomes a
`ParseError` whose `feedback()` text is meant to be sent back to the model so it can retry.

Grammar (docs/engine-spec.md §5.3), after `</think>` in thinking mode:

    content ["\\n\\n"] <｜DSML｜tool_calls>
      <｜DSML｜invoke name="N">
        <｜DSML｜parameter name="K" string="true|false">VALUE</｜DSML｜parameter> …
      </｜DSML｜invoke> …
    </｜DSML｜tool_calls> EOS

Tolerated beyond the official parser (variants seen from the model in practice): the DSML marker
without its leading bar (`<DSML｜invoke`) or with doubled bars (`<｜｜DSML｜｜invoke`), any
whitespace between tags (the official parser wants exactly one newline), whitespace or a stray
`｜` before `>` in closing tags, whitespace around attributes, typographic quotes around attribute
values, whitespace between the tool-call block and EOS, and a missing EOS after a closed block
(the official parser accepts that too). Values are raw: a string value is everything up to the
closing tag, unescaped (so a value cannot contain `</｜DSML｜parameter>`).

Everything else malformed is an error, and an error turn has no executable tool call: a
duplicate parameter, a `string="false"` value that is not JSON, an unknown tag, text after the
block, output cut off (no EOS, missing `</think>`), or a special token (`<think>`, `</think>`,
BOS, a stray DSML marker) inside the answer or `<think>` inside the reasoning.

Tool calls inside `<think>`: the reasoning is streamed as text; complete DSML blocks found in it
are reported as `ignored_calls` and never executed. A valid block after `</think>` still runs
(the ds4 agent dropped it whenever the reasoning merely mentioned DSML); if the reasoning held
the only call, the turn becomes an error telling the model to call tools after `</think>`.

`parse_completion(text, thinking_mode)` is the one-shot form; on the golden parse fixtures it
gives exactly the official `parse_message_from_completion_text` result, and it rejects the
official error cases.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import regex
from ds4_agent.prompts.protocol import protocol

if TYPE_CHECKING:
    from ds4_agent.engine.tokenizer import StreamDecoder, Tokenizer

_P = protocol()
EOS = _P.eos
_MARK = r"｜{0,2}DSML｜{1,2}"  # canonical ｜DSML｜; tolerated: no leading bar, doubled bars
_Q = r"[\"“”]"
_NAME = r"(?P<name>[^\"“”\n]*)"


def _close(tag: str) -> regex.Pattern[str]:
    return regex.compile(rf"</{_MARK}{tag}\s*｜?\s*>")


_OPEN_BLOCK = regex.compile(rf"<{_MARK}tool_calls\s*>")
_CLOSE_BLOCK = _close("tool_calls")
_OPEN_INVOKE = regex.compile(rf"<{_MARK}invoke\s+name\s*=\s*{_Q}{_NAME}{_Q}\s*>")
_CLOSE_INVOKE = _close("invoke")
_OPEN_PARAM = regex.compile(
    rf"<{_MARK}parameter\s+name\s*=\s*{_Q}{_NAME}{_Q}\s+string\s*=\s*{_Q}(?P<string>true|false){_Q}\s*>"
)
_CLOSE_PARAM = _close("parameter")
_EOS_RX = regex.escape(EOS)
_EOS = regex.compile(_EOS_RX)
_BAD_SPECIALS = "|".join(regex.escape(s) for s in (_P.bos, _P.think_start, _P.think_end))
# Where reasoning stops: </think>, EOS, or a special token that must not appear in reasoning.
_THINK_STOP = regex.compile(
    rf"(?P<end>{regex.escape(_P.think_end)})|(?P<eos>{_EOS_RX})"
    rf"|(?P<bad>{regex.escape(_P.bos)}|{regex.escape(_P.think_start)})"
)
# Where answer text stops: a DSML marker, EOS, or a special token that must not appear in it.
_CONTENT_STOP = regex.compile(
    rf"(?P<dsml><｜*DSML|｜DSML)|(?P<eos>{_EOS_RX})|(?P<bad>{_BAD_SPECIALS})"
)
_PARAM_STOP = regex.compile(rf"(?P<close>{_CLOSE_PARAM.pattern})|(?P<eos>{_EOS_RX})")
_WS = regex.compile(r"\s*")
_MAX_TAG = 512  # an opening tag longer than this is malformed (names are short)

HINT = (
    "Write tool calls after </think> exactly as: <｜DSML｜tool_calls> then one "
    '<｜DSML｜invoke name="TOOL"> per call, each holding '
    '<｜DSML｜parameter name="NAME" string="true|false">VALUE</｜DSML｜parameter> lines, '
    "closed by </｜DSML｜invoke> and </｜DSML｜tool_calls>."
)


# ---------------------------------------------------------------------------- results
@dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: str  # JSON object text, built exactly like the official parser does
    params: dict[str, Any]  # decoded values: str for string="true", the JSON value otherwise

    def to_openai(self) -> dict[str, Any]:
        return {"type": "function", "function": {"name": self.name, "arguments": self.arguments}}


ErrorKind = Literal[
    "missing_eos",
    "missing_think_end",
    "unexpected_special",
    "dsml_syntax",
    "duplicate_parameter",
    "invalid_json",
    "content_after_tool_calls",
    "interrupted_tool_call",
    "tool_call_in_thinking",
    "internal",
]


@dataclass(frozen=True)
class ParseError:
    kind: ErrorKind
    message: str

    def feedback(self) -> str:
        """The text to give the model as the result of its malformed turn."""
        if self.kind in ("missing_eos", "missing_think_end", "unexpected_special", "internal"):
            return f"invalid output: {self.message}"
        return f"invalid DSML tool call: {self.message}. {HINT}"


@dataclass
class ParsedTurn:
    content: str
    reasoning_content: str
    tool_calls: list[ToolCall]  # executable calls; always empty when `error` is set
    error: ParseError | None = None
    ignored_calls: list[ToolCall] = field(default_factory=list)  # written inside <think>
    ended_with_eos: bool = False

    @property
    def ok(self) -> bool:
        return self.error is None

    def to_message(self) -> dict[str, Any]:
        """The official parser's message shape."""
        return {
            "role": "assistant",
            "content": self.content,
            "reasoning_content": self.reasoning_content,
            "tool_calls": [c.to_openai() for c in self.tool_calls],
        }


# ---------------------------------------------------------------------------- events
@dataclass(frozen=True)
class ReasoningDelta:
    text: str


@dataclass(frozen=True)
class ReasoningEnd:
    pass


@dataclass(frozen=True)
class TextDelta:
    text: str


@dataclass(frozen=True)
class ToolBlockStart:
    pass


@dataclass(frozen=True)
class ToolCallStart:
    index: int
    name: str


@dataclass(frozen=True)
class ParamStart:
    call_index: int
    name: str
    is_string: bool


@dataclass(frozen=True)
class ParamDelta:
    call_index: int
    name: str
    text: str


@dataclass(frozen=True)
class ParamEnd:
    call_index: int
    name: str
    value: Any


@dataclass(frozen=True)
class ToolCallEnd:
    index: int
    call: ToolCall


@dataclass(frozen=True)
class ToolBlockEnd:
    """`</｜DSML｜tool_calls>` was read: generation can stop here (EOS is appended)."""

    calls: tuple[ToolCall, ...]


@dataclass(frozen=True)
class Error:
    """The turn is malformed; nothing after it is parsed, so generation can stop here."""

    error: ParseError


@dataclass(frozen=True)
class TurnEnd:
    turn: ParsedTurn


Event = (
    ReasoningDelta
    | ReasoningEnd
    | TextDelta
    | ToolBlockStart
    | ToolCallStart
    | ParamStart
    | ParamDelta
    | ParamEnd
    | ToolCallEnd
    | ToolBlockEnd
    | Error
    | TurnEnd
)

_State = Literal["think", "content", "block", "invoke", "param", "after", "done", "error"]


def _build_arguments(params: list[tuple[str, str, bool]]) -> str:
    """Official rule: `{"K": json(V)}` for string values, `{"K": V}` (V verbatim) otherwise."""
    items = [
        f"{json.dumps(k, ensure_ascii=False)}: {json.dumps(v, ensure_ascii=False) if s else v}"
        for k, v, s in params
    ]
    return "{" + ", ".join(items) + "}"


def _held_newlines(text: str) -> int:
    """How many trailing characters of answer text belong to the separator before a block:
    the official "\n\n", or a lone newline (at most two characters, so holding them back while
    streaming stays cheap however long a whitespace run the model writes)."""
    if text.endswith(("\n\n", "\r\n")):
        return 2
    return 1 if text.endswith("\n") else 0


def _snippet(text: str, n: int = 40) -> str:
    return json.dumps(text[:n] + ("…" if len(text) > n else ""), ensure_ascii=False)


class DsmlParser:
    """Incremental parser of one assistant turn (see the module docstring)."""

    def __init__(self, thinking_mode: str = "thinking", tokenizer: Tokenizer | None = None) -> None:
        self.thinking_mode = thinking_mode
        self._state: _State = "think" if thinking_mode == "thinking" else "content"
        self._buf = ""
        self._reasoning: list[str] = []
        self._content: list[str] = []
        self._calls: list[ToolCall] = []
        self._call_name = ""
        self._params: list[tuple[str, str, bool]] = []
        self._param_name = ""
        self._param_is_str = True
        self._value: list[str] = []
        self._events: list[Event] = []
        self._error: ParseError | None = None
        self._eos = False
        self._turn: ParsedTurn | None = None
        self._tokenizer = tokenizer
        self._decoder: StreamDecoder | None = tokenizer.stream_decoder() if tokenizer else None

    # ------------------------------------------------------------------ public API
    @property
    def finished(self) -> bool:
        return self._turn is not None

    @property
    def calls(self) -> list[ToolCall]:
        """Tool calls completed so far (not yet known to be valid as a whole)."""
        return list(self._calls)

    def feed(self, text: str) -> list[Event]:
        """Consume a text delta; returns the events it completed."""
        if self._turn is None and text:
            self._guard(lambda: self._feed_text(text))
        return self._take()

    def feed_token(self, token_id: int) -> list[Event]:
        """Consume one sampled token id (needs the tokenizer); EOS ends the turn."""
        if self._turn is not None:
            return []
        if self._tokenizer is None or self._decoder is None:
            self._fail("internal", "feed_token needs a tokenizer")
            return self._take()
        if token_id == self._tokenizer.eos_id:
            return self._finish_with(self._decoder.flush() + EOS)
        try:
            text = self._decoder.feed(token_id)
        except IndexError as e:
            self._fail("internal", str(e))
            return self._take()
        return self.feed(text)

    def finish(self) -> list[Event]:
        """End of generation (EOS, token limit, interrupt): flush and close the turn."""
        if self._turn is None:
            tail = self._decoder.flush() if self._decoder is not None else ""
            return self._finish_with(tail)
        return self._take()

    def result(self) -> ParsedTurn:
        """The parsed turn; calls `finish()` if needed."""
        if self._turn is None:
            self.finish()
        assert self._turn is not None
        return self._turn

    # ------------------------------------------------------------------ internals
    def _finish_with(self, tail: str) -> list[Event]:
        if tail:
            self._guard(lambda: self._feed_text(tail))
        if self._turn is None:
            self._guard(self._close)
        return self._take()

    def _guard(self, fn: Any) -> None:
        try:
            fn()
        except Exception as e:  # never raise into the agent loop
            self._fail("internal", f"parser error {type(e).__name__}: {e}")
            if self._turn is None:
                try:
                    self._end()
                except Exception:
                    self._turn = ParsedTurn(
                        "".join(self._content), "".join(self._reasoning), [], self._error
                    )
                    self._emit(TurnEnd(self._turn))

    def _take(self) -> list[Event]:
        out, self._events = self._events, []
        return out

    def _emit(self, ev: Event) -> None:
        self._events.append(ev)

    def _fail(self, kind: ErrorKind, message: str) -> None:
        if self._error is None:
            self._error = ParseError(kind, message)
            self._emit(Error(self._error))
        if self._state != "done":
            self._state = "error"

    def _reason(self, text: str) -> None:
        if text:
            self._reasoning.append(text)
            self._emit(ReasoningDelta(text))

    def _say(self, text: str) -> None:
        if text:
            self._content.append(text)
            self._emit(TextDelta(text))

    def _feed_text(self, text: str) -> None:
        self._buf += text
        while self._step():
            pass

    def _step(self) -> bool:
        """Advance as far as the buffer allows; True when something was consumed."""
        buf = self._buf
        st = self._state
        if not buf or st in ("done", "error"):
            if st == "error":
                self._buf = ""
            return False

        if st == "think":
            m = _THINK_STOP.search(buf, partial=True)
            if m is None:
                self._reason(buf)
                self._buf = ""
                return False
            self._reason(buf[: m.start()])
            self._buf = buf[m.start() :]
            if m.partial:
                return False
            self._buf = buf[m.end() :]
            if m.group("end"):
                self._state = "content"
                self._emit(ReasoningEnd())
            elif m.group("eos"):
                self._eos = True
                self._fail("missing_think_end", "the turn ended (EOS) before </think>")
                self._end()
            else:
                self._fail("unexpected_special", f"unexpected {m.group()} inside the reasoning")
            return True

        if st == "content":
            m = _CONTENT_STOP.search(buf, partial=True)
            cut = m.start() if m is not None else len(buf)
            text = buf[:cut]
            if m is None or m.partial:
                # Hold back up to two trailing newlines: they are dropped if a block follows.
                keep = _held_newlines(text)
                self._say(text[: len(text) - keep])
                self._buf = buf[len(text) - keep :]
                return False
            if m.group("eos"):
                self._say(text)
                self._buf = buf[m.end() :]
                self._eos = True
                self._end()
                return True
            if m.group("bad"):
                self._say(text)
                self._fail("unexpected_special", f"unexpected {m.group()} in the answer")
                return True
            o = _OPEN_BLOCK.match(buf, cut, partial=True)
            if o is not None and o.partial and len(buf) - cut <= _MAX_TAG:
                keep = _held_newlines(text)
                self._say(text[: len(text) - keep])
                self._buf = buf[len(text) - keep :]
                return False
            if o is None or o.partial:
                self._say(text)
                self._fail(
                    "dsml_syntax",
                    f"expected <｜DSML｜tool_calls> but found {_snippet(buf[cut:])}",
                )
                return True
            # Official form: content + "\n\n" + block; a single newline is dropped as well.
            self._say(text[: len(text) - _held_newlines(text)])
            self._buf = buf[o.end() :]
            self._state = "block"
            self._emit(ToolBlockStart())
            return True

        if st in ("block", "invoke", "after"):
            pos = _WS.match(buf).end()
            if pos:  # whitespace between tags carries nothing; drop it now
                buf = self._buf = buf[pos:]
                pos = 0
            if not buf:
                return False
            if st == "block":
                alts = (("invoke", _OPEN_INVOKE), ("end", _CLOSE_BLOCK), ("eos", _EOS))
                expected = '<｜DSML｜invoke name="…"> or </｜DSML｜tool_calls>'
            elif st == "invoke":
                alts = (("param", _OPEN_PARAM), ("end", _CLOSE_INVOKE), ("eos", _EOS))
                expected = '<｜DSML｜parameter name="…" string="true|false"> or </｜DSML｜invoke>'
            else:
                alts = (("eos", _EOS),)
                expected = "nothing after </｜DSML｜tool_calls>"
            waiting = False
            for what, rx in alts:
                m = rx.match(buf, pos, partial=True)
                if m is None:
                    continue
                if m.partial:
                    waiting = waiting or len(buf) - pos <= _MAX_TAG
                    continue
                self._buf = buf[m.end() :]
                self._on_tag(what, m)
                return True
            if waiting:
                self._buf = buf[pos:]
                return False
            if st == "after":
                self._fail(
                    "content_after_tool_calls",
                    f"unexpected text {_snippet(buf[pos:])} after </｜DSML｜tool_calls>",
                )
            else:
                self._fail("dsml_syntax", f"expected {expected} but found {_snippet(buf[pos:])}")
            return True

        if st == "param":
            m = _PARAM_STOP.search(buf, partial=True)
            cut = m.start() if m is not None else len(buf)
            if cut:
                self._value.append(buf[:cut])
                self._emit(ParamDelta(len(self._calls), self._param_name, buf[:cut]))
            self._buf = buf[cut:]
            if m is None or m.partial:
                return False
            self._buf = buf[m.end() :]
            if m.group("eos"):
                self._eos = True
                self._fail("interrupted_tool_call", "the turn ended inside a parameter value")
                return True
            self._end_param()
            return True
        return False

    def _on_tag(self, what: str, m: regex.Match[str]) -> None:
        st = self._state
        if what == "eos":
            self._eos = True
            if st == "after":
                self._end()
            else:
                self._fail("interrupted_tool_call", "the turn ended inside the tool-call block")
        elif what == "invoke":
            self._call_name = m.group("name")
            self._params = []
            self._state = "invoke"
            self._emit(ToolCallStart(len(self._calls), self._call_name))
        elif what == "param":
            name = m.group("name")
            if any(p[0] == name for p in self._params):
                self._fail(
                    "duplicate_parameter", f"duplicate parameter name '{name}' in {self._call_name}"
                )
                return
            self._param_name = name
            self._param_is_str = m.group("string") == "true"
            self._value = []
            self._state = "param"
            self._emit(ParamStart(len(self._calls), name, self._param_is_str))
        elif what == "end" and st == "invoke":
            params: dict[str, Any] = {}
            for k, v, is_str in self._params:
                params[k] = v if is_str else json.loads(v)
            call = ToolCall(self._call_name, _build_arguments(self._params), params)
            self._calls.append(call)
            self._state = "block"
            self._emit(ToolCallEnd(len(self._calls) - 1, call))
        elif what == "end":
            if not self._calls:
                self._fail("dsml_syntax", "the <｜DSML｜tool_calls> block holds no invoke")
                return
            self._state = "after"
            self._emit(ToolBlockEnd(tuple(self._calls)))

    def _end_param(self) -> None:
        value = "".join(self._value)
        name = self._param_name
        if self._param_is_str:
            decoded: Any = value
        else:
            try:
                decoded = json.loads(value)
            except ValueError:
                self._fail(
                    "invalid_json",
                    f"parameter '{name}' of {self._call_name} has string=\"false\" but its value "
                    f'{_snippet(value)} is not JSON (use string="true" for text)',
                )
                return
        self._params.append((name, value, self._param_is_str))
        self._state = "invoke"
        self._emit(ParamEnd(len(self._calls), name, decoded))

    def _close(self) -> None:
        """End of input without EOS."""
        self._feed_final()
        if self._turn is not None:
            return
        st = self._state
        if st == "think":
            self._fail("missing_think_end", "the output ended before </think>")
        elif st == "content":
            self._fail("missing_eos", "the output ended without EOS (cut off)")
        elif st in ("block", "invoke", "param"):
            self._fail("interrupted_tool_call", "the output ended inside a tool call")
        self._end()

    def _feed_final(self) -> None:
        """Flush text held back for a possible marker: at the end it is plain text."""
        buf, self._buf = self._buf, ""
        if self._state == "think":
            self._reason(buf)
        elif self._state == "content":
            self._say(buf)
        elif self._state == "param":
            self._value.append(buf)
        elif buf.strip() and self._state in ("block", "invoke"):
            self._fail("interrupted_tool_call", "the output ended inside a tool-call tag")
        elif buf.strip() and self._state == "after":
            self._fail(
                "content_after_tool_calls",
                f"unexpected text {_snippet(buf.strip())} after </｜DSML｜tool_calls>",
            )

    def _end(self) -> None:
        reasoning = "".join(self._reasoning)
        ignored = _calls_in_text(reasoning) if "DSML" in reasoning else []
        error = self._error
        calls = list(self._calls)
        if error is None and ignored and not calls:
            error = ParseError(
                "tool_call_in_thinking",
                "tool calls inside <think>…</think> are not executed; close the reasoning with "
                "</think> first, then write the tool call",
            )
            self._emit(Error(error))
        elif error is not None and error.kind == "missing_think_end" and ignored:
            error = ParseError(
                "missing_think_end",
                "the output ended before </think>, so the tool call inside the reasoning was not "
                "executed; close the reasoning with </think> before calling tools",
            )
        self._error = error
        self._turn = ParsedTurn(
            content="".join(self._content),
            reasoning_content=reasoning,
            tool_calls=[] if error is not None else calls,
            error=error,
            ignored_calls=ignored,
            ended_with_eos=self._eos,
        )
        self._state = "done"
        self._emit(TurnEnd(self._turn))


def _calls_in_text(text: str) -> list[ToolCall]:
    """Complete tool calls of the DSML blocks inside `text` (used on the reasoning)."""
    calls: list[ToolCall] = []
    for m in _OPEN_BLOCK.finditer(text):
        sub = DsmlParser("chat")
        sub.feed(text[m.start() :])
        calls.extend(sub.calls)
    return calls


def parse_completion(text: str, thinking_mode: str = "thinking") -> ParsedTurn:
    """Parse a whole completion (what follows `<｜Assistant｜><think>` or `…</think>`)."""
    parser = DsmlParser(thinking_mode)
    parser.feed(text)
    return parser.result()
