"""The agent loop: prefill what is new → stream decode → parse DSML → tools → repeat.

Invariants
- The transcript only grows, and its token ids are the truth: sampled tokens are stored as
  sampled, never re-tokenized from text. Corrections (interrupts, tool errors, queued text,
  file-change notices, facts) are appended, never spliced into earlier text.
- The live engine state always holds a prefix of the transcript. "Pending" tokens (transcript
  tokens not yet in the state: a new user turn, tool results, the EOS the agent appended after
  a tool-call block) are prefilled at the start of the next round. `sync()` brings the state
  level with the transcript (end of turn, before a snapshot).
- Every round ends well-formed: an interrupt closes an open `<think>` and appends EOS, so the
  next turn starts from a clean transcript and needs no rebuild.

The loop knows nothing about terminals: it reports through `AgentEvents` (the TUI and the
headless runner implement it) and is interrupted through `Agent.interrupt` (a threading.Event
set by Esc/Ctrl+C; checked between sampled tokens, between prefill chunks and by running
shell commands).
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from ds4_agent.agent.render import Renderer
from ds4_agent.agent.round_parser import DSML_ERROR_KINDS, Round, ToolCall
from ds4_agent.sessions.session import Session
from ds4_agent.sessions.transcript import Entry

ThinkingMode = Literal["thinking", "chat", "max"]

# -- what the loop needs from its collaborators ------------------------------------------


class EngineState(Protocol):
    n_tokens: int


class EngineLike(Protocol):
    fingerprint: str

    def new_state(self) -> Any: ...
    def prefill(self, state: Any, token_ids: Sequence[int], **kw: Any) -> Any: ...
    def decode(self, state: Any, token_id: int) -> Any: ...


class ToolsLike(Protocol):
    def schemas(self) -> list[dict[str, Any]]: ...
    def call(self, name: str, args: dict[str, Any], ctx: Any) -> Any: ...


class AgentEvents:
    """Sink for what the loop does; every method is optional (no-op here)."""

    def prefill_progress(self, done: int, total: int, elapsed_s: float) -> None: ...
    def reasoning(self, delta: str) -> None: ...
    def text(self, delta: str) -> None: ...
    def tool_call_streaming(self, name: str, partial_dsml: str) -> None: ...
    def tool_call(self, call: ToolCall) -> None: ...
    def tool_result(self, call: ToolCall, text: str, is_error: bool, display: Any) -> None: ...
    def invalid_calls(self, message: str, raw: str) -> None: ...
    def notice(self, message: str) -> None: ...
    def round_end(self, stats: RoundStats) -> None: ...

    # Permission "ask": return True to allow. None (the default) means deny: headless runs.
    approve: Callable[[Any, Any], bool] | None = None


def sample_token(sampler: Any, logits: Any, greedy: bool = False) -> int:
    """The engine's samplers expose `sample(logits, greedy=…)`; plain callables work too."""
    fn = getattr(sampler, "sample", None)
    if fn is None:
        return int(sampler(logits))
    return int(fn(logits, greedy=True)) if greedy else int(fn(logits))


@dataclass
class LoopConfig:
    thinking_mode: ThinkingMode = "thinking"
    max_tool_rounds: int = 50  # assistant rounds with tool calls per user turn
    max_repeats: int = 3  # the same call (name + arguments) at most this often per turn
    max_round_tokens: int = 32768  # sampled tokens per assistant round
    ctx_limit: int = 65536
    prefill_chunk: int = 512  # prefill chunk: interrupt and progress granularity
    reserve_tokens: int = 1024  # kept free for tool results when checking fit
    compact_at: float = 0.85  # soft compaction trigger: this fraction of the context used

    @property
    def thinking(self) -> bool:
        return self.thinking_mode != "chat"


@dataclass
class RoundStats:
    prefill_tokens: int = 0
    prefill_s: float = 0.0
    decode_tokens: int = 0
    decode_s: float = 0.0

    @property
    def decode_tps(self) -> float:
        return self.decode_tokens / self.decode_s if self.decode_s > 0 else 0.0


@dataclass
class TurnResult:
    status: Literal["done", "interrupted", "limit", "error"]
    answer: str = ""
    rounds: int = 0
    prefill_tokens: int = 0
    decode_tokens: int = 0
    engine_s: float = 0.0
    error: str | None = None
    denials: list[dict[str, Any]] = field(default_factory=list)


