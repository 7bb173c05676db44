"""`ds4-agent -p TASK`: one task, no prompts, a machine-readable result, an honest exit code.

stdout gets only the answer (`text`), one JSON result (`json`) or NDJSON events whose last
line is the same result (`stream-json`). Progress and notices go to stderr. Permission asks
cannot be answered here, so they are denied and listed in `permission_denials`. Ctrl+C (or
SIGINT/SIGTERM from a CI runner) interrupts the loop cleanly: the transcript gets a
well-formed ending, the session is saved, and the exit code is 130.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TextIO

from ds4_agent.agent.headless import (
    AssistantContent,
    AssistantEvent,
    InitEvent,
    PermissionDenial,
    ResultMessage,
    StreamWriter,
    TextBlock,
    ThinkingBlock,
    ToolResultBlock,
    ToolUseBlock,
    Usage,
    UserContent,
    UserEvent,
)
from ds4_agent.agent.loop import AgentEvents, RoundStats, ToolCall, TurnResult
from ds4_agent.agent.runtime import StartInfo

SUBTYPE = {
    "done": "success",
    "limit": "error_max_turns",
    "interrupted": "error_interrupted",
    "error": "error_during_execution",
}


@dataclass
class HeadlessEvents(AgentEvents):
    """Progress to stderr; in stream-json mode, one event per assistant round and tool batch."""

    session_id: str = ""
    stream: StreamWriter | None = None
    err: TextIO = field(default_factory=lambda: sys.stderr)
    quiet: bool = False
    _reasoning: str = ""
    _text: str = ""
    _calls: list[ToolCall] = field(default_factory=list)
    _results: list[ToolResultBlock] = field(default_factory=list)
    _last_progress: float = 0.0

    approve = None  # never ask: an "ask" decision becomes a denial

    def prefill_progress(self, done: int, total: int, elapsed_s: float) -> None:
        now = time.monotonic()
        if self.quiet or (done < total and now - self._last_progress < 1.0):
            return
        self._last_progress = now
        rate = done / elapsed_s if elapsed_s > 0 else 0.0
        self.err.write(f"ds4-agent: prefill {done}/{total} tokens ({rate:.0f} tok/s)\n")
        self.err.flush()

    def reasoning(self, delta: str) -> None:
        self.flush_results()
        self._reasoning += delta

    def text(self, delta: str) -> None:
        self.flush_results()
        self._text += delta

    def tool_call(self, call: ToolCall) -> None:
        self._calls.append(call)
        if not self.quiet:
            self.err.write(f"ds4-agent: → {call.name} {_short(call.arguments)}\n")

    def tool_result(self, call: ToolCall, text: str, is_error: bool, display: Any) -> None:
        if self._calls:
            self.flush_round()  # the assistant message (with its calls) precedes the results
        self._results.append(ToolResultBlock(tool_use_id=call.id, content=text, is_error=is_error))

    def invalid_calls(self, message: str, raw: str) -> None:
        if not self.quiet:
            self.err.write(f"ds4-agent: {message}\n")

    def notice(self, message: str) -> None:
        self.err.write(f"ds4-agent: {message}\n")
        self.err.flush()

    def round_end(self, stats: RoundStats) -> None:
        # Tool calls and results of this round arrive after it; the assistant message is
        # emitted at the first result, or by finish() for the last round.
        pass

    def finish(self) -> None:
        self.flush_round()
        self.flush_results()

    def flush_round(self) -> None:
        if self.stream is not None:
            blocks: list[Any] = []
            if self._reasoning.strip():
                blocks.append(ThinkingBlock(thinking=self._reasoning.strip()))
            if self._text.strip():
                blocks.append(TextBlock(text=self._text.strip()))
            blocks += [ToolUseBlock(id=c.id, name=c.name, input=c.arguments) for c in self._calls]
            if blocks:
                self.stream.emit(
                    AssistantEvent(
                        session_id=self.session_id, message=AssistantContent(content=blocks)
                    )
                )
        self._reasoning, self._text, self._calls = "", "", []

    def flush_results(self) -> None:
        if self.stream is not None and self._results:
            self.stream.emit(
                UserEvent(session_id=self.session_id, message=UserContent(content=self._results))
            )
        self._results = []


def _short(args: dict[str, Any]) -> str:
    s = " ".join(f"{k}={v!r}" for k, v in args.items())
    return s if len(s) <= 120 else s[:117] + "…"


class SignalInterrupt:
    """SIGINT/SIGTERM set the agent's interrupt flag instead of killing the process."""

    def __init__(self, on_signal: Callable[[], None]) -> None:
        self.on_signal = on_signal
        self.fired = False
        self._old: dict[int, Any] = {}

    def __enter__(self) -> SignalInterrupt:
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.fired:  # a second signal: the user really wants out
            os._exit(130)
        self.fired = True
        self.on_signal()

    def __exit__(self, *exc: object) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)


def build_result(
    turn: TurnResult | None,
    *,
    session_id: str,
    session_name: str,
    start: StartInfo,
    started_at: float,
    engine_s: float,
    error: str | None = None,
    interrupted: bool = False,
) -> ResultMessage:
    if turn is None:
        subtype = "error_interrupted" if interrupted else "error_during_execution"
        answer, rounds, decode, prefill, denials = "", 0, 0, 0, []
    else:
        subtype = SUBTYPE[turn.status]
        answer, rounds = turn.answer, turn.rounds
        decode, prefill, denials = turn.decode_tokens, turn.prefill_tokens, turn.denials
        error = error or turn.error
        if turn.status == "interrupted":
            error = error or "interrupted by the user"
    total_prefill = prefill + start.prefill_tokens
    return ResultMessage(
        subtype=subtype,  # type: ignore[arg-type]
        is_error=subtype != "success",
        result=answer,
        session_id=session_id,
        session_name=session_name,
        num_turns=rounds,
        duration_ms=int((time.monotonic() - started_at) * 1000),
        duration_api_ms=int(engine_s * 1000),
        usage=Usage(
            input_tokens=total_prefill,
            output_tokens=decode,
            cache_read_input_tokens=start.restored_tokens,
        ),
        prefill_tokens=total_prefill,
        restored_tokens=start.restored_tokens,
        kv_restored=start.kv_restored,
        permission_denials=[
            PermissionDenial(
                tool_name=str(d.get("tool_name") or d.get("tool") or d.get("name") or "?"),
                tool_use_id=str(d.get("tool_use_id") or d.get("id") or ""),
                tool_input=dict(d.get("tool_input") or d.get("input") or d.get("args") or {}),
            )
            for d in denials
        ],
        error=error if subtype != "success" else None,
    )


def init_event(
    session_id: str, name: str, cwd: str, model: str, tools: list[str], mode: str, s: StartInfo
) -> InitEvent:
    return InitEvent(
        session_id=session_id,
        session_name=name,
        cwd=cwd,
        model=model,
        tools=tools,
        permission_mode=mode,
        kv_restored=s.kv_restored,
        restored_tokens=s.restored_tokens,
    )
