"""The interactive session's state: current session, agent, snapshots, watcher.

The UI thread and the worker thread both go through this object; the worker only calls
`turn`, everything else runs while the model is idle (slash commands check `busy`).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any, TextIO

from ds4_agent.agent.cmd_run import Runtime, loop_config, make_agent, system_prefix_tokens
from ds4_agent.agent.cmd_sessions import store_for
from ds4_agent.agent.context import collect_facts, current_branch
from ds4_agent.agent.loop import Agent, TurnResult
from ds4_agent.agent.runtime import attach_compaction, autosave, start
from ds4_agent.agent.ui_render import Status, TerminalEvents
from ds4_agent.sessions.session import Session, SessionStore


class Controller:
    def __init__(
        self,
        args: argparse.Namespace,
        rt: Runtime,
        root: Path,
        events: TerminalEvents,
        status: Status,
        sampler: Any = None,
    ) -> None:
        self.args = args
        self.rt = rt
        self.root = root
        self.events = events
        self.status = status
        self.sampler = sampler
        self.store: SessionStore = store_for(root)
        self.agent: Agent | None = None
        self.watcher: Any = None
        self._last_facts: str | None = None

    # -- sessions ------------------------------------------------------------------------

    @property
    def session(self) -> Session:
        assert self.agent is not None
        return self.agent.session

    def open(self, session: Session, is_new: bool) -> None:
        """Make `session` current: warm start or resume (with a notice on rebuild)."""
        if self.agent is not None:
            autosave(self.agent, self.rt.kv)
        agent = make_agent(
            self.rt, session, loop_config(self.args, session), self.events, self.sampler
        )
        agent.pre_turn_notes = [self._facts_note]
        attach_compaction(agent, self.rt.kv)
        self._last_facts = _last_facts(session)
        self.status.session = session.meta.name
        self.status.ctx_limit = agent.cfg.ctx_limit
        if is_new:
            tokens, text = system_prefix_tokens(agent, self.root)
            info = start(agent, self.rt.kv, tokens, text)
        else:
            info = start(agent, self.rt.kv)
            if info.kv_restored:
                self.events.notice(
                    f"resumed '{session.meta.name}': restored {info.restored_tokens} tokens, "
                    f"prefilled {info.prefill_tokens}"
                )
            self.replay(session, last=3)
        self.agent = agent
        self.status.ctx_used = len(agent.tokens)
        self._start_watcher()

    def replay(self, session: Session, last: int = 3) -> None:
        """Show the last user turns of a resumed session (no tools run)."""
        entries = session.transcript.entries
        starts = [i for i, e in enumerate(entries) if e.kind == "user"]
        for e in entries[starts[-last] if len(starts) >= last else (starts[0] if starts else 0) :]:
            if e.kind == "user":
                self.events._print(f"❯ {e.text}")
            elif e.kind == "assistant":
                for c in e.data.get("tool_calls", []):
                    self.events._print(f"  ⏺ {c['name']} {c.get('arguments', {})}")
                if e.text:
                    self.events._print(e.text)

    def new_session(self, name: str | None = None) -> Session:
        branch = current_branch(self.root)
        s = self.store.create(
            name,
            branch=branch,
            thinking_mode=self.agent.cfg.thinking_mode if self.agent else "thinking",
        )
        self.open(s, True)
        return s

    def resume(self, query: str) -> Session:
        s = self.store.resolve(query)
        self.open(s, False)
        return s

    def fork(self, name: str | None = None) -> Session:
        assert self.agent is not None
        autosave(self.agent, self.rt.kv)
        child = self.store.fork(self.session.meta.id, name)
        # The live state is the parent's, token for token: keep it (no restore needed).
        self.agent.session = child
        self.status.session = child.meta.name
        child.save_meta()
        return child

    def rewind(self, n: int) -> tuple[int, str]:
        """Go back before the last `n` user turns: the conversation (a new transcript epoch
        that keeps the earlier turns token for token; the old epoch stays on disk) and the
        files the agent wrote in those turns. Returns (tokens prefilled, files report).

        The state comes from the snapshot store's longest stored prefix, normally the
        snapshot saved at the end of the turn before: no re-rendering, usually no prefill.
        """
        assert self.agent is not None
        a, s = self.agent, self.session
        entries = list(s.transcript.entries)
        starts = [i for i, e in enumerate(entries) if e.kind == "user"]
        if not starts:
            raise ValueError("nothing to rewind: this session has no turns yet")
        n = max(1, min(n, len(starts)))
        cut = starts[-n]
        first_turn = len(starts) - n + 1  # the journal numbers turns from 1
        files = ""
        if self.rt.tools is not None and self.rt.tools.journal.turns():
            files = self.rt.tools.journal.rewind_to(first_turn).summary()
        autosave(a, self.rt.kv)
        s.start_epoch()
        a.tokens = []
        for e in entries[:cut]:
            a.append(e.model_copy())
        a.turn_no = sum(1 for e in entries[:cut] if e.kind == "user")
        prefix = self.rt.kv.restore_prefix(a.tokens) if self.rt.kv is not None else None
        a.state = prefix if prefix is not None else a.engine.new_state()
        a.logits = prefix.logits if prefix is not None else None
        before = a.total_prefill
        a.sync()
        s.save_meta()
        self.status.ctx_used = len(a.tokens)
        if files:
            a.extra_notes.append(
                f"[ds4-agent] The user rewound the conversation and the files to before the "
                f"last {n} turn(s): {files} Read files again before editing them."
            )
        return a.total_prefill - before, files

    def rename(self, name: str) -> None:
        self.store.rename(self.session.meta.id, name)
        self.session.meta.name = name
        self.status.session = name

    # -- turns ---------------------------------------------------------------------------

    def turn(self, text: str) -> TurnResult:
        assert self.agent is not None
        res = self.agent.run_turn(text)
        autosave(self.agent, self.rt.kv)
        self.status.ctx_used = len(self.agent.tokens)
        self.status.phase = "idle"
        return res

    def _facts_note(self) -> str | None:
        facts = collect_facts(self.root).render()
        if facts == self._last_facts:
            return None
        self._last_facts = facts
        return f"[ds4-agent] {facts}"

    def _compact(self, agent: Agent, focus: str = "") -> Any:
        self.status.phase = "compacting"
        assert agent.compactor is not None
        r = agent.compactor(agent, focus)
        self.status.ctx_used = r.new_tokens
        return r

    # -- file watching -------------------------------------------------------------------

    def _start_watcher(self) -> None:
        if (
            self.watcher is not None
            or self.rt.tools is None
            or os.environ.get("DS4_AGENT_NO_WATCH")
        ):
            return
        from ds4_agent.agent.watch import FileWatcher

        ws = self.rt.tools.workspace
        self.watcher = FileWatcher(self.root, ws.read_state)
        self.watcher.start()
        assert self.agent is not None
        self.agent.pre_turn_notes.append(self.watcher.note)

    def close(self) -> None:
        if self.agent is not None:
            autosave(self.agent, self.rt.kv)
        if self.watcher is not None:
            self.watcher.stop()
        if self.rt.tools is not None:
            self.rt.tools.close()

    def banner(self) -> str:
        a = self.agent
        n = len(a.tokens) if a else 0
        return (
            f"ds4-agent · session {self.status.session} · {n} tokens in context · "
            f"/help for commands, Esc to interrupt, Ctrl+D to exit"
        )

    def run_piped(self, session: Session, is_new: bool, stdin: TextIO) -> int:
        """Interactive mode without a terminal: every stdin line is one prompt."""
        from ds4_agent.agent.slash import Shell, run_slash

        self.open(session, is_new)
        shell = Shell(self)
        for line in stdin:
            text = line.rstrip("\n")
            if not text.strip():
                continue
            if text.startswith("/") or text.startswith("!"):
                run_slash(shell, text)
                if shell.quit_requested:
                    break
                continue
            self.events._print(f"> {text}")
            self.turn(text)
        self.close()
        return 0


def _last_facts(session: Session) -> str | None:
    for e in reversed(session.transcript.entries):
        notes = e.data.get("notes") if e.kind == "user" else None
        if notes:
            for part in notes.split("\n\n"):
                if part.startswith("[ds4-agent] Today is"):
                    return part.removeprefix("[ds4-agent] ")
    return None
