"""Split a streamed completion into reasoning, visible text and tool calls for the HTTP API.

The parsing itself is the project's streaming DSML parser (`prompts.dsml.DsmlParser`: the
official grammar plus the tolerated variants, tool calls inside `<think>` never executed).
This adapter turns its events into the server's wire-neutral events: each call gets a client
id, and parameter events become fragments of the JSON `arguments` string (`ArgsJson`), so a
streaming client sees the arguments grow while the DSML is generated and their concatenation
equals the final string the official parser builds.
"""

from __future__ import annotations

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
from ds4_agent.prompts import dsml


class CompletionParser:
    def __init__(self, thinking_mode: str, new_call_id: Callable[[], str]) -> None:
        self._p = dsml.DsmlParser(thinking_mode)
        self.new_call_id = new_call_id
        self.calls: list[str] = []  # client ids, by call index
        self.calls_done = False  # `</｜DSML｜tool_calls>` was read: stop generating
        self.error: str | None = None
        self._args: dict[int, ArgsJson] = {}
        self._in_block = False
        self._in_param = False

    @property
    def in_structure(self) -> bool:
        """Inside the tool-call block but not inside a parameter value."""
        return self._in_block and not self._in_param and not self.calls_done

    @property
    def failed(self) -> bool:
        return self.error is not None

    def feed(self, text: str) -> list[Event]:
        return self._map(self._p.feed(text)) if text else []

    def finish(self) -> list[Event]:
        """End of generation without EOS (limit, stop string, cancel): flush held-back text."""
        return self._map(self._p.finish())

    def _map(self, events: list[dsml.Event]) -> list[Event]:
        out: list[Event] = []
        for ev in events:
            if isinstance(ev, dsml.ReasoningDelta):
                out.append(ReasoningDelta(ev.text))
            elif isinstance(ev, dsml.TextDelta):
                out.append(TextDelta(ev.text))
            elif isinstance(ev, dsml.ToolBlockStart):
                self._in_block = True
            elif isinstance(ev, dsml.ToolCallStart):
                cid = self.new_call_id()
                self.calls.append(cid)
                self._args[ev.index] = ArgsJson()
                out.append(ToolStart(ev.index, cid, ev.name))
            elif isinstance(ev, dsml.ParamStart):
                self._in_param = True
                frag = self._args[ev.call_index].start_param(ev.name, ev.is_string)
                out.append(ToolArgs(ev.call_index, frag))
            elif isinstance(ev, dsml.ParamDelta):
                out.append(ToolArgs(ev.call_index, self._args[ev.call_index].value(ev.text)))
            elif isinstance(ev, dsml.ParamEnd):
                self._in_param = False
                out.append(ToolArgs(ev.call_index, self._args[ev.call_index].end_param()))
            elif isinstance(ev, dsml.ToolCallEnd):
                args = self._args[ev.index]
                out.append(ToolArgs(ev.index, args.finish()))
                out.append(ToolEnd(ev.index))
            elif isinstance(ev, dsml.ToolBlockEnd):
                self.calls_done = bool(self.calls)
            elif isinstance(ev, dsml.Error):
                self.error = ev.error.message
        return out