class Interrupted(Exception):
    pass


class Agent:
    def __init__(
        self,
        engine: EngineLike,
        tokenizer: Any,
        tools: ToolsLike | None,
        session: Session,
        *,
        sampler: Any,
        config: LoopConfig | None = None,
        events: AgentEvents | None = None,
        state: Any = None,
    ) -> None:
        self.engine = engine
        self.tok = tokenizer
        self.render = Renderer(tokenizer)
        self.sp = self.render.sp
        self.tools = tools
        self.session = session
        self.sampler = sampler
        self.cfg = config or LoopConfig()
        self.events = events or AgentEvents()
        self.interrupt = threading.Event()
        self.queue: deque[str] = deque()  # prompts typed while busy, sent at the next chance
        self.tokens: list[int] = session.transcript.tokens()
        self.state = state if state is not None else engine.new_state()
        self.logits: Any = None  # logits after the state's last token (when in sync)
        self.turn_no = sum(1 for e in session.transcript if e.kind == "user")
        self.pre_turn_notes: list[Callable[[], str | None]] = []  # watchers, facts
        self.total_prefill = 0
        self.total_decode = 0
        # Compaction hook (set by the session runner): called with this agent when the
        # context is nearly full; it replaces the transcript epoch and the state.
        self.compactor: Callable[[Agent], Any] | None = None
        self.extra_notes: list[str] = []  # one-shot notes for the next user turn (!cmd output)

    # -- transcript ----------------------------------------------------------------------

    def append(self, entry: Entry) -> None:
        self.session.transcript.append(entry)
        self.tokens.extend(entry.tokens)

    @property
    def n_pending(self) -> int:
        return len(self.tokens) - self.state.n_tokens

    def sync(self, stats: RoundStats | None = None) -> Any:
        """Prefill the pending tokens (interruptible between chunks); return the logits."""
        pending = self.tokens[self.state.n_tokens :]
        if not pending:
            return self.logits
        t0 = time.perf_counter()
        target = len(self.tokens)

        def progress(done: int, total: int) -> None:
            self.events.prefill_progress(done, total, time.perf_counter() - t0)

        before = self.state.n_tokens
        try:
            logits = self.engine.prefill(
                self.state,
                pending,
                chunk_size=self.cfg.prefill_chunk,
                progress=progress,
                should_stop=self.interrupt.is_set,
            )
        except Exception as e:
            # The engine raises its own Cancelled between chunks; the state then holds the
            # chunks that completed, a valid prefix. Anything else is a real error.
            if e.__class__.__name__ != "Cancelled":
                raise
            logits = None
        done = self.state.n_tokens - before
        self.total_prefill += done
        if stats is not None:
            stats.prefill_tokens += done
            stats.prefill_s += time.perf_counter() - t0
        if self.state.n_tokens != target:
            self.logits = None
            raise Interrupted()
        self.logits = logits
        return logits

    # -- a user turn ---------------------------------------------------------------------

    def notes(self) -> str:
        """Text the agent adds in front of the next user text (facts, changed files)."""
        parts = [n for n in (f() for f in self.pre_turn_notes) if n]
        parts += self.extra_notes
        self.extra_notes = []
        return "\n\n".join(parts)

    def maybe_compact(self, extra: int = 0) -> bool:
        """Compact when the context is nearly full (soft) or `extra` tokens would not fit."""
        from ds4_agent.agent.compaction import fits, should_compact

        n = len(self.tokens)
        soft = should_compact(n, self.cfg.ctx_limit, self.cfg.compact_at)
        hard = extra > 0 and not fits(n, extra, self.cfg.ctx_limit, self.cfg.reserve_tokens)
        if self.compactor is None or not (soft or hard):
            return False
        why = "a tool result would not fit" if hard else "the context is nearly full"
        self.events.notice(f"compacting the conversation: {why} ({n}/{self.cfg.ctx_limit} tokens)")
        self.compactor(self)
        return True

    def run_turn(self, user_text: str) -> TurnResult:
        # The interrupt flag is not cleared here: a Ctrl+C that arrived while the session was
        # being restored must stop this turn too. It is cleared when the turn has ended.
        self.turn_no += 1
        self.maybe_compact()
        notes = self.notes()
        body = f"{notes}\n\n{user_text}" if notes else user_text
        self.append(
            Entry(
                kind="user",
                text=user_text,
                tokens=self.render.user_turn(body, self.cfg.thinking),
                data={"notes": notes} if notes else {},
            )
        )
        result = self._rounds()
        # Bring the closing tokens (EOS, an interrupt's ending) into the state now, so the
        # end-of-turn snapshot is exact and resuming needs no prefill at all.
        self.interrupt.clear()
        with contextlib.suppress(Interrupted):
            self.sync()
        self.session.save_meta()
        return result

    def _close(self, in_think: bool, reason: str) -> None:
        """A well-formed ending for a round that was cut short."""
        self.append(
            Entry(
                kind="notice",
                tokens=self.render.close_round(in_think),
                text="",
                data={"reason": reason},
            )
        )

    def _rounds(self) -> TurnResult:
        res = TurnResult(status="done")
        seen: dict[str, int] = {}
        ctx = self._tool_context()
        for round_no in range(self.cfg.max_tool_rounds + 1):
            stats = RoundStats()
            try:
                logits = self.sync(stats)
            except Interrupted:
                self._close(self.cfg.thinking, "interrupted during prefill")
                return self._finish(res, stats, "interrupted")
            if round_no == self.cfg.max_tool_rounds:
                # The model wants yet another round after the last allowed one: stop here.
                self._close(self.cfg.thinking, "tool round limit")
                self.events.notice(f"stopped: {self.cfg.max_tool_rounds} tool rounds in one turn")
                res.error = f"reached the limit of {self.cfg.max_tool_rounds} tool rounds"
                return self._finish(res, stats, "limit")
            parser, stop, tokens = self._decode_round(logits, stats)
            res.rounds += 1
            turn = parser.turn
            assert turn is not None
            err = turn.error
            wants_tools = (
                stop == "calls"
                or bool(turn.tool_calls)
                or (err is not None and err.kind in DSML_ERROR_KINDS)
            )
            if not wants_tools:
                res.answer = parser.answer  # text before tool calls is not the answer
            calls: list[ToolCall] = []
            error: str | None = None
            if stop in ("eos", "calls") and wants_tools:
                calls, error = self._parse(parser, round_no)
            self.append(
                Entry(
                    kind="assistant",
                    tokens=tokens,
                    text=parser.answer,
                    data={
                        "reasoning": parser.reasoning,
                        "stop": stop,
                        "tool_calls": [
                            {"id": c.id, "name": c.name, "arguments": c.arguments} for c in calls
                        ],
                        **({"tool_error": error} if error else {}),
                    },
                )
            )
            self.events.round_end(stats)
            if stop == "interrupt":
                self._close(parser.in_think, "interrupted during decode")
                return self._finish(res, stats, "interrupted")
            if stop == "length":
                self._close(parser.in_think, "round token limit")
                res.error = f"the answer reached the limit of {self.cfg.max_round_tokens} tokens"
                return self._finish(res, stats, "limit")
            if not wants_tools:
                return self._finish(res, stats, "done")  # a plain answer: the turn is over
            results = [error] if error else self._run_calls(calls, seen, ctx)
            res.denials = list(getattr(ctx, "denials", None) or [])
            note = self.queue.popleft() if self.queue else ""
            notes = self.notes()
            if notes:
                note = f"{notes}\n\n{note}" if note else notes
            tokens = self.render.tool_results(results, self.cfg.thinking, note=note)
            if self.maybe_compact(extra=len(tokens)) and not self._fits(len(tokens)):
                results = [
                    f"Tool error: the result ({len(tokens)} tokens) does not fit in the context "
                    "even after compaction; ask for less output (a line range, a narrower "
                    "search, `| tail`)."
                    for _ in results
                ]
                tokens = self.render.tool_results(results, self.cfg.thinking, note=note)
            self.append(
                Entry(
                    kind="tool_results",
                    tokens=tokens,
                    text="\n\n".join(results),
                    data={"note": note} if note else {},
                )
            )
            if self.interrupt.is_set():
                self._close(self.cfg.thinking, "interrupted during a tool")
                return self._finish(res, stats, "interrupted")
            res.prefill_tokens += stats.prefill_tokens
            res.decode_tokens += stats.decode_tokens
            res.engine_s += stats.prefill_s + stats.decode_s
        raise AssertionError("unreachable")

    def _fits(self, extra: int) -> bool:
        return len(self.tokens) + extra + self.cfg.reserve_tokens < self.cfg.ctx_limit

    def _finish(self, res: TurnResult, stats: RoundStats, status: str) -> TurnResult:
        res.status = status  # type: ignore[assignment]
        res.prefill_tokens += stats.prefill_tokens
        res.decode_tokens += stats.decode_tokens
        res.engine_s += stats.prefill_s + stats.decode_s
        return res

    # -- decoding one assistant round ------------------------------------------------------

    def _decode_round(self, logits: Any, stats: RoundStats) -> tuple[Round, str, list[int]]:
        """Sample one assistant round; returns the parsed round, why it stopped, and its tokens.

        The tokens are not yet in the transcript (the caller appends them together with the
        parsed calls); all but the last one are already in the engine state.
        """
        parser = Round(self.cfg.thinking, self.tok, self.sp.think_end)
        sampled: list[int] = []
        stop = "length"
        t0 = time.perf_counter()
        room = self.cfg.ctx_limit - len(self.tokens) - 2
        limit = max(0, min(self.cfg.max_round_tokens, room))
        while len(sampled) < limit:
            if self.interrupt.is_set():
                stop = "interrupt"
                break
            # Inside the DSML block's structure (tags, names, JSON punctuation) sample
            # greedily: a typo there costs a whole retry round; payload text samples freely.
            tok = sample_token(self.sampler, logits, greedy=parser.in_dsml_structure())
            sampled.append(tok)
            self._emit(parser, parser.feed_token(tok))
            if tok == self.sp.eos:
                stop = "eos"
                break
            # A closed block, or a malformed one (nothing after it can be executed): stop
            # here, the agent appends EOS and answers with results or feedback.
            if parser.ended:
                stop = "calls"
                break
            logits = self.engine.decode(self.state, tok)
        self._emit(parser, parser.finish())
        if stop == "calls":
            sampled.append(self.sp.eos)  # official shape: the block is followed by EOS
        stats.decode_tokens += len(sampled) - (stop == "calls")
        stats.decode_s += time.perf_counter() - t0
        self.total_decode += len(sampled) - (stop == "calls")
        return parser, stop, sampled

    def _emit(self, parser: Round, pieces: list[tuple[str, str]]) -> None:
        for kind, delta in pieces:
            if kind == "reasoning":
                self.events.reasoning(delta)
            elif kind == "text":
                self.events.text(delta)
            else:
                self.events.tool_call_streaming(parser.call_name, parser.dsml)

    # -- tools -----------------------------------------------------------------------------

    def _tool_context(self) -> Any:
        from ds4_agent.tools.context import ToolContext

        # The tools share the interrupt flag: Esc/Ctrl+C also stops a running command.
        return ToolContext(turn=self.turn_no, cancel=self.interrupt, approve=self.events.approve)

    def _parse(self, parser: Round, round_no: int) -> tuple[list[ToolCall], str | None]:
        turn = parser.turn
        assert turn is not None
        err = turn.error if turn.error and turn.error.kind in DSML_ERROR_KINDS else None
        if err is not None:
            msg = f"Tool error: {err.feedback()}"
            self.events.invalid_calls(msg, parser.dsml or parser.reasoning[-400:])
            return [], msg
        return parser.calls(round_no), None

    def _run_calls(self, calls: list[ToolCall], seen: dict[str, int], ctx: Any) -> list[str]:
        out: list[str] = []
        for call in calls:
            self.events.tool_call(call)
            n = seen.get(call.key(), 0) + 1
            seen[call.key()] = n
            display: Any = None
            if self.interrupt.is_set():
                text, is_error = "Tool call not run: interrupted by the user.", True
            elif n > self.cfg.max_repeats:
                text = (
                    f"Tool error: this exact {call.name} call was already made {n - 1} times "
                    "in this turn with the same arguments; it was not run again. Change the "
                    "arguments or the approach, or answer with what you have."
                )
                is_error = True
            elif self.tools is None:
                text, is_error = "Tool error: no tools are available in this session.", True
            else:
                denials = getattr(ctx, "denials", None)
                before = len(denials) if denials is not None else 0
                r = self.tools.call(call.name, call.arguments, ctx)
                text, is_error, display = r.text, r.is_error, r.display
                for d in (denials or [])[before:]:
                    d.setdefault("tool_use_id", call.id)  # headless results name the call
            self.events.tool_result(call, text, is_error, display)
            out.append(text)
        return out
